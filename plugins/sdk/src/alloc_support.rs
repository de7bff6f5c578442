//! Memory for a guest, fit for instances that live for one request: a bump
//! arena in the module's own zero-initialised memory, then dlmalloc (what
//! Rust's std uses on wasm) once the arena is used up; and the
//! `cabi_realloc` export through which the host copies strings and lists
//! into the guest. Without std nothing else provides either.
//!
//! Why an arena: dlmalloc takes its memory with `memory.grow`, so a fresh
//! instance's first allocation grows its memory, which costs the host two
//! `mprotect` calls per instance (growing it, and shrinking it back when the
//! pool slot is reused). The arena is part of the initial memory: a request
//! that fits in it never grows memory. Memory freed in the arena is reused
//! only when it was the latest allocation (the common pattern of short-lived
//! strings); a reused instance that outgrows the arena moves to dlmalloc.

#[cfg(target_family = "wasm")]
mod arena {
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::{Cell, UnsafeCell};

    /// Sized so the 1 MiB stack, the data and the arena stay within the
    /// low memory Larder keeps resident between instances (2 MiB).
    const ARENA_BYTES: usize = 512 * 1024;

    #[repr(C, align(16))]
    struct Bytes(UnsafeCell<[u8; ARENA_BYTES]>);

    pub struct Allocator {
        arena: Bytes,
        /// Offset of the first free byte of the arena.
        next: Cell<usize>,
        fallback: dlmalloc::GlobalDlmalloc,
    }

    // SAFETY: a wasm32 guest instance runs on one thread.
    unsafe impl Sync for Allocator {}

    impl Allocator {
        const fn new() -> Self {
            Self {
                arena: Bytes(UnsafeCell::new([0; ARENA_BYTES])),
                next: Cell::new(0),
                fallback: dlmalloc::GlobalDlmalloc,
            }
        }

        fn base(&self) -> usize {
            self.arena.0.get() as usize
        }

        fn owns(&self, ptr: *mut u8) -> bool {
            let at = ptr as usize;
            at >= self.base() && at < self.base() + ARENA_BYTES
        }

        /// A block of the arena, if `layout` still fits.
        fn bump(&self, layout: Layout) -> Option<*mut u8> {
            let base = self.base();
            let start = (base + self.next.get()).checked_next_multiple_of(layout.align())?;
            let end = start.checked_add(layout.size())?;
            if end > base + ARENA_BYTES {
                return None;
            }
            self.next.set(end - base);
            Some(start as *mut u8)
        }

        /// Whether `ptr..ptr+size` is the latest block handed out.
        fn is_last(&self, ptr: *mut u8, size: usize) -> bool {
            ptr as usize + size == self.base() + self.next.get()
        }
    }

    unsafe impl GlobalAlloc for Allocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            match self.bump(layout) {
                Some(ptr) => ptr,
                // SAFETY: forwarded as the caller gave it.
                None => unsafe { self.fallback.alloc(layout) },
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if self.owns(ptr) {
                if self.is_last(ptr, layout.size()) {
                    self.next.set(ptr as usize - self.base());
                }
            } else {
                // SAFETY: a block dlmalloc handed out, as the caller promises.
                unsafe { self.fallback.dealloc(ptr, layout) }
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if !self.owns(ptr) {
                // SAFETY: a block dlmalloc handed out, as the caller promises.
                return unsafe { self.fallback.realloc(ptr, layout, new_size) };
            }
            // The latest block grows or shrinks in place while it fits.
            if self.is_last(ptr, layout.size()) {
                let end = ptr as usize + new_size;
                if end <= self.base() + ARENA_BYTES {
                    self.next.set(end - self.base());
                    return ptr;
                }
            } else if new_size <= layout.size() {
                return ptr;
            }
            // SAFETY: `layout` with `new_size` is valid as the caller
            // promises; the old block is live and `layout.size()` long.
            unsafe {
                let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Allocator = Allocator::new();
}

/// The canonical ABI's allocation entry point: `old_len == 0` allocates,
/// anything else reallocates. Out of memory traps (the host reports it as
/// the plugin's memory limit).
///
/// # Safety
/// Called by the host only, with a pointer this function returned before
/// (or null with `old_len == 0`) and a power-of-two `align`.
#[cfg(target_family = "wasm")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{Layout, alloc, realloc};
    if new_len == 0 {
        // A zero-sized value needs no memory, only an aligned address.
        return align as *mut u8;
    }
    // SAFETY: the canonical ABI passes a power-of-two alignment and sizes
    // that fit the 32-bit address space, and `old_ptr` came from here.
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable();
    }
    ptr
}

// `memcmp`, `memcpy` and friends: without std nothing links the C library
// that provides them on wasm32-wasip2. Only the objects that define them
// are taken from it; they import nothing.
#[cfg(target_os = "wasi")]
#[link(name = "c")]
unsafe extern "C" {}
