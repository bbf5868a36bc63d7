//! When a room folds its update log into a snapshot: pure bookkeeping, no I/O.

use crate::store::Compacted;

/// Thresholds for compaction. A snapshot is never rewritten per keystroke: the log is the write
/// path, and it is folded only when it grows past one of these (or when the room unloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Fold once this many committed updates follow the snapshot.
    pub max_updates: usize,
    /// Fold once the committed updates after the snapshot hold this many bytes.
    pub max_bytes: usize,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            max_updates: 500,
            max_bytes: 1 << 20,
        }
    }
}

/// A compaction in flight: what this node committed while it ran.
///
/// The store folds whatever the log holds when its compaction transaction reads it, which is
/// after the fold started: every row committed before [`LogState::start_fold`], perhaps some
/// committed during it, and other nodes' rows too. So what is left afterwards is at most what was
/// committed during the fold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Fold {
    rows: usize,
    bytes: usize,
}

/// The state of one room's log as the room actor sees it.
#[derive(Debug, Default)]
pub struct LogState {
    /// Updates handed to the writer and not yet committed.
    uncommitted: usize,
    /// Committed rows (and their bytes) believed to be in the log: this node's since the last
    /// compaction, plus whatever the load found.
    rows: usize,
    bytes: usize,
    /// The newest committed id of this room this node knows of.
    last_id: i64,
    /// The compaction in flight, if any.
    folding: Option<Fold>,
}

impl LogState {
    /// The state after a load that found `rows` log rows holding `bytes`, the newest `last_id`.
    pub fn loaded(rows: usize, bytes: usize, last_id: i64) -> Self {
        Self {
            rows,
            bytes,
            last_id,
            ..Self::default()
        }
    }

    /// An update was handed to the writer.
    pub fn submitted(&mut self) {
        self.uncommitted += 1;
    }

    /// An update of `len` bytes was committed with log id `id`.
    pub fn committed(&mut self, id: i64, len: usize) {
        self.uncommitted = self.uncommitted.saturating_sub(1);
        self.rows += 1;
        self.bytes += len;
        self.last_id = self.last_id.max(id);
        if let Some(fold) = &mut self.folding {
            fold.rows += 1;
            fold.bytes += len;
        }
    }

    /// Whether every submitted update is committed.
    pub fn all_committed(&self) -> bool {
        self.uncommitted == 0
    }

    /// Updates handed to the writer and not yet committed.
    pub fn uncommitted(&self) -> usize {
        self.uncommitted
    }

    /// The newest log id of this room this node has seen (loaded or committed), 0 if none.
    pub fn last_id(&self) -> i64 {
        self.last_id
    }

    /// Whether a compaction is running.
    pub fn is_folding(&self) -> bool {
        self.folding.is_some()
    }

    /// Whether the log has grown past the policy and no compaction is running.
    pub fn wants_compaction(&self, policy: &CompactionPolicy) -> bool {
        !self.is_folding() && (self.rows >= policy.max_updates || self.bytes >= policy.max_bytes)
    }

    /// Whether there is anything to fold at all (for unloading).
    pub fn has_tail(&self) -> bool {
        self.rows > 0
    }

    /// A compaction starts: the store will fold whatever the log holds when it runs.
    pub fn start_fold(&mut self) {
        self.folding = Some(Fold::default());
    }

    /// The compaction finished: `Some` with what the store folded, `None` if it failed (then
    /// nothing changed and every row stays counted).
    ///
    /// The folded rows and bytes leave the count (saturating: they may include other nodes'
    /// rows), and what stays is never more than this node committed while the fold ran: every
    /// row committed before it started was visible to the compaction, so it was folded, by this
    /// compaction or by another node's.
    pub fn finish_fold(&mut self, folded: Option<Compacted>) {
        let Some(during) = self.folding.take() else {
            return;
        };
        if let Some(folded) = folded {
            self.rows = self.rows.saturating_sub(folded.rows).min(during.rows);
            self.bytes = self.bytes.saturating_sub(folded.bytes).min(during.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: CompactionPolicy = CompactionPolicy {
        max_updates: 3,
        max_bytes: 100,
    };

    #[test]
    fn compaction_is_wanted_past_the_row_threshold() {
        let mut log = LogState::default();
        for id in 1..=2 {
            log.submitted();
            log.committed(id, 10);
        }
        assert!(!log.wants_compaction(&POLICY));
        log.submitted();
        log.committed(3, 10);
        assert!(log.wants_compaction(&POLICY));
    }

    #[test]
    fn compaction_is_wanted_past_the_byte_threshold() {
        let mut log = LogState::default();
        log.submitted();
        log.committed(1, 150);
        assert!(log.wants_compaction(&POLICY));
    }

    fn folded(rows: usize, bytes: usize, upto_id: i64) -> Option<Compacted> {
        Some(Compacted {
            rows,
            bytes,
            upto_id,
        })
    }

    #[test]
    fn rows_committed_during_a_fold_stay_counted() {
        let mut log = LogState::loaded(3, 30, 7);
        log.start_fold();
        assert!(!log.wants_compaction(&POLICY), "one fold at a time");
        log.submitted();
        log.committed(9, 5);
        // The store read the log before id 9 committed: it folded the 3 loaded rows.
        log.finish_fold(folded(3, 30, 7));
        assert!(log.has_tail());
        assert!(!log.wants_compaction(&POLICY));
        assert_eq!(log.last_id(), 9);
        log.start_fold();
        log.finish_fold(folded(1, 5, 9));
        assert!(!log.has_tail());
    }

    #[test]
    fn a_row_committed_during_a_fold_and_folded_by_it_leaves_the_count() {
        let mut log = LogState::loaded(3, 30, 7);
        log.start_fold();
        log.submitted();
        log.committed(9, 5);
        // The store read the log after id 9 committed.
        log.finish_fold(folded(4, 35, 9));
        assert!(!log.has_tail());
    }

    #[test]
    fn other_nodes_rows_in_a_fold_never_underflow_the_count() {
        let mut log = LogState::loaded(2, 20, 7);
        log.start_fold();
        log.finish_fold(folded(50, 5_000, 60));
        assert!(!log.has_tail());
        assert!(!log.wants_compaction(&POLICY));
    }

    #[test]
    fn a_log_already_folded_by_another_node_resets_the_count() {
        // Another node compacted our rows first: our compaction found an empty log.
        let mut log = LogState::loaded(5, 500, 7);
        assert!(log.wants_compaction(&POLICY));
        log.start_fold();
        log.submitted();
        log.committed(20, 10);
        log.finish_fold(folded(0, 0, 12));
        assert!(
            !log.wants_compaction(&POLICY),
            "no compaction loop over rows that are gone"
        );
        assert!(
            log.has_tail(),
            "the row committed during the fold may remain"
        );
    }

    #[test]
    fn a_failed_fold_keeps_the_rows() {
        let mut log = LogState::loaded(3, 30, 7);
        log.start_fold();
        log.finish_fold(None);
        assert!(log.wants_compaction(&POLICY));
    }

    #[test]
    fn uncommitted_updates_block_all_committed() {
        let mut log = LogState::default();
        log.submitted();
        assert!(!log.all_committed());
        log.committed(1, 1);
        assert!(log.all_committed());
    }
}
