//! Synchronization building blocks shared by the lock-free parts of codespace.
//!
//! - [`grace`]: grace periods (quiescent-state based reclamation, as RCU-sched): memory that
//!   lock-free readers or CPUs executing generated code may still use is freed only after every
//!   CPU passed a quiescent state.
//! - [`irq_lock`]: the spin lock every path reachable from interrupt context takes.
//! - `atomic` (private): the atomics these modules use — `core`'s, or `loom`'s when built with
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

    /// The lock if it is free now, else `None`; never waits.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        #[cfg(not(loom))]
        return self.inner.try_lock();
        #[cfg(loom)]
        return self.inner.try_lock().ok();
    }

    /// The value, through exclusive access (no locking needed).
    pub(crate) fn get_mut(&mut self) -> &mut T {
        #[cfg(not(loom))]
        return self.inner.get_mut();
        #[cfg(loom)]
        return self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
    }
}

/// The guard of [`Mutex`].
#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = spin::MutexGuard<'a, T>;
/// The guard of [`Mutex`] (loom's modelled lock).
#[cfg(loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

/// A busy-wait pause: the CPU's spin-loop hint, or under loom a yield, so a model whose thread
/// waits for another makes progress.
#[inline]
pub(crate) fn spin_wait() {
    #[cfg(not(loom))]
    core::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
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
