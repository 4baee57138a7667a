//! Turning an address of generated code into a typed Rust function pointer: the one place the
//! crate manufactures something callable from an integer.
//!
//! Calling an `extern "C" fn` pointer is safe Rust, so the conversion is where the promise must
//! be made (by the `unsafe` caller of [`CodeModule::entry`](crate::module::CodeModule::entry)):
//! the code at the address has this ABI and signature, and stays there while the pointer is
//! used.

mod sealed {
    pub trait Sealed {}
}

/// A function pointer type generated code may be entered as: `extern "C"` and `extern "sysv64"`
/// function pointers of up to six arguments (what fits in registers of the System V ABI).
/// Sealed: implemented here only.
pub trait EntryPoint: Copy + sealed::Sealed {
    /// The pointer to `address`.
    ///
    /// # Safety
    /// `address` is code with this pointer's ABI and signature for as long as the pointer (or a
    /// copy) may be called.
    unsafe fn from_address(address: usize) -> Self;
}

macro_rules! entry_points {
    ($($abi:literal: $(($($arg:ident),*))*;)*) => {$($(
        impl<R, $($arg),*> sealed::Sealed for extern $abi fn($($arg),*) -> R {}
        impl<R, $($arg),*> EntryPoint for extern $abi fn($($arg),*) -> R {
            unsafe fn from_address(address: usize) -> Self {
                // SAFETY: a function pointer is an address (same size as `usize` on x86-64);
                // the caller promises code of this ABI and signature lives there while the
                // pointer is used.
                unsafe { core::mem::transmute::<usize, Self>(address) }
            }
        }
    )*)*};
}

entry_points! {
    "C": () (A) (A, B) (A, B, C) (A, B, C, D) (A, B, C, D, E) (A, B, C, D, E, F);
    "sysv64": () (A) (A, B) (A, B, C) (A, B, C, D) (A, B, C, D, E) (A, B, C, D, E, F);
}
