//! Property: what yrs documents really send passes tandem's update checks, and tandem reads the
//! same structure yrs does.
//!
//! Three clients edit a room's document (text with formatting and embeds, maps of nested values,
//! arrays, nested and XML types, deletions) and exchange updates only through the room, lagging
//! behind it at random. Each client sends either its transaction's update or a sync step 2 (its
//! diff against the room's state vector). For every update:
//!
//! - `UpdateShape::read` accepts it, and its client runs and deletions are exactly what yrs
//!   decodes (`Update::insertions`, `Update::delete_set`);
//! - the room's `YDoc::apply_checked` accepts it (its dependency and placement checks pass,
//!   also after the room reloaded from a snapshot at random points), and after each round the
//!   room and every client that caught up hold the same document.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use tandem::doc::{Applied, DecodedUpdate, YDoc};
use tandem_protocol::UpdateShape;
use yrs::types::text::YChange;
use yrs::types::Attrs;
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    Any, Array, ArrayPrelim, ClientID, Doc, GetString, Map, MapPrelim, Number, OffsetKind, Options,
    Out, ReadTxn, StateVector, Text, Transact, Update, WriteTxn, Xml, XmlElementPrelim,
    XmlFragment,
};

#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, String),
    Delete(usize, usize),
    Format(usize, usize, bool),
    Embed(usize, Any),
    MapSet(String, Any),
    MapNested(String),
    MapDelete(String),
    /// Sets a key to each value in one transaction, then deletes it if asked: with garbage
    /// collection off, the overwritten values merge into one item longer than one clock.
    MapChurn(String, Vec<Any>, bool),
    ArrayInsert(usize, Vec<Any>),
    ArrayNested(usize),
    ArrayDelete(usize, usize),
    Xml(usize, String),
}

#[derive(Debug, Clone)]
enum Step {
    /// Client `n` edits and sends its transaction's update (or, if `step2`, its whole diff
    /// against the room).
    Edit { n: usize, edit: Edit, step2: bool },
    /// Client `n` receives what the room has that it lacks.
    CatchUp { n: usize },
    /// The room unloads and loads again from a snapshot of its state (its record of where
    /// items sit is rebuilt from it).
    Reload,
}

fn any_value() -> impl Strategy<Value = Any> {
    let leaf = prop_oneof![
        Just(Any::Null),
        Just(Any::Undefined),
        any::<bool>().prop_map(Any::Bool),
        any::<i64>().prop_map(|i| Any::Number(Number::Int(i))),
        (-1e9f64..1e9).prop_map(|f| Any::Number(Number::Float(f))),
        "[a-zé😀 ]{0,6}".prop_map(|s| Any::String(Arc::from(s.as_str()))),
        proptest::collection::vec(any::<u8>(), 0..4).prop_map(|b| Any::Buffer(Arc::from(b))),
    ];
    leaf.prop_recursive(5, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(|v| Any::Array(Arc::from(v))),
            proptest::collection::hash_map("[a-c]{1,2}", inner, 0..4)
                .prop_map(|m| Any::Map(Arc::new(m.into_iter().collect()))),
        ]
    })
}

fn edit() -> impl Strategy<Value = Edit> {
    let idx = 0usize..40;
    prop_oneof![
        4 => (idx.clone(), "[a-zé😀\n]{1,8}").prop_map(|(i, s)| Edit::Insert(i, s)),
        2 => (idx.clone(), 1usize..6).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => (idx.clone(), 1usize..6, any::<bool>()).prop_map(|(i, n, b)| Edit::Format(i, n, b)),
        // Embeds travel as JSON text: values JSON keeps as they are.
        1 => (idx.clone(), proptest::collection::hash_map("[a-c]", "[a-z]{0,3}", 0..3)).prop_map(
            |(i, m)| {
                let m = m.into_iter().map(|(k, v)| (k, Any::String(Arc::from(v.as_str()))));
                Edit::Embed(i, Any::Map(Arc::new(m.collect())))
            }
        ),
        2 => ("[a-d]", any_value()).prop_map(|(k, v)| Edit::MapSet(k, v)),
        1 => "[a-d]".prop_map(Edit::MapNested),
        1 => "[a-d]".prop_map(Edit::MapDelete),
        1 => ("[a-d]", proptest::collection::vec(any_value(), 2..5), any::<bool>())
            .prop_map(|(k, v, delete)| Edit::MapChurn(k, v, delete)),
        2 => (idx.clone(), proptest::collection::vec(any_value(), 1..4))
            .prop_map(|(i, v)| Edit::ArrayInsert(i, v)),
        1 => idx.clone().prop_map(Edit::ArrayNested),
        1 => (idx.clone(), 1usize..4).prop_map(|(i, n)| Edit::ArrayDelete(i, n)),
        1 => (idx, "[a-z]{1,4}").prop_map(|(i, s)| Edit::Xml(i, s)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0usize..3, edit(), proptest::bool::weighted(0.2))
            .prop_map(|(n, edit, step2)| Step::Edit { n, edit, step2 }),
        1 => (0usize..3).prop_map(|n| Step::CatchUp { n }),
        1 => Just(Step::Reload),
    ]
}

