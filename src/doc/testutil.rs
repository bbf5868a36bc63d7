//! Helpers shared by the engine's unit tests: real yrs edits and reads of the text `t`.

use bytes::Bytes;
use yrs::{Doc, GetString, Text, Transact};

use super::YDoc;

/// Inserts `s` at `at` into text `t` of `doc` and returns the update that made.
pub fn edit(doc: &Doc, at: u32, s: &str) -> Bytes {
    let text = doc.get_or_insert_text("t");
    let mut txn = doc.transact_mut();
    text.insert(&mut txn, at, s);
    Bytes::from(txn.encode_update_v1())
}

/// Text `t` of a room's document.
pub fn text_of(doc: &YDoc) -> String {
    let text = doc.doc().get_or_insert_text("t");
    text.get_string(&doc.doc().transact())
}
