//! Memory for a guest: dlmalloc (what Rust's std uses on wasm) as the
//! global allocator, and the `cabi_realloc` export through which the host
//! copies strings and lists into the guest. Without std nothing else
//! provides either.

#[cfg(target_family = "wasm")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

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
