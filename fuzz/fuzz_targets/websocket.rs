//! The WebSocket reader (`tandem::ws::inbound`): a client's bytes, cut into reads at arbitrary
//! points, must give the same messages (or the same error) however they are cut, never panic,
//! never hold more than the frame or message in progress, and respect the size limit.
//!
//! Input: byte 0 picks the message size limit, byte 1 seeds where the reads are cut; the rest
//! is the stream.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use tandem::ws::inbound::Inbound;
use tandem::ws::{Incoming, ReadError};

/// Feeds `stream` in reads whose lengths come from `cuts`; stops at the first error.
fn read(
    max: usize,
    stream: &[u8],
    mut cuts: impl Iterator<Item = usize>,
) -> (Vec<Incoming>, Option<ReadError>) {
    let mut inbound = Inbound::new(max);
    let mut out = VecDeque::new();
    let mut at = 0;
    while at < stream.len() {
        let n = cuts.next().unwrap_or(stream.len()).clamp(1, stream.len() - at);
        let mut piece = stream[at..at + n].to_vec();
        at += n;
        if let Err(e) = inbound.feed(&mut piece, &mut out) {
            return (out.into(), Some(e));
        }
        // Kept between reads: at most the frame in progress (a control frame, or a data frame
        // within the limit, with a header of at most 14 bytes) and the message in progress,
        // each with a vector's slack, or the bytes just read.
        assert!(
            inbound.held() <= 4 * (max + 139) + 2 * n + (1 << 20),
            "{} held",
            inbound.held()
        );
    }
    for message in &out {
        if let Incoming::Binary(b) = message {
            assert!(b.len() <= max);
        }
    }
    (out.into(), None)
}

fuzz_target!(|data: &[u8]| {
    let [limit, seed, stream @ ..] = data else {
        return;
    };
    let max = [0usize, 1, 125, 126, 1000, 65_536, 1 << 20][usize::from(*limit) % 7];
    let whole = read(max, stream, std::iter::empty());
    let mut state = u32::from(*seed) | 1;
    let cuts = std::iter::from_fn(move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        Some((state % 23) as usize + 1)
    });
    let cut = read(max, stream, cuts);
    let single = read(max, stream, std::iter::repeat(1));
    // Errors are found at the same frame however the bytes come; messages before it are
    // the same.
    assert_eq!(whole, cut);
    assert_eq!(whole, single);
});
