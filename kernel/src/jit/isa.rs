//! The target Cranelift compiles for: x86-64 with no operating system, the kernel's own ABI.

use alloc::string::ToString;
use cranelift_codegen::isa::{OwnedTargetIsa, TargetFrontendConfig};
use cranelift_codegen::settings::{self, Configurable};
use spin::Once;

use super::JitError;

/// How hard Cranelift optimises: the two tiers of a tiering JIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptLevel {
    /// No mid-end optimisation (the baseline tier: fastest to compile).
    None,
    /// The e-graph mid-end and its rewrites (the optimising tier).
    Speed,
}

impl OptLevel {
    fn setting(self) -> &'static str {
        match self {
            OptLevel::None => "none",
            OptLevel::Speed => "speed",
        }
    }
}

static BASELINE: Once<OwnedTargetIsa> = Once::new();
static OPTIMISING: Once<OwnedTargetIsa> = Once::new();

/// The ISA for `opt`, built once and shared (a `TargetIsa` is immutable and `Sync`).
///
/// Settings, and why:
/// - triple `x86_64-unknown-none`: System V calls, as `extern "C"` in this kernel;
/// - `is_pic` off: calls to other module functions are `call rel32` (`X86CallPCRel4`), which
///   codespace aims at the calling space's jump-table slot; calls into the kernel load the
///   absolute address (`Abs8`). With PIC they would go through a GOT, which codespace has no
///   notion of;
/// - `enable_verifier` on: bad IR is a typed error, never undefined behaviour;
/// - `enable_probestack` off: kernel stacks are fixed, there is no guard-page probing protocol;
/// - `unwind_info` off: unwinding is the landing pad's job (see `enter`);
/// - `preserve_frame_pointers` on: a fault report's RBP chain walks through generated frames;
/// - no ISA extensions beyond x86-64 baseline (what QEMU's `qemu64` CPU has).
///
/// # Errors
/// [`JitError::Codegen`] when Cranelift rejects the settings (a build without the x86 backend).
pub fn isa(opt: OptLevel) -> Result<&'static OwnedTargetIsa, JitError> {
    let cell = match opt {
        OptLevel::None => &BASELINE,
        OptLevel::Speed => &OPTIMISING,
    };
    if let Some(isa) = cell.get() {
        return Ok(isa);
    }
    let built = build(opt)?;
    Ok(cell.call_once(|| built))
}

fn build(opt: OptLevel) -> Result<OwnedTargetIsa, JitError> {
    let codegen = |e: &dyn core::fmt::Display| JitError::Codegen(e.to_string());
    let mut flags = settings::builder();
    for (name, value) in [
        ("opt_level", opt.setting()),
        ("is_pic", "false"),
        ("enable_verifier", "true"),
        ("enable_probestack", "false"),
        ("unwind_info", "false"),
        ("preserve_frame_pointers", "true"),
    ] {
        flags.set(name, value).map_err(|e| codegen(&e))?;
    }
    codespace_cranelift::native::builder()
        .map_err(|e| codegen(&e))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| codegen(&e))
}

/// What `cranelift-frontend` needs to know about the target (call convention, pointer width).
///
/// # Errors
/// As [`isa`].
pub fn frontend_config() -> Result<TargetFrontendConfig, JitError> {
    Ok(isa(OptLevel::None)?.frontend_config())
}
