//! The ISA for the kernel the crate runs in: what `cranelift_native::builder` (std-only: it
//! asks the host's CPUID through `std`) gives a hosted JIT.

use core::str::FromStr;

use cranelift_codegen::isa;
use target_lexicon::Triple;

/// An ISA builder for `x86_64-unknown-none` (System V calls, as `extern "C"` in a kernel),
/// with no ISA extension beyond the x86-64 baseline. Finish it with flags that keep `is_pic`
/// off (calls to module functions must be `call rel32`, which codespace aims at jump-table
/// slots) and, in a kernel with fixed stacks, `enable_probestack` off.
///
/// # Errors
/// When Cranelift was built without its x86 backend (the reason, like `cranelift_native`).
pub fn builder() -> Result<isa::Builder, &'static str> {
    let triple = Triple::from_str("x86_64-unknown-none").map_err(|_| "x86_64-unknown-none")?;
    isa::lookup(triple).map_err(|_| "Cranelift was built without the x86 backend")
}
