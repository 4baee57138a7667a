//! Cranelift IR in, codespace's `NewCode` parts out: machine code with a landing pad appended,
//! protected instructions, jump-table relocations and source positions. Reading Cranelift's
//! buffer is `codespace_cranelift::CompiledFunction`'s; this file maps what it read onto this
//! glue's namespaces (module index = slot, host table) and trap policy.
//!
//! # Relocation mapping
//!
//! Functions name their callees with `UserExternalName { namespace, index }`:
//!
//! | Cranelift | meaning | codespace |
//! | --- | --- | --- |
//! | `X86CallPCRel4` (addend −4) on `call`/`jmp` rel32 to namespace [`MODULE`] | call of module function `index` | `RelocKind::CallSlot { slot: index }`: the calling code space's jump-table slot |
//! | `Abs8` to namespace [`HOST`] | `movabs r, <kernel function>; call r` (not colocated) | resolved here: the kernel's address is absolute, so it is written into the bytes before codespace copies them |
//! | anything else (GOT, libcalls, a module function's address, TLS, ...) | | [`JitError::UnsupportedRelocation`] |
//!
//! A module index past the module's functions, a host index past the host table, or another
//! namespace is [`JitError::UnknownFunction`]. Trap records with `HEAP_OUT_OF_BOUNDS` (loads and
//! stores on the linear memory) become protected instructions; other trap codes (explicit traps,
//! division by zero: not page faults) are [`JitError::UnsupportedTrap`].

use alloc::boxed::Box;
use alloc::string::ToString;
use alloc::vec::Vec;

use codespace::code_object::{RelocKind, Relocation};
use codespace_cranelift::{self as cranelift, FuncId, ModuleRelocTarget};
use cranelift_codegen::binemit::Reloc;
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::{Function, TrapCode};
use cranelift_codegen::{CodegenError, Context};

use super::enter::trap_landing_address;
use super::isa::{isa, OptLevel};
use super::stack::on_compile_stack;
use super::JitError;

/// `UserExternalName` namespace of module functions (index = function index = jump-table slot).
pub const MODULE: u32 = 0;
/// `UserExternalName` namespace of kernel (host) functions (index into [`Linkage::host`]).
pub const HOST: u32 = 1;

/// A kernel function generated code may call.
#[derive(Debug, Clone, Copy)]
pub struct HostFunction {
    /// Name, for reports.
    pub name: &'static str,
    /// Its address (an `extern "C"` function of the kernel).
    pub address: usize,
}

/// What the callees of a function may be.
#[derive(Debug, Clone, Copy)]
pub struct Linkage<'a> {
    /// Number of module functions (jump-table slots).
    pub functions: u32,
    /// Kernel functions, by index.
    pub host: &'a [HostFunction],
}

/// `jmp qword ptr [rip+0]` followed by the 8-byte target: the landing pad.
const LANDING_PAD_SIZE: usize = 14;

/// A compiled function, ready for `CodeModule::add_code`. Only [`Compiler::compile`] makes one,
/// so installed code always has the ABI and landing pads that calling it safely relies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledFunction {
    bytes: Vec<u8>,
    code_size: usize,
    relocations: Vec<Relocation>,
    protected: Vec<u32>,
    landing_pad: Option<u32>,
    source_positions: Vec<(u32, u32)>,
    params: usize,
}

impl CompiledFunction {
    /// Machine code, then the landing pad when there are protected instructions.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Bytes Cranelift emitted (the landing pad follows).
    #[must_use]
    pub fn code_size(&self) -> usize {
        self.code_size
    }

    /// Jump-table relocations (`CallSlot`).
    #[must_use]
    pub fn relocations(&self) -> &[Relocation] {
        &self.relocations
    }

    /// Offsets of loads and stores that may fault on a guard page.
    #[must_use]
    pub fn protected(&self) -> &[u32] {
        &self.protected
    }

    /// Offset of the landing pad, when there are protected instructions.
    #[must_use]
    pub fn landing_pad(&self) -> Option<u32> {
        self.landing_pad
    }

    /// `(pc_offset, source_location)`, sorted, from the IR's source locations.
    #[must_use]
    pub fn source_positions(&self) -> &[(u32, u32)] {
        &self.source_positions
    }

    /// Integer parameters of the function (calls check the argument count).
    #[must_use]
    pub fn params(&self) -> usize {
        self.params
    }
}

/// Compiles functions; keeps Cranelift's context between functions so its allocations are
/// reused (what a JIT compiling many functions does).
pub struct Compiler {
    /// Boxed: Cranelift's context is tens of KiB by value (register-allocator state included),
    /// too much to move around on a kernel stack.
    ctx: Box<Context>,
    ctrl: ControlPlane,
}

impl Default for Compiler {
    fn default() -> Self {
        Compiler {
            ctx: Box::new(Context::new()),
            ctrl: ControlPlane::default(),
        }
    }
}