fn apply(doc: &Doc, edit: &Edit) {
    let mut txn = doc.transact_mut();
    let text = txn.get_or_insert_text("t");
    let map = txn.get_or_insert_map("m");
    let array = txn.get_or_insert_array("a");
    let xml = txn.get_or_insert_xml_fragment("x");
    // Text offsets are in UTF-16 units (the documents' offset kind, as in Yjs) and must fall
    // between characters: the offset of each character or embed, and of the end.
    let mut bounds = vec![0u32];
    for chunk in text.diff(&txn, YChange::identity) {
        match chunk.insert {
            Out::Any(Any::String(s)) => {
                for c in s.chars() {
                    bounds.push(bounds.last().unwrap() + c.len_utf16() as u32);
                }
            }
            _ => bounds.push(bounds.last().unwrap() + 1),
        }
    }
    let at = |i: usize| bounds[i.min(bounds.len() - 1)];
    let tlen = bounds.len() - 1;
    let alen = array.len(&txn) as usize;
    match edit {
        Edit::Insert(i, s) => {
            text.insert(&mut txn, at(*i), s);
        }
        Edit::Delete(i, n) if tlen > 0 => {
            let i = (*i).min(tlen - 1);
            text.remove_range(&mut txn, at(i), at(i + n) - at(i));
        }
        Edit::Format(i, n, bold) if tlen > 0 => {
            let i = (*i).min(tlen - 1);
            let attrs = Attrs::from([(Arc::from("bold"), Any::Bool(*bold))]);
            text.format(&mut txn, at(i), at(i + n) - at(i), attrs);
        }
        Edit::Embed(i, v) => {
            text.insert_embed(&mut txn, at(*i), v.clone());
        }
        Edit::MapSet(k, v) => {
            map.insert(&mut txn, k.as_str(), v.clone());
        }
        Edit::MapNested(k) => {
            let inner = map.insert(&mut txn, k.as_str(), MapPrelim::default());
            inner.insert(&mut txn, "inner", Any::Bool(true));
        }
        Edit::MapDelete(k) => {
            map.remove(&mut txn, k);
        }
        Edit::MapChurn(k, values, delete) => {
            for value in values {
                map.insert(&mut txn, k.as_str(), value.clone());
            }
            if *delete {
                map.remove(&mut txn, k);
            }
        }
        Edit::ArrayInsert(i, v) => {
            let at = (*i).min(alen) as u32;
            for (j, value) in v.iter().enumerate() {
                array.insert(&mut txn, at + j as u32, value.clone());
            }
        }
        Edit::ArrayNested(i) => {
            let inner = array.insert(
                &mut txn,
                (*i).min(alen) as u32,
                ArrayPrelim::from([Any::Null]),
            );
            inner.push_back(&mut txn, Any::Bool(false));
        }
        Edit::ArrayDelete(i, n) if alen > 0 => {
            let at = (*i).min(alen - 1);
            array.remove_range(&mut txn, at as u32, (*n).min(alen - at) as u32);
        }
        Edit::Xml(i, name) => {
            let at = (*i).min(xml.len(&txn) as usize) as u32;
            let el = xml.insert(&mut txn, at, XmlElementPrelim::empty(name.as_str()));
            el.insert_attribute(&mut txn, "k", name.as_str());
        }
        _ => {}
    }
}

