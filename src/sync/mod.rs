//! Synchronization building blocks shared by the lock-free parts of codespace.
//!
//! - [`grace`]: grace periods (quiescent-state based reclamation, as RCU-sched): memory that
//!   lock-free readers or CPUs executing generated code may still use is freed only after every
//!   CPU passed a quiescent state.
//! - [`atomic`]: the atomics these modules use — `core`'s, or `loom`'s when built with
//!   `RUSTFLAGS="--cfg loom"` so the protocols can be model-checked.

pub mod grace;
pub mod irq_lock;

/// `core::sync::atomic`, or loom's model of it under `cfg(loom)`.
pub(crate) mod atomic {
    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{
        fence, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
    };

    #[cfg(not(loom))]
    pub(crate) use core::sync::atomic::{
        fence, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
    };
}

/// A spin lock (`spin::Mutex`), or loom's model of a lock under `cfg(loom)` (loom cannot see
/// a spin loop over `core` atomics, so a contended spin lock would never yield in a model).
#[derive(Debug, Default)]
pub(crate) struct Mutex<T> {
    #[cfg(not(loom))]
    inner: spin::Mutex<T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
}

impl<T> Mutex<T> {
    #[cfg(not(loom))]
    pub(crate) const fn new(value: T) -> Self {
        Mutex {
            inner: spin::Mutex::new(value),
        }
    }

    #[cfg(loom)]
    pub(crate) fn new(value: T) -> Self {
        Mutex {
            inner: loom::sync::Mutex::new(value),
        }
    }

    /// Locks, spinning while another holder has it.
    #[cfg(not(loom))]
    pub(crate) fn lock(&self) -> spin::MutexGuard<'_, T> {
        self.inner.lock()
    }

    /// Locks (loom: a modelled lock; poisoning cannot happen in the models).
    #[cfg(loom)]
    pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A value alone on its cache line, so CPUs writing neighbouring values never false-share.
#[repr(align(64))]
#[derive(Debug, Default)]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> core::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
