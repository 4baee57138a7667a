//! The 19 C-ABI hooks wasmtime's `custom` platform imports (`src/runtime/vm/sys/custom/capi.rs`
//! in wasmtime 48.0.8), each in terms of the installed [`Platform`](crate::Platform).
//!
//! Statuses: 0 on success, else [`MemoryError::code`](crate::MemoryError::code).

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::memory::{access, check_range, status};
use crate::traps::TrapHandler;
use crate::{platform, sync};

/// wasmtime's opaque `wasmtime_memory_image`: never created (no copy-on-write images).
pub enum MemoryImage {}

#[no_mangle]
extern "C" fn wasmtime_mmap_new(size: usize, prot_flags: u32, ret: &mut *mut u8) -> i32 {
    let result = access(prot_flags).and_then(|access| {
        check_range(0, size)?;
        platform().reserve(size, access)
    });
    match result {
        Ok(ptr) => {
            *ret = ptr.as_ptr();
            0
        }
        Err(e) => e.code(),
    }
}

#[no_mangle]
extern "C" fn wasmtime_mmap_remap(addr: *mut u8, size: usize, prot_flags: u32) -> i32 {
    status(access(prot_flags).and_then(|access| {
        check_range(addr as usize, size)?;
        // SAFETY: wasmtime owns the range (it got it from `wasmtime_mmap_new`) and asks for
        // its contents to be replaced.
        unsafe { platform().discard(addr as usize, size, access) }
    }))
}

#[no_mangle]
extern "C" fn wasmtime_munmap(ptr: *mut u8, size: usize) -> i32 {
    status(check_range(ptr as usize, size).and_then(|()| {
        // SAFETY: wasmtime unmaps only what it mapped and no longer uses.
        unsafe { platform().release(ptr as usize, size) }
    }))
}

#[no_mangle]
extern "C" fn wasmtime_mprotect(ptr: *mut u8, size: usize, prot_flags: u32) -> i32 {
    status(access(prot_flags).and_then(|access| {
        check_range(ptr as usize, size)?;
        // SAFETY: wasmtime owns the range and chose its new access.
        unsafe { platform().set_access(ptr as usize, size, access) }
    }))
}

#[no_mangle]
extern "C" fn wasmtime_page_size() -> usize {
    platform().page_size()
}

#[no_mangle]
extern "C" fn wasmtime_init_traps(handler: TrapHandler) -> i32 {
    crate::traps::set_handler(handler);
    0
}

/// Declines every image (storing null is "no image, no failure"): linear memories are then
/// initialized by copying, never by copy-on-write mappings.
#[no_mangle]
extern "C" fn wasmtime_memory_image_new(
    _ptr: *const u8,
    _len: usize,
    ret: &mut *mut MemoryImage,
) -> i32 {
    *ret = core::ptr::null_mut();
    0
}

/// Never reached: no image is ever created. Fails rather than mapping anything.
#[no_mangle]
extern "C" fn wasmtime_memory_image_map_at(
    _image: *mut MemoryImage,
    _addr: *mut u8,
    _len: usize,
) -> i32 {
    crate::MemoryError::NotReserved.code()
}

/// Nothing to free: no image is ever created.
#[no_mangle]
extern "C" fn wasmtime_memory_image_free(_image: *mut MemoryImage) {}

#[no_mangle]
extern "C" fn wasmtime_tls_get(slot: usize) -> *mut u8 {
    // Reading the calling CPU's slot: wasm calls do not migrate between CPUs (see `CpuSlots`).
    platform()
        .cpu()
        .tls
        .get(slot)
        .map_or(core::ptr::null_mut(), |s| s.load(Ordering::Relaxed))
}

#[no_mangle]
extern "C" fn wasmtime_tls_set(slot: usize, ptr: *mut u8) {
    if let Some(s) = platform().cpu().tls.get(slot) {
        s.store(ptr, Ordering::Relaxed);
    }
}

/// The lock word wasmtime hands over, as an atomic.
///
/// # Safety
/// `lock` is wasmtime's aligned, live lock word, accessed only through these hooks.
unsafe fn word<'a>(lock: *mut usize) -> &'a AtomicUsize {
    // SAFETY: the caller's contract; `AtomicUsize` has `usize`'s layout.
    unsafe { AtomicUsize::from_ptr(lock) }
}

#[no_mangle]
extern "C" fn wasmtime_sync_lock_free(_lock: *mut usize) {}

#[no_mangle]
extern "C" fn wasmtime_sync_lock_acquire(lock: *mut usize) {
    // SAFETY: wasmtime passes its lock word.
    sync::lock(platform(), unsafe { word(lock) });
}

#[no_mangle]
extern "C" fn wasmtime_sync_lock_release(lock: *mut usize) {
    // SAFETY: wasmtime passes its lock word.
    sync::unlock(platform(), unsafe { word(lock) });
}

#[no_mangle]
extern "C" fn wasmtime_sync_rwlock_read(lock: *mut usize) {
    // SAFETY: wasmtime passes its lock word.
    sync::read(platform(), unsafe { word(lock) });
}

#[no_mangle]
extern "C" fn wasmtime_sync_rwlock_read_release(lock: *mut usize) {
    // SAFETY: wasmtime passes its lock word.
    sync::read_unlock(platform(), unsafe { word(lock) });
}

#[no_mangle]
extern "C" fn wasmtime_sync_rwlock_write(lock: *mut usize) {
    // SAFETY: wasmtime passes its lock word.
    sync::write(platform(), unsafe { word(lock) });
}

#[no_mangle]
extern "C" fn wasmtime_sync_rwlock_write_release(lock: *mut usize) {
    // SAFETY: wasmtime passes its lock word.
    sync::write_unlock(platform(), unsafe { word(lock) });
}

#[no_mangle]
extern "C" fn wasmtime_sync_rwlock_free(_lock: *mut usize) {}