/// Checks that tandem reads `bytes` as yrs does.
fn same_structure(bytes: &[u8]) -> Result<(), TestCaseError> {
    let shape = UpdateShape::read(bytes).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    let update = Update::decode_v1(bytes).expect("yrs decodes what yrs encoded");
    let mut runs = HashMap::new();
    for run in shape.clients() {
        runs.insert(run.client, vec![(run.start, run.end)]);
    }
    let mut theirs = HashMap::new();
    for (client, ranges) in update.insertions(true).iter() {
        let ranges: Vec<(u32, u32)> = ranges.iter().map(|r| (r.start, r.end)).collect();
        theirs.insert(client.get(), ranges);
    }
    prop_assert_eq!(runs, theirs);
    let mut ours: Vec<(u64, u32, u32)> = shape
        .deletions()
        .iter()
        .map(|d| (d.client, d.clock, d.clock + d.len))
        .collect();
    let mut theirs: Vec<(u64, u32, u32)> = update
        .delete_set()
        .iter()
        .flat_map(|(client, ranges)| {
            ranges
                .iter()
                .map(|r| (client.get(), r.start, r.end))
                .collect::<Vec<_>>()
        })
        .collect();
    ours.sort_unstable();
    theirs.sort_unstable();
    prop_assert_eq!(ours, theirs);
    Ok(())
}

fn state(doc: &Doc) -> Vec<u8> {
    doc.transact()
        .encode_state_as_update_v1(&StateVector::default())
}

type Summary = (
    String,
    Vec<yrs::types::text::Diff<YChange>>,
    Any,
    Any,
    String,
);

fn summary(doc: &Doc) -> Summary {
    // Root types exist once asked for (creating one locally writes nothing to the document).
    let mut txn = doc.transact_mut();
    let t = txn.get_or_insert_text("t");
    let m = txn.get_or_insert_map("m");
    let a = txn.get_or_insert_array("a");
    let x = txn.get_or_insert_xml_fragment("x");
    (
        t.get_string(&txn),
        t.diff(&txn, YChange::identity),
        m.to_json(&txn),
        a.to_json(&txn),
        x.get_string(&txn),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn real_updates_pass_and_read_as_yrs_reads_them(steps in proptest::collection::vec(step(), 1..40)) {
        let mut room = YDoc::new();
        let clients: Vec<Doc> = (0..3u64)
            .map(|i| {
                Doc::with_options(Options {
                    client_id: ClientID::new(100 + i),
                    offset_kind: OffsetKind::Utf16,
                    // One client keeps deleted content, as documents kept for versions do.
                    skip_gc: i == 2,
                    ..Options::default()
                })
            })
            .collect();
        for step in &steps {
            match step {
                Step::Reload => {
                    let (snapshot, _) = room.encode_state().expect("room state");
                    room = YDoc::load(Some(&snapshot), &[]).expect("room loads");
                }
                Step::CatchUp { n } => {
                    let sv = clients[*n].transact().state_vector().encode_v1();
                    let diff = room.diff(&sv).expect("room diff");
                    same_structure(&diff)?;
                    clients[*n]
                        .transact_mut()
                        .apply_update(Update::decode_v1(&diff).unwrap())
                        .unwrap();
                }
                Step::Edit { n, edit, step2 } => {
                    let doc = &clients[*n];
                    let before = doc.transact().state_vector();
                    apply(doc, edit);
                    let bytes = if *step2 {
                        let room_sv = StateVector::decode_v1(&room.state_vector()).unwrap();
                        doc.transact().encode_diff_v1(&room_sv)
                    } else {
                        doc.transact().encode_diff_v1(&before)
                    };
                    same_structure(&bytes)?;
                    let decoded = DecodedUpdate::decode(Bytes::from(bytes)).expect("decodes");
                    match room.apply_checked(decoded) {
                        Ok(Applied::Changed { complete: true, .. }) | Ok(Applied::Unchanged) => {}
                        other => prop_assert!(false, "refused or incomplete: {:?} after {:?}", other, edit),
                    }
                }
            }
        }
        // Everyone catches up and holds what the room holds.
        let room_state = room.encode_state().expect("room state").0;
        same_structure(&room_state)?;
        let reference = Doc::new();
        reference
            .transact_mut()
            .apply_update(Update::decode_v1(&room_state).unwrap())
            .unwrap();
        for doc in &clients {
            let sv = doc.transact().state_vector().encode_v1();
            let diff = room.diff(&sv).unwrap();
            doc.transact_mut().apply_update(Update::decode_v1(&diff).unwrap()).unwrap();
            prop_assert_eq!(summary(doc), summary(&reference));
            same_structure(&state(doc))?;
        }
    }
}
