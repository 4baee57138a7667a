//! x86-64 jump-table slot encodings and table layout (V8-style jump tables).
//!
//! Generated code never calls other generated code directly: it calls a *slot* of a jump table,
//! and swapping the code behind a function (tier-up, lazy compilation, unloading) is one aligned
//! store into that slot. A table region holds three tables, one slot per function index:
//!
//! ```text
//! base (16-aligned)
//! | near table: n × 8 bytes  | pad to 16 | far table: n × 16 bytes | lazy table: n × 10 bytes |
//! ```
//!
//! * **Near slot** (8 bytes, 8-aligned): `E9 rel32` (`jmp rel32`, relative to the slot + 5)
//!   followed by `CC CC CC`. [`near_slot`] returns the slot as one qword: with the default
//!   [`PatchProtocol::AtomicStore`](crate::manager::PatchProtocol::AtomicStore) it is written by
//!   ONE naturally aligned 8-byte store (x86-64 makes a store inside a naturally aligned qword
//!   atomic, so a concurrent *load* sees the old or the new jump, never a torn one; what a CPU
//!   *executing* it meanwhile runs, the SDM leaves undefined); with
//!   [`PatchProtocol::Int3`](crate::manager::PatchProtocol::Int3) it is written in three steps
//!   around an INT3 first byte.
//! * **Far slot** (16 bytes, 16-aligned): `FF 25 02 00 00 00` (`jmp qword ptr [rip+2]`), `66 90`
//!   (2-byte nop), then the absolute 8-byte target at [`FAR_SLOT_TARGET_OFFSET`]. The target
//!   qword is 8-aligned and patched alone by one aligned 8-byte store.
//! * **Lazy-compile slot** (10 bytes, unaligned, written once): `68 imm32` (push the function
//!   index) then `E9 rel32` to the lazy-compile entry stub.
//!
//! # Patching
//!
//! A near jump reaches ±2 GiB. [`JumpTableLayout::patch`] encodes the update of slot `i`: near
//! slot `i` receives `jmp target` when the displacement fits in `i32` ([`SlotPatch::direct`]),
//! else `jmp far_slot(i)` after far slot `i` received the target. Only the indirect case stores
//! the far slot (first, so a caller that reaches it through the new near value finds the new
//! target); a direct patch leaves far slot `i` as it was, as V8 does. So far slot `i` holds the
//! target of slot `i` only while near slot `i` jumps to it (and after [`emit_tables`], which
//! fills every far slot): nothing may read a far slot's target as the slot's target otherwise.
//! How the near slot's 8 bytes reach CPUs that may be executing them (one atomic store, or the
//! INT3 protocol) is the manager's [`PatchProtocol`](crate::manager::PatchProtocol).
//!
//! Everything here is pure and panic-free: all address arithmetic is checked, and out-of-range
//! inputs give `None` or a [`JumpTableError`].

use alloc::vec::Vec;
use core::fmt;

use crate::range::AddressRange;

mod layout;
#[cfg(test)]
mod tests;
mod write;

pub use layout::{JumpTableLayout, SlotPatch};
pub use write::{emit_tables, write_far_table, write_lazy_table, write_near_table};

/// Size of a near slot: `jmp rel32` (5 bytes) plus three `int3`.
pub const NEAR_SLOT_SIZE: usize = 8;
/// Size of a far slot: `jmp [rip+2]` (6 bytes), a 2-byte nop, the 8-byte absolute target.
pub const FAR_SLOT_SIZE: usize = 16;
/// Size of a lazy-compile slot: `push imm32` (5 bytes) plus `jmp rel32` (5 bytes).
pub const LAZY_SLOT_SIZE: usize = 10;
/// Offset of the absolute target qword inside a far slot.
pub const FAR_SLOT_TARGET_OFFSET: usize = 8;
/// Alignment of near slots (one naturally aligned qword each).
pub const NEAR_SLOT_ALIGN: usize = 8;
/// Alignment of far slots (so that their target qword is 8-aligned).
pub const FAR_SLOT_ALIGN: usize = 16;
/// Required alignment of a table region's base address ([`JumpTableLayout::new`]).
pub const TABLE_ALIGN: usize = 16;

const JMP_REL32: u8 = 0xE9;
const JMP_REL32_LEN: usize = 5;
const PUSH_IMM32: u8 = 0x68;
const INT3: u8 = 0xCC;
/// `jmp qword ptr [rip+2]` followed by `66 90` (`xchg ax, ax`, the 2-byte nop).
const FAR_SLOT_CODE: [u8; FAR_SLOT_TARGET_OFFSET] =
    [0xFF, 0x25, 0x02, 0x00, 0x00, 0x00, 0x66, 0x90];

/// The `rel32` displacement of a jump whose next instruction starts at `from_end`, or `None`
/// when `target` is out of reach.
///
/// The displacement is the exact (non-wrapping) difference `target - from_end`: a jump across
/// the top or bottom of the address space is treated as out of reach, even though the CPU would
/// wrap, because no real code layout spans that gap.
#[must_use]
pub fn rel32(from_end: usize, target: usize) -> Option<i32> {
    i32::try_from(target as i128 - from_end as i128).ok()
}

/// Whether a `rel32` branch whose next instruction starts at `from_end` reaches `target`
/// (the displacement `target - from_end` fits in `i32`; see [`rel32`]).
#[must_use]
pub fn fits_rel32(from_end: usize, target: usize) -> bool {
    rel32(from_end, target).is_some()
}