impl core::fmt::Debug for Compiler {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Compiler").finish_non_exhaustive()
    }
}

impl Compiler {
    /// A compiler with an empty context.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Verifies and compiles `func` at `opt`, maps its relocations and traps, and appends the
    /// landing pad.
    ///
    /// # Errors
    /// Verifier and code-generation failures, unsupported types, relocations and traps, unknown
    /// callees (see the module documentation).
    pub fn compile(
        &mut self,
        func: Function,
        opt: OptLevel,
        linkage: &Linkage<'_>,
    ) -> Result<CompiledFunction, JitError> {
        let isa = isa(opt)?;
        self.ctx.clear();
        self.ctx.func = func;
        check_types(&self.ctx.func)?;
        let params = self.ctx.func.signature.params.len();
        let (ctx, ctrl) = (&mut *self.ctx, &mut self.ctrl);
        on_compile_stack(|| {
            ctx.compile(&**isa, ctrl)
                .map(|_| ())
                .map_err(|e| match e.inner {
                    CodegenError::Verifier(errors) => JitError::Verifier(errors.to_string()),
                    other => JitError::Codegen(other.to_string()),
                })
        })??;
        let compiled = self
            .ctx
            .compiled_code()
            .ok_or_else(|| JitError::Codegen("no code after compiling".to_string()))?;
        // The bytes, relocations, trap records and source positions, as codespace_cranelift
        // reads them out of Cranelift's buffer; what follows maps them onto this glue's
        // namespaces.
        let parts = cranelift::CompiledFunction::new(FuncId::from_u32(0), &self.ctx.func, compiled);
        let mut bytes = parts.bytes;
        let code_size = bytes.len();

        let mut relocations = Vec::new();
        for r in &parts.relocs {
            let unsupported = JitError::UnsupportedRelocation {
                kind: r.kind,
                offset: r.offset,
            };
            let ModuleRelocTarget::User { namespace, index } = r.name else {
                return Err(unsupported);
            };
            let unknown = JitError::UnknownFunction { namespace, index };
            match (namespace, r.kind) {
                (MODULE, _) if index >= linkage.functions => return Err(unknown),
                (HOST, _) if index as usize >= linkage.host.len() => return Err(unknown),
                (MODULE, Reloc::X86CallPCRel4) => {
                    // Only a rel32 `call` or `jmp` (tail call) can go through a slot; the same
                    // relocation on `lea` takes the function's address, which a slot is not.
                    let opcode = (r.offset as usize)
                        .checked_sub(1)
                        .and_then(|o| bytes.get(o).copied());
                    if r.addend != -4 || !matches!(opcode, Some(0xE8 | 0xE9)) {
                        return Err(unsupported);
                    }
                    relocations.push(Relocation {
                        offset: r.offset,
                        kind: RelocKind::CallSlot { slot: index },
                    });
                }
                (HOST, Reloc::Abs8) => {
                    let host = linkage.host[index as usize];
                    let value = (host.address as u64).wrapping_add(r.addend as u64);
                    let at = r.offset as usize;
                    bytes
                        .get_mut(at..at + 8)
                        .ok_or(unsupported)?
                        .copy_from_slice(&value.to_le_bytes());
                }
                (MODULE | HOST, _) => return Err(unsupported),
                _ => return Err(unknown),
            }
        }

        // Only guard-page faults land here (`parts.traps` is sorted, one record per offset).
        let mut protected = Vec::new();
        for t in &parts.traps {
            if t.code != TrapCode::HEAP_OUT_OF_BOUNDS {
                return Err(JitError::UnsupportedTrap {
                    code: t.code,
                    offset: t.offset,
                });
            }
            protected.push(t.offset);
        }
        let source_positions = parts.source_positions;

        let landing_pad = if protected.is_empty() {
            None
        } else {
            let at = bytes.len();
            bytes.extend_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
            bytes.extend_from_slice(&(trap_landing_address() as u64).to_le_bytes());
            debug_assert_eq!(bytes.len() - at, LANDING_PAD_SIZE);
            Some(at as u32)
        };
        Ok(CompiledFunction {
            bytes,
            code_size,
            relocations,
            protected,
            landing_pad,
            source_positions,
            params,
        })
    }
}

/// Rejects float and vector values: this kernel runs with SSE off.
fn check_types(func: &Function) -> Result<(), JitError> {
    let sig = &func.signature;
    let types = sig
        .params
        .iter()
        .chain(&sig.returns)
        .map(|p| p.value_type)
        .chain(func.dfg.values().map(|v| func.dfg.value_type(v)));
    for ty in types {
        if !ty.is_int() {
            return Err(JitError::UnsupportedType { ty: ty.to_string() });
        }
    }
    Ok(())
}
