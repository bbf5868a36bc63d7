//! Decoders allocate in proportion to their input, never to what a length or count claims.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_protocol::awareness::AwarenessUpdate;
use tandem_protocol::{DecodeError, MessageReader};

/// Records the largest single allocation request made on a measuring thread.
struct MaxRequest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Only the test's own thread is measured, not the harness's threads.
    static MEASURING: Cell<bool> = const { Cell::new(false) };
}

fn record(size: usize) {
    if MEASURING.with(Cell::get) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for MaxRequest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: MaxRequest = MaxRequest;

#[test]
fn huge_claims_in_tiny_inputs_do_not_allocate() {
    // Awareness: 2^53 - 1 entries claimed, one tiny entry present.
    let awareness = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 1, 2, b'{', b'}',
    ];
    // Sync update: a 2^53 - 1 byte payload claimed.
    let update = [
        0x00, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x00,
    ];

    LARGEST.store(0, Ordering::Relaxed);
    MEASURING.with(|m| m.set(true));
    let awareness_result = AwarenessUpdate::decode(&awareness);
    let update_result = MessageReader::new(&update).next();
    MEASURING.with(|m| m.set(false));
    let largest = LARGEST.load(Ordering::Relaxed);

    assert_eq!(awareness_result, Err(DecodeError::UnexpectedEnd));
    assert_eq!(
        update_result,
        Some(Err(DecodeError::LengthTooLarge((1 << 53) - 1)))
    );
    assert!(
        largest <= 1024,
        "largest allocation {largest} bytes for a 13-byte input"
    );
}
