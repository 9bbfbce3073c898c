//! A global allocator that counts allocation calls per thread, so a bench can print
//! allocations per forwarded packet next to its time, unaffected by other threads. A binary
//! opts in with `#[global_allocator] static A: CountingAllocator = CountingAllocator;`;
//! without that the counter stays at zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Allocation calls (alloc, alloc_zeroed and realloc) made by this thread. Const-initialised
    /// and without a destructor, so reading it never allocates and works during thread exit.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    ALLOCATIONS.with(|n| n.set(n.get() + 1));
}

/// The system allocator plus one thread-local increment per allocation call.
pub struct CountingAllocator;

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect
// on the memory handed out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A growing buffer costs an allocator call as much as a fresh one does.
        count_one();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocation calls made so far by the calling thread.
pub fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Runs `f` and returns its result with the allocation calls it made on this thread.
pub fn count_allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = allocations();
    let result = f();
    (result, allocations() - before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static COUNTING: CountingAllocator = CountingAllocator;

    #[test]
    fn counts_each_allocation_call() {
        let (kept, calls) = count_allocations(|| {
            let boxes: Vec<Box<u64>> = (0..10).map(Box::new).collect();
            std::hint::black_box(boxes)
        });
        assert_eq!(calls, 11, "10 boxes and one exactly sized Vec");
        assert_eq!(kept.len(), 10);
        let (_, none) = count_allocations(|| std::hint::black_box(3u64 + 4));
        assert_eq!(none, 0);
    }
}
