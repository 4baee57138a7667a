//! Synchronization building blocks shared by the lock-free parts of codespace.
//!
//! - [`grace`]: grace periods (quiescent-state based reclamation, as RCU-sched): memory that
//!   lock-free readers or CPUs executing generated code may still use is freed only after every
//!   CPU passed a quiescent state.
//! - [`atomic`]: the atomics these modules use — `core`'s, or `loom`'s when built with
//!   `RUSTFLAGS="--cfg loom"` so the protocols can be model-checked.

pub mod grace;

/// `core::sync::atomic`, or loom's model of it under `cfg(loom)`.
pub(crate) mod atomic {
    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{fence, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

    #[cfg(not(loom))]
    pub(crate) use core::sync::atomic::{fence, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
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
