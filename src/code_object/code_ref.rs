//! The liveness count's results and its guard.

use super::*;

/// Result of [`CodeObject::dec_ref`].
#[must_use = "the caller that sees `Dead` must free the code"]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DecRef {
    /// References remain.
    Alive,
    /// This call dropped the last reference: the object is now dying and the caller frees it.
    /// Exactly one `dec_ref` per object returns this.
    Dead,
    /// The object was dying already: an unbalanced `dec_ref`. Nothing changed.
    AlreadyDying,
}

/// A counted reference to a [`CodeObject`]'s code, from [`CodeObject::hold`]: while it lives the
/// code is not retired (a module retires code only once its count reached zero); dropping it,
/// or [`release`](Self::release), gives the reference back exactly once.
///
/// It keeps the code's metadata and its count, not its memory past its module's drop: a dropped
/// module frees all its code once its grace period is over, whatever references are still
/// out. A task that runs the code (or keeps a pointer into it across a possible preemption)
/// takes a [`GraceHold`](crate::sync::grace::GraceHold), which is what keeps that grace period
/// open.
#[derive(Debug)]
pub struct CodeRef {
    pub(super) object: Arc<CodeObject>,
}

impl CodeRef {
    /// The object this reference counts in (its metadata stays alive; see [`CodeRef`] for
    /// its code).
    #[must_use]
    pub fn object(&self) -> &Arc<CodeObject> {
        &self.object
    }

    /// Gives the reference back now; tells whether it was the last
    /// ([`DecRef::Dead`]: the code's owner may retire it, e.g. a module's
    /// [`free_dead_code`](crate::module::CodeModule::free_dead_code)).
    pub fn release(self) -> DecRef {
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: `this` holds one reference, taken by `hold`, and is consumed here without
        // running its `Drop`, so it is given back exactly once.
        let result = unsafe { this.object.dec_ref() };
        // SAFETY: `this` is never used or dropped again; the `Arc` is moved out exactly once.
        drop(unsafe { core::ptr::read(&this.object) });
        result
    }
}

impl core::ops::Deref for CodeRef {
    type Target = CodeObject;
    fn deref(&self) -> &CodeObject {
        &self.object
    }
}

impl Drop for CodeRef {
    fn drop(&mut self) {
        // SAFETY: the guard holds one reference, taken by `hold`; `Drop` runs once, and
        // `release` (the other way out) skips it.
        let _ = unsafe { self.object.dec_ref() };
    }
}