/// The near slot at `slot_addr` jumping to `target`, as the little-endian `u64` of its 8 bytes
/// (`E9 rel32 CC CC CC`), ready for one aligned 8-byte store at `slot_addr`.
///
/// `None` when the displacement does not fit in `i32` (use the far slot then) or `slot_addr + 5`
/// overflows. The encoding does not depend on alignment, but the store is only atomic when
/// `slot_addr` is 8-aligned, which the caller must ensure.
#[must_use]
pub fn near_slot(slot_addr: usize, target: usize) -> Option<u64> {
    let rel = rel32(slot_addr.checked_add(JMP_REL32_LEN)?, target)?.to_le_bytes();
    Some(u64::from_le_bytes([
        JMP_REL32, rel[0], rel[1], rel[2], rel[3], INT3, INT3, INT3,
    ]))
}

/// The 16 bytes of a far slot jumping to the absolute address `target`.
///
/// The slot is position independent. To retarget a live far slot, store the new target alone at
/// [`FAR_SLOT_TARGET_OFFSET`] (one aligned 8-byte store; far slots are 16-aligned).
#[must_use]
pub fn far_slot(target: usize) -> [u8; FAR_SLOT_SIZE] {
    let mut slot = [0u8; FAR_SLOT_SIZE];
    slot[..FAR_SLOT_TARGET_OFFSET].copy_from_slice(&FAR_SLOT_CODE);
    slot[FAR_SLOT_TARGET_OFFSET..].copy_from_slice(&(target as u64).to_le_bytes());
    slot
}

/// The 10 bytes of a lazy-compile slot at `slot_addr`: `push func_index` then `jmp lazy_entry`.
///
/// `push imm32` sign-extends its immediate to 64 bits, so the stub must read the low 32 bits of
/// the pushed qword as the index. `None` when `lazy_entry` is out of `rel32` reach from the slot
/// (or `slot_addr + 10` overflows).
#[must_use]
pub fn lazy_slot(
    slot_addr: usize,
    func_index: u32,
    lazy_entry: usize,
) -> Option<[u8; LAZY_SLOT_SIZE]> {
    let rel = rel32(slot_addr.checked_add(LAZY_SLOT_SIZE)?, lazy_entry)?;
    let mut slot = [0u8; LAZY_SLOT_SIZE];
    slot[0] = PUSH_IMM32;
    slot[1..5].copy_from_slice(&func_index.to_le_bytes());
    slot[5] = JMP_REL32;
    slot[6..].copy_from_slice(&rel.to_le_bytes());
    Some(slot)
}

/// Bytes of a near table of `n` slots (`n × 8`), or `None` on overflow.
#[must_use]
pub const fn near_table_size(n: usize) -> Option<usize> {
    n.checked_mul(NEAR_SLOT_SIZE)
}

/// Bytes of a far table of `n` slots (`n × 16`), or `None` on overflow.
#[must_use]
pub const fn far_table_size(n: usize) -> Option<usize> {
    n.checked_mul(FAR_SLOT_SIZE)
}

/// Bytes of a lazy-compile table of `n` slots (`n × 10`), or `None` on overflow.
#[must_use]
pub const fn lazy_table_size(n: usize) -> Option<usize> {
    n.checked_mul(LAZY_SLOT_SIZE)
}

/// Why a table could not be emitted; no output was produced (buffers may be partly written).
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum JumpTableError {
    /// The number of targets differs from the layout's slot count.
    TargetCount {
        /// Slots in the layout.
        expected: u32,
        /// Targets given.
        got: usize,
    },
    /// The output buffer is shorter than the table.
    BufferTooSmall {
        /// Bytes the table needs.
        needed: usize,
        /// Bytes the buffer has.
        got: usize,
    },
    /// A near slot reaches neither its target nor its own far slot.
    FarSlotOutOfReach {
        /// The slot index.
        slot: u32,
    },
    /// A lazy slot cannot reach the lazy-compile entry with a `rel32` jump.
    LazyEntryOutOfReach {
        /// The slot index.
        slot: u32,
    },
    /// A lazy-compile entry was given but the layout has no lazy table.
    NoLazyTable,
    /// The layout has a lazy table but no lazy-compile entry was given.
    MissingLazyEntry,
    /// The table image could not be allocated.
    AllocationFailed,
}

impl fmt::Display for JumpTableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JumpTableError::TargetCount { expected, got } => {
                write!(f, "{got} targets given for {expected} jump-table slots")
            }
            JumpTableError::BufferTooSmall { needed, got } => {
                write!(f, "jump-table buffer holds {got} bytes, {needed} needed")
            }
            JumpTableError::FarSlotOutOfReach { slot } => {
                write!(f, "near slot {slot} cannot reach its far slot")
            }
            JumpTableError::LazyEntryOutOfReach { slot } => {
                write!(f, "lazy slot {slot} cannot reach the lazy-compile entry")
            }
            JumpTableError::NoLazyTable => f.write_str("the jump-table layout has no lazy table"),
            JumpTableError::MissingLazyEntry => f.write_str("no lazy-compile entry given"),
            JumpTableError::AllocationFailed => f.write_str("jump-table image allocation failed"),
        }
    }
}

impl core::error::Error for JumpTableError {}
