//! Shared by the fuzz targets: the starting document of a room and how one input is cut into
//! WebSocket frames.

use std::cell::Cell;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, Once, OnceLock};

use yrs::updates::decoder::Decode;
use yrs::{Array, Doc, Map, ReadTxn, StateVector, Text, Transact, Update, WriteTxn};

/// Separates frames in a `connection` input. Frames never contain it in the seeds; a mutated
/// input that does simply has more frames.
pub const FRAME_SEPARATOR: &[u8] = b"\xfe\xff\xfe\xff";

/// Cuts an input into frames at [`FRAME_SEPARATOR`].
pub fn frames(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let r = rest?;
        match r
            .windows(FRAME_SEPARATOR.len())
            .position(|w| w == FRAME_SEPARATOR)
        {
            Some(i) => {
                rest = Some(&r[i + FRAME_SEPARATOR.len()..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// A small document as one v1 update: text, a map and an array from client 1 (with a deletion),
/// then text from client 2 on top of it. Fuzzed updates can refer to its items.
pub fn base_document() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let one = Doc::with_client_id(1);
        {
            let mut txn = one.transact_mut();
            let t = txn.get_or_insert_text("t");
            t.insert(&mut txn, 0, "hello world");
            let m = txn.get_or_insert_map("m");
            m.insert(&mut txn, "k", "v");
            let a = txn.get_or_insert_array("a");
            a.insert_range(&mut txn, 0, [1, 2, 3]);
        }
        {
            let mut txn = one.transact_mut();
            let t = txn.get_or_insert_text("t");
            t.remove_range(&mut txn, 5, 1);
        }
        let state = one
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let two = Doc::with_client_id(2);
        {
            let mut txn = two.transact_mut();
            txn.apply_update(Update::decode_v1(&state).expect("own state decodes"))
                .expect("own state applies");
            let t = txn.get_or_insert_text("t");
            t.insert(&mut txn, 0, ">> ");
        }
        let state = two
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        state
    })
}

/// Whether invariants that known, reported issues break are relaxed, so that a campaign can
/// look past them: `TANDEM_FUZZ_ALLOW_KNOWN=1`. Off by default: the targets assert what the
/// server should guarantee. The issues (docs/fuzzing.md, "Findings") are all yrs 0.28.1 not
/// being robust against hostile updates, seen through tandem:
///
/// - a panic inside yrs (while applying an update, or while encoding a document that holds
///   what a hostile update left in it): tandem contains it, but discards the room;
/// - the document's own encodings (a step 2, a snapshot, the `effective` update it relays) do
///   not decode, or do not hold the document (a newcomer or a reload ends up different);
/// - an update refused with an error after yrs integrated part of it: the part stays in the
///   room, unrelayed and unstored;
/// - an update applied with pending data involved changes the room by more than the `effective`
///   update it relays, so peers and the room disagree.
///
/// Each kind is reported on stderr the first time it is tolerated (per panic location). Letting a
/// panic inside yrs unwind can itself lead to memory errors (finding 7: the unwinding commits the
/// half-applied transaction); AddressSanitizer reports those, and they are never tolerated: run
/// campaigns with `-fork=1 -ignore_crashes=1` to go on after one.
pub fn allow_known() -> bool {
    static ALLOW: OnceLock<bool> = OnceLock::new();
    *ALLOW.get_or_init(|| std::env::var_os("TANDEM_FUZZ_ALLOW_KNOWN").is_some())
}

/// Notes on stderr, once per `what`, that a known issue was tolerated.
pub fn tolerated(what: &str) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen
        .get_or_insert_with(HashSet::new)
        .insert(what.to_string())
    {
        eprintln!("tandem-fuzz: tolerated known issue: {what}");
    }
}

thread_local! {
    static KNOWN_PANIC: Cell<bool> = const { Cell::new(false) };
}

/// A panic inside yrs (the version tandem pins).
fn is_known_panic(info: &std::panic::PanicHookInfo<'_>) -> bool {
    info.location()
        .is_some_and(|l| l.file().contains("/yrs-0.28.1/"))
}

/// With [`allow_known`], lets a panic inside yrs unwind (to tandem's `contain` or to
/// [`known_panics`]) instead of aborting; every other panic still aborts, through libFuzzer's
/// own hook. Call at the start of every execution; it installs itself once.
pub fn install_panic_filter() {
    static INSTALL: Once = Once::new();
    if !allow_known() {
        return;
    }
    INSTALL.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if is_known_panic(info) {
                KNOWN_PANIC.with(|k| k.set(true));
                let location = info.location().map(ToString::to_string).unwrap_or_default();
                tolerated(&format!("yrs panicked at {location}"));
            } else {
                fuzzer_hook(info);
            }
        }));
    });
    KNOWN_PANIC.with(|k| k.set(false));
}

/// Whether a panic inside yrs happened since [`install_panic_filter`] (this execution).
pub fn known_panic_happened() -> bool {
    KNOWN_PANIC.with(Cell::get)
}

/// Runs `f`; `None` if it panicked inside yrs (only possible with [`allow_known`]: any other
/// panic aborts the process, as libFuzzer wants).
pub fn known_panics<T>(f: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

/// Checks a known-issue invariant: panics with `message` unless [`allow_known`], in which case
/// the violation is noted once.
pub fn known_issue(holds: bool, message: &str) {
    if holds {
        return;
    }
    assert!(allow_known(), "{message}");
    tolerated(message);
}
