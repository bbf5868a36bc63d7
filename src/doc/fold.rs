//! [`YrsFold`]: the store's compaction [`Fold`] for Yjs documents, merging updates with yrs.

use bytes::Bytes;

use super::ydoc::contain;
use crate::store::{Fold, Folded};

/// Folds a snapshot and log rows (all Yjs v1 updates) into one update with
/// [`yrs::merge_updates_v1`], without integrating them into a document: nothing is lost, not even
/// updates whose predecessors are missing (they stay pending in the merged update, as they would in
/// the log). Panic-contained: a panic inside yrs is reported as an error, so the compaction changes
/// nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct YrsFold;

impl Fold for YrsFold {
    fn fold(&self, snapshot: Option<&[u8]>, updates: &[Bytes]) -> Result<Folded, String> {
        let parts = snapshot.into_iter().chain(updates.iter().map(|u| &u[..]));
        let state = contain(|| yrs::merge_updates_v1(parts))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("update does not decode: {e}"))?;
        let state_vector = contain(|| yrs::encode_state_vector_from_update_v1(&state))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("merged update does not decode: {e}"))?;
        Ok(Folded {
            state: Bytes::from(state),
            state_vector: Bytes::from(state_vector),
        })
    }
}

#[cfg(test)]
mod tests {
    use yrs::Doc;

    use super::*;
    use crate::doc::YDoc;

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
    fn garbage_is_refused_not_folded() {
        let client = Doc::with_client_id(7);
        let good = edit(&client, 0, "ab");
        let err = YrsFold
            .fold(None, &[good, Bytes::from_static(&[0xff, 0xff, 0xff])])
            .expect_err("garbage must not fold");
        assert!(err.contains("decode"), "{err}");
    }
}
