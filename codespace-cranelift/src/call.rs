//! Calling finalized code: the typed way in, instead of `get_finalized_function` and a
//! `transmute`. Integer arguments in registers, through the function's jump-table slot and the
//! kernel's entry, so a trap comes back as an error naming Cranelift's trap code.

use cranelift_codegen::entity::EntityRef;
use cranelift_codegen::ir::{types, ArgumentPurpose, Signature, Type};
use cranelift_codegen::isa::CallConv;

use codespace::mmu::Mmu;
use codespace::trap::TrapVector;

use crate::error::{CallError, Trap};
use crate::jit::JITModule;
use crate::kernel::Exit;
use crate::module::FuncId;

/// Arguments that go in registers under System V.
const MAX_ARGS: usize = 6;

/// An integer type passed in one general-purpose register, and the mask of its bits.
fn register_int(ty: Type) -> Option<u64> {
    match ty {
        types::I8 => Some(0xFF),
        types::I16 => Some(0xFFFF),
        types::I32 => Some(0xFFFF_FFFF),
        types::I64 => Some(u64::MAX),
        _ => None,
    }
}

/// How a function is called with integer registers: its parameter count and the bits of its
/// result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallShape {
    pub params: usize,
    pub result_mask: u64,
}

impl CallShape {
    /// `sig`'s shape, when it takes at most six integers and returns at most one, per System V.
    pub fn of(sig: &Signature) -> Option<Self> {
        let integers = sig
            .params
            .iter()
            .all(|p| p.purpose == ArgumentPurpose::Normal && register_int(p.value_type).is_some());
        let result_mask = match sig.returns.as_slice() {
            [] => Some(0),
            [r] if r.purpose == ArgumentPurpose::Normal => register_int(r.value_type),
            _ => None,
        }?;
        (integers && sig.params.len() <= MAX_ARGS && sig.call_conv == CallConv::SystemV).then_some(
            CallShape {
                params: sig.params.len(),
                result_mask,
            },
        )
    }
}

impl<M: Mmu + Send + 'static> JITModule<M> {
    /// Calls finalized function `id` with integer `args`, through its jump-table slot (its
    /// current definition) and the kernel's [`enter`](crate::Kernel::enter), on the calling CPU.
    /// Returns its result (0 when it returns nothing), truncated to the return type.
    ///
    /// # Errors
    /// [`CallError::NotFinalized`], [`CallError::UnsupportedSignature`] (more than six
    /// parameters, a non-integer one, more than one return value, a calling convention other
    /// than System V), [`CallError::ArgumentCount`] — checked before calling;
    /// [`CallError::Trap`] when the code trapped and its landing pad unwound to here.
    ///
    /// # Safety
    /// Cranelift IR is not memory-safe: the function (and everything it calls) must do only
    /// what the caller may do — its loads and stores hit memory it may access or trap at a
    /// recorded trap site, and the kernel functions it imports are called per their contracts.
    pub unsafe fn call(&self, id: FuncId, args: &[u64]) -> Result<u64, CallError> {
        let not_finalized = CallError::NotFinalized(id);
        let state = self.functions.get(id.index()).ok_or(not_finalized)?;
        if state.finalized.is_none() {
            return Err(not_finalized);
        }
        let shape = state.shape.ok_or(CallError::UnsupportedSignature(id))?;
        if args.len() != shape.params {
            return Err(CallError::ArgumentCount {
                expected: shape.params,
                given: args.len(),
            });
        }
        let mask = shape.result_mask;
        let entry = self.slot_address(id).ok_or(not_finalized)?;
        // SAFETY: the slot leads to this module's code for `id`, compiled by Cranelift for
        // System V with the signature just checked (integer arguments in registers, at most
        // one integer result), whose trap sites land at the kernel's landing pad; the caller
        // vouches for what the code does.
        match unsafe { self.kernel.enter(entry, args) } {
            Exit::Returned(value) => Ok(value & mask),
            Exit::Trapped { pc, fault_address } => {
                Err(CallError::Trap(self.trap_at(pc, fault_address)))
            }
            Exit::Other(status) => Err(CallError::Aborted(status)),
        }
    }

    /// The trap record of the instruction at `pc`, if it is one of this module's.
    fn trap_at(&self, pc: usize, fault_address: u64) -> Trap {
        let site = self
            .trap_sites
            .range(..=pc)
            .next_back()
            .and_then(|(&start, sites)| {
                let offset = u32::try_from(pc - start).ok()?;
                sites
                    .binary_search_by_key(&offset, |s| s.offset)
                    .ok()
                    .map(|i| sites[i])
            });
        Trap {
            pc,
            code: site.map(|s| s.code),
            fault_address: match site {
                Some(s) if s.vector != TrapVector::PageFault => None,
                _ => Some(fault_address),
            },
        }
    }
}
