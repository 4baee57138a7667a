//! What a range index stores: owned values kept as one thin pointer each.

use alloc::sync::Arc;
use core::marker::PhantomData;
use core::ops::Deref;
use core::ptr::NonNull;

/// A value type of [`RangeIndex`](super::RangeIndex): an owning pointer the index keeps as a raw
/// thin pointer in its leaves, and a borrowed view readers get from it.
///
/// # Safety
///
/// `from_raw(into_raw(v))` gives `v` back; the pointee does not move and stays valid until that
/// value is dropped; `view` only reads through the pointer (readers on several CPUs call it at
/// once, and while the writer moves the raw pointer between nodes).
pub(crate) unsafe trait IndexValue: Send + Sync + Sized {
    /// What readers see of a value, borrowed for `'a`.
    type View<'a>: Copy
    where
        Self: 'a;

    /// Gives up ownership: the index owns the value through the pointer from now on.
    fn into_raw(self) -> NonNull<()>;

    /// Takes ownership back.
    ///
    /// # Safety
    /// `p` came from [`into_raw`](Self::into_raw) and is turned back only once.
    unsafe fn from_raw(p: NonNull<()>) -> Self;

    /// Borrows the value behind `p`.
    ///
    /// # Safety
    /// `p` came from [`into_raw`](Self::into_raw) and the value is not dropped during `'a`.
    unsafe fn view<'a>(p: NonNull<()>) -> Self::View<'a>;

    /// End (exclusive) of the address range the value covers when it starts at `start`.
    fn end(view: Self::View<'_>, start: usize) -> usize;

    /// Heap bytes the value owns exclusively (memory accounting; 0 for shared values).
    fn heap_bytes(view: Self::View<'_>) -> usize;
}

/// Something with an address range, shared through an `Arc` (code objects in the code map).
pub(crate) trait HasRange: Send + Sync {
    /// Its end, given its start (the index key).
    fn range_end(&self, start: usize) -> usize;
}

/// A value of an index of `Arc<T>`s, borrowed from the index: dereferences to `T`, and
/// [`to_arc`](Self::to_arc) takes a counted reference of its own.
pub(crate) struct ArcView<'a, T> {
    ptr: NonNull<T>,
    _borrow: PhantomData<&'a T>,
}

impl<T> Clone for ArcView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for ArcView<'_, T> {}

impl<T> Deref for ArcView<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the index owns a strong count on the `Arc` for `'a` (see `IndexValue::view`).
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> ArcView<'_, T> {
    /// A strong reference of the caller's own: one atomic increment, no allocation.
    pub(crate) fn to_arc(self) -> Arc<T> {
        // SAFETY: `ptr` came from `Arc::into_raw` and the index keeps that strong count alive for
        // `'a`, so the count is at least 1 while we add ours.
        unsafe {
            Arc::increment_strong_count(self.ptr.as_ptr());
            Arc::from_raw(self.ptr.as_ptr())
        }
    }
}

// SAFETY: `Arc::into_raw`/`from_raw` round-trip and the `Arc` allocation never moves; the view
// only reads, and is valid while the `Arc` the index owns is alive.
unsafe impl<T: HasRange> IndexValue for Arc<T> {
    type View<'a>
        = ArcView<'a, T>
    where
        T: 'a;

    fn into_raw(self) -> NonNull<()> {
        let p = Arc::into_raw(self).cast_mut().cast::<()>();
        // SAFETY: `Arc::into_raw` never returns null.
        unsafe { NonNull::new_unchecked(p) }
    }

    unsafe fn from_raw(p: NonNull<()>) -> Self {
        // SAFETY: `p` came from `Arc::into_raw` (caller) and is turned back once.
        unsafe { Arc::from_raw(p.as_ptr().cast_const().cast::<T>()) }
    }

    unsafe fn view<'a>(p: NonNull<()>) -> ArcView<'a, T> {
        ArcView {
            ptr: p.cast::<T>(),
            _borrow: PhantomData,
        }
    }

    fn end(view: ArcView<'_, T>, start: usize) -> usize {
        view.range_end(start)
    }

    fn heap_bytes(_: ArcView<'_, T>) -> usize {
        0
    }
}
