//! [`YrsFold`]: the store's compaction [`Fold`] for Yjs documents, merging updates with yrs.

use bytes::Bytes;

use super::ydoc::YDoc;
use crate::store::{Fold, Folded};

/// Folds a snapshot and log rows (all Yjs v1 updates) by integrating them, in order, into a
/// fresh document and encoding its whole state: the snapshot is what `encode_state_as_update`
/// gives (deleted content garbage-collected, runs of keystrokes as one block), and nothing is
/// lost: updates whose predecessors are missing stay pending, and yrs encodes pending data with
/// the state, as the log would have kept them. Panic-contained: a panic inside yrs is reported as
/// an error, so the compaction changes nothing (and the broken document is leaked, not freed:
/// see [`YDoc`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct YrsFold;

impl Fold for YrsFold {
    fn fold(&self, snapshot: Option<&[u8]>, updates: &[Bytes]) -> Result<Folded, String> {
        let mut doc = YDoc::load(snapshot, updates).map_err(|e| e.to_string())?;
        let (state, state_vector) = doc.encode_state().map_err(|e| e.to_string())?;
        Ok(Folded {
            state: Bytes::from(state),
            state_vector: Bytes::from(state_vector),
        })
    }
}

#[cfg(test)]
mod tests {
    use yrs::{Doc, ReadTxn, Text, Transact};

    use super::*;

    use crate::doc::testutil::{edit, text_of};

    #[test]
    fn folding_rows_onto_a_snapshot_keeps_every_edit() {
        let client = Doc::with_client_id(7);
        let first = YrsFold
            .fold(None, &[edit(&client, 0, "ab"), edit(&client, 2, "cd")])
            .expect("fold");
        let second = YrsFold
            .fold(Some(&first.state), &[edit(&client, 4, "ef")])
            .expect("fold");
        let loaded = YDoc::load(Some(&second.state), &[]).expect("load");
        assert_eq!(text_of(&loaded), "abcdef");
        assert_eq!(second.state_vector, Bytes::from(loaded.state_vector()));
    }

    #[test]
    fn an_update_waiting_for_its_predecessor_is_kept_until_it_arrives() {
        let client = Doc::with_client_id(7);
        let first = edit(&client, 0, "ab");
        let second = edit(&client, 2, "cd");
        let folded = YrsFold.fold(None, &[second]).expect("fold");
        let loaded = YDoc::load(Some(&folded.state), &[first]).expect("load");
        assert_eq!(text_of(&loaded), "abcd");
    }

    #[test]
    fn a_row_already_in_the_snapshot_is_harmless() {
        let client = Doc::with_client_id(7);
        let a = edit(&client, 0, "ab");
        let folded = YrsFold.fold(None, std::slice::from_ref(&a)).expect("fold");
        let again = YrsFold.fold(Some(&folded.state), &[a]).expect("fold");
        let loaded = YDoc::load(Some(&again.state), &[]).expect("load");
        assert_eq!(text_of(&loaded), "ab");
    }

    #[test]
    fn a_snapshot_is_the_document_encoded_not_a_merge_of_keystrokes() {
        let client = Doc::with_client_id(7);
        let mut rows = Vec::new();
        for i in 0..300u32 {
            rows.push(edit(&client, i, "x"));
        }
        // Delete most of it again: deleted content is not kept.
        {
            let text = client.get_or_insert_text("t");
            let mut txn = client.transact_mut();
            text.remove_range(&mut txn, 10, 280);
            rows.push(Bytes::from(txn.encode_update_v1()));
        }
        let folded = YrsFold.fold(None, &rows).expect("fold");
        let loaded = YDoc::load(Some(&folded.state), &[]).expect("load");
        assert_eq!(text_of(&loaded), "x".repeat(20));
        let reference = client
            .transact()
            .encode_state_as_update_v1(&yrs::StateVector::default());
        // yrs' own encoding of the same document, within 5 %.
        assert!(
            folded.state.len() * 100 <= reference.len() * 105,
            "snapshot {} bytes, encode_state_as_update {} bytes",
            folded.state.len(),
            reference.len()
        );
        assert_eq!(folded.state_vector, Bytes::from(loaded.state_vector()));
    }

    #[test]
    fn garbage_is_refused_not_folded() {
        let client = Doc::with_client_id(7);
        let good = edit(&client, 0, "ab");
        let err = YrsFold
            .fold(None, &[good, Bytes::from_static(&[0xff, 0xff, 0xff])])
            .expect_err("garbage must not fold");
        assert!(err.contains("decode"), "{err}");
    }
}
