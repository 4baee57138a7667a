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

/// The stores that retarget one slot of a live table, in order (see the module docs).
///
/// 1. Unless [`direct`](Self::direct): store [`target`](Self::target) as one aligned 8-byte
///    store at [`far_target_addr`](Self::far_target_addr) (data: CPUs load it).
/// 2. Store [`near_value`](Self::near_value) at [`near_addr`](Self::near_addr) (instructions:
///    per the manager's [`PatchProtocol`](crate::manager::PatchProtocol)).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SlotPatch {
    /// Address of the far slot's target qword (8-aligned).
    pub far_target_addr: usize,
    /// The new target: the value of the first store.
    pub target: usize,
    /// Address of the near slot (8-aligned).
    pub near_addr: usize,
    /// The near slot's new 8 bytes as a little-endian `u64`: the value of the second store.
    pub near_value: u64,
    /// Whether the near slot jumps to the target directly (else it jumps to its far slot).
    pub direct: bool,
}

/// Where the near, far and lazy-compile tables of one table region lie, and the slot index ↔
/// address mapping in both directions.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct JumpTableLayout {
    near: AddressRange,
    far: AddressRange,
    lazy: Option<AddressRange>,
    slots: u32,
}

impl JumpTableLayout {
    /// Layout of `slots` slots at `base`: the near table at `base`, the far table at the next
    /// 16-aligned address after it, then the lazy table (when `with_lazy`) right after the far
    /// table.
    ///
    /// `None` when `base` is not 16-aligned ([`TABLE_ALIGN`]) or the region would run past the
    /// end of the address space.
    #[must_use]
    pub fn new(base: usize, slots: u32, with_lazy: bool) -> Option<Self> {
        if !base.is_multiple_of(TABLE_ALIGN) {
            return None;
        }
        let n = usize::try_from(slots).ok()?;
        let near = AddressRange::from_start_size(base, near_table_size(n)?)?;
        let far_start = near.end().checked_next_multiple_of(FAR_SLOT_ALIGN)?;
        let far = AddressRange::from_start_size(far_start, far_table_size(n)?)?;
        let lazy = if with_lazy {
            Some(AddressRange::from_start_size(
                far.end(),
                lazy_table_size(n)?,
            )?)
        } else {
            None
        };
        Some(JumpTableLayout {
            near,
            far,
            lazy,
            slots,
        })
    }

    /// Number of slots in each table.
    #[must_use]
    pub const fn slots(&self) -> u32 {
        self.slots
    }

    /// Start of the region (the near table).
    #[must_use]
    pub const fn base(&self) -> usize {
        self.near.start()
    }

    /// The near table.
    #[must_use]
    pub const fn near(&self) -> AddressRange {
        self.near
    }

    /// The far table.
    #[must_use]
    pub const fn far(&self) -> AddressRange {
        self.far
    }

    /// The lazy-compile table, if the layout has one.
    #[must_use]
    pub const fn lazy(&self) -> Option<AddressRange> {
        self.lazy
    }

    /// The whole region `[base, end of the last table)`, padding included.
    #[must_use]
    pub const fn range(&self) -> AddressRange {
        let end = match self.lazy {
            Some(lazy) => lazy.end(),
            None => self.far.end(),
        };
        AddressRange::new(self.near.start(), end)
    }

    /// Bytes of the whole region, padding included.
    #[must_use]
    pub const fn total_size(&self) -> usize {
        self.range().size()
    }

    /// Address of near slot `i`, or `None` when `i >= slots()`.
    #[must_use]
    pub fn near_slot_addr(&self, i: u32) -> Option<usize> {
        slot_addr(self.near, self.slots, i, NEAR_SLOT_SIZE)
    }

    /// Address of far slot `i`, or `None` when `i >= slots()`.
    #[must_use]
    pub fn far_slot_addr(&self, i: u32) -> Option<usize> {
        slot_addr(self.far, self.slots, i, FAR_SLOT_SIZE)
    }

    /// Address of lazy slot `i`, or `None` when `i >= slots()` or there is no lazy table.
    #[must_use]
    pub fn lazy_slot_addr(&self, i: u32) -> Option<usize> {
        slot_addr(self.lazy?, self.slots, i, LAZY_SLOT_SIZE)
    }

    /// Address of far slot `i`'s target qword (8-aligned), or `None` when `i >= slots()`.
    #[must_use]
    pub fn far_target_addr(&self, i: u32) -> Option<usize> {
        Some(self.far_slot_addr(i)? + FAR_SLOT_TARGET_OFFSET)
    }

    /// The index of the near slot starting exactly at `addr`.
    #[must_use]
    pub fn slot_for_near_addr(&self, addr: usize) -> Option<u32> {
        slot_for_addr(self.near, addr, NEAR_SLOT_SIZE)
    }

    /// The index of the far slot starting exactly at `addr`.
    #[must_use]
    pub fn slot_for_far_addr(&self, addr: usize) -> Option<u32> {
        slot_for_addr(self.far, addr, FAR_SLOT_SIZE)
    }

    /// The index of the lazy slot starting exactly at `addr`.
    #[must_use]
    pub fn slot_for_lazy_addr(&self, addr: usize) -> Option<u32> {
        slot_for_addr(self.lazy?, addr, LAZY_SLOT_SIZE)
    }

    /// The value of near slot `i` for `target`: `jmp target` when in `rel32` reach, else
    /// `jmp far_slot(i)` (the far slot must then hold `target`). `None` when `i >= slots()` or
    /// neither is in reach.
    #[must_use]
    pub fn near_slot_value(&self, i: u32, target: usize) -> Option<u64> {
        let addr = self.near_slot_addr(i)?;
        near_slot(addr, target).or_else(|| near_slot(addr, self.far_slot_addr(i)?))
    }

    /// The two stores that retarget slot `i` to `target` (see [`SlotPatch`] for their order).
    /// `None` when `i >= slots()` or the near slot reaches neither `target` nor its far slot.
    #[must_use]
    pub fn patch(&self, i: u32, target: usize) -> Option<SlotPatch> {
        let near_addr = self.near_slot_addr(i)?;
        let far_target_addr = self.far_target_addr(i)?;
        let (near_value, direct) = match near_slot(near_addr, target) {
            Some(v) => (v, true),
            None => (near_slot(near_addr, self.far_slot_addr(i)?)?, false),
        };
        Some(SlotPatch {
            far_target_addr,
            target,
            near_addr,
            near_value,
            direct,
        })
    }
}

fn slot_addr(table: AddressRange, slots: u32, i: u32, size: usize) -> Option<usize> {
    if i >= slots {
        return None;
    }
    // In range: the table holds `slots × size` bytes, so this neither overflows nor leaves it.
    table
        .start()
        .checked_add(usize::try_from(i).ok()?.checked_mul(size)?)
}

fn slot_for_addr(table: AddressRange, addr: usize, size: usize) -> Option<u32> {
    if !table.contains(addr) {
        return None;
    }
    let off = addr - table.start();
    if !off.is_multiple_of(size) {
        return None;
    }
    u32::try_from(off / size).ok()
}

fn check_len(out: &[u8], needed: Option<usize>) -> Result<(), JumpTableError> {
    let needed = needed.unwrap_or(usize::MAX);
    if out.len() < needed {
        return Err(JumpTableError::BufferTooSmall {
            needed,
            got: out.len(),
        });
    }
    Ok(())
}

fn check_targets(layout: &JumpTableLayout, targets: &[usize]) -> Result<(), JumpTableError> {
    if usize::try_from(layout.slots) != Ok(targets.len()) {
        return Err(JumpTableError::TargetCount {
            expected: layout.slots,
            got: targets.len(),
        });
    }
    Ok(())
}

/// Writes the near table of `layout` into `out[..near table size]`: slot `i` jumps to
/// `targets[i]` directly when in reach, else to far slot `i` (which must hold `targets[i]`,
/// see [`write_far_table`]).
///
/// # Errors
/// [`TargetCount`](JumpTableError::TargetCount) unless `targets.len() == slots()`,
/// [`BufferTooSmall`](JumpTableError::BufferTooSmall),
/// [`FarSlotOutOfReach`](JumpTableError::FarSlotOutOfReach).
pub fn write_near_table(
    layout: &JumpTableLayout,
    targets: &[usize],
    out: &mut [u8],
) -> Result<(), JumpTableError> {
    check_targets(layout, targets)?;
    check_len(out, Some(layout.near.size()))?;
    for ((slot, chunk), &target) in (0u32..)
        .zip(out.chunks_exact_mut(NEAR_SLOT_SIZE))
        .zip(targets)
    {
        let value = layout
            .near_slot_value(slot, target)
            .ok_or(JumpTableError::FarSlotOutOfReach { slot })?;
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    Ok(())
}

/// Writes one far slot per target into `out[..targets.len() × 16]` (far slots are position
/// independent, so no layout is needed).
///
/// # Errors
/// [`BufferTooSmall`](JumpTableError::BufferTooSmall).
pub fn write_far_table(targets: &[usize], out: &mut [u8]) -> Result<(), JumpTableError> {
    check_len(out, far_table_size(targets.len()))?;
    for (chunk, &target) in out.chunks_exact_mut(FAR_SLOT_SIZE).zip(targets) {
        chunk.copy_from_slice(&far_slot(target));
    }
    Ok(())
}

/// Writes the lazy table of `layout` into `out[..lazy table size]`: slot `i` pushes `i` and
/// jumps to `lazy_entry`.
///
/// # Errors
/// [`NoLazyTable`](JumpTableError::NoLazyTable),
/// [`BufferTooSmall`](JumpTableError::BufferTooSmall),
/// [`LazyEntryOutOfReach`](JumpTableError::LazyEntryOutOfReach).
pub fn write_lazy_table(
    layout: &JumpTableLayout,
    lazy_entry: usize,
    out: &mut [u8],
) -> Result<(), JumpTableError> {
    let lazy = layout.lazy.ok_or(JumpTableError::NoLazyTable)?;
    check_len(out, Some(lazy.size()))?;
    for (slot, chunk) in (0u32..layout.slots).zip(out.chunks_exact_mut(LAZY_SLOT_SIZE)) {
        let bytes = layout
            .lazy_slot_addr(slot)
            .and_then(|addr| lazy_slot(addr, slot, lazy_entry))
            .ok_or(JumpTableError::LazyEntryOutOfReach { slot })?;
        chunk.copy_from_slice(&bytes);
    }
    Ok(())
}

/// The whole image of `layout`'s region, `[near | pad | far | lazy]`, to be copied to
/// `layout.base()`.
///
/// Far slot `i` holds `targets[i]`; near slot `i` jumps to `targets[i]` directly when in reach,
/// else to far slot `i`; lazy slot `i` (when the layout has a lazy table) pushes `i` and jumps to
/// `lazy_entry`. Padding is `int3`. To start slots out lazily, pass `lazy_slot_addr(i)` as
/// `targets[i]`.
///
/// # Errors
/// [`TargetCount`](JumpTableError::TargetCount),
/// [`FarSlotOutOfReach`](JumpTableError::FarSlotOutOfReach),
/// [`LazyEntryOutOfReach`](JumpTableError::LazyEntryOutOfReach),
/// [`NoLazyTable`](JumpTableError::NoLazyTable) / [`MissingLazyEntry`](JumpTableError::MissingLazyEntry)
/// when `lazy_entry` and the layout's lazy table disagree,
/// [`AllocationFailed`](JumpTableError::AllocationFailed).
pub fn emit_tables(
    layout: &JumpTableLayout,
    targets: &[usize],
    lazy_entry: Option<usize>,
) -> Result<Vec<u8>, JumpTableError> {
    check_targets(layout, targets)?;
    match (layout.lazy.is_some(), lazy_entry.is_some()) {
        (false, true) => return Err(JumpTableError::NoLazyTable),
        (true, false) => return Err(JumpTableError::MissingLazyEntry),
        _ => {}
    }
    let size = layout.total_size();
    let mut image = Vec::new();
    image
        .try_reserve_exact(size)
        .map_err(|_| JumpTableError::AllocationFailed)?;
    image.resize(size, INT3);
    let base = layout.base();
    write_near_table(layout, targets, &mut image)?;
    write_far_table(targets, &mut image[layout.far.start() - base..])?;
    if let (Some(lazy), Some(entry)) = (layout.lazy, lazy_entry) {
        write_lazy_table(layout, entry, &mut image[lazy.start() - base..])?;
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

    fn decode_all(bytes: &[u8], ip: usize) -> Vec<Instruction> {
        let mut decoder = Decoder::with_ip(64, bytes, ip as u64, DecoderOptions::NONE);
        let mut out = Vec::new();
        while decoder.can_decode() {
            let instr = decoder.decode();
            assert!(
                !instr.is_invalid(),
                "invalid instruction at {:#x}",
                instr.ip()
            );
            out.push(instr);
        }
        out
    }

    /// Checks the 8 bytes at `slot` are `jmp target; int3; int3; int3`.
    fn check_near(bytes: &[u8], slot: usize, target: usize) {
        assert_eq!(bytes.len(), NEAR_SLOT_SIZE);
        let instrs = decode_all(bytes, slot);
        assert_eq!(instrs.len(), 4, "{instrs:?}");
        assert_eq!(instrs[0].mnemonic(), Mnemonic::Jmp);
        assert_eq!(instrs[0].code(), Code::Jmp_rel32_64);
        assert_eq!(instrs[0].len(), 5);
        assert_eq!(instrs[0].op0_kind(), OpKind::NearBranch64);
        assert_eq!(instrs[0].near_branch_target(), target as u64);
        for int3 in &instrs[1..] {
            assert_eq!(int3.code(), Code::Int3);
        }
    }

    /// Checks the 16 bytes at `slot` are `jmp [rip+2]; nop` followed by the qword `target`.
    fn check_far(bytes: &[u8], slot: usize, target: usize) {
        assert_eq!(bytes.len(), FAR_SLOT_SIZE);
        let instrs = decode_all(&bytes[..FAR_SLOT_TARGET_OFFSET], slot);
        assert_eq!(instrs.len(), 2, "{instrs:?}");
        let jmp = &instrs[0];
        assert_eq!(jmp.mnemonic(), Mnemonic::Jmp);
        assert_eq!(jmp.code(), Code::Jmp_rm64);
        assert_eq!(jmp.len(), 6);
        assert_eq!(jmp.op0_kind(), OpKind::Memory);
        assert_eq!(jmp.memory_base(), Register::RIP);
        assert!(jmp.is_ip_rel_memory_operand());
        assert_eq!(
            jmp.ip_rel_memory_address(),
            (slot + FAR_SLOT_TARGET_OFFSET) as u64
        );
        assert_eq!(instrs[1].mnemonic(), Mnemonic::Nop);
        assert_eq!(instrs[1].code(), Code::Nopw);
        assert_eq!(instrs[1].len(), 2);
        let qword = u64::from_le_bytes(bytes[FAR_SLOT_TARGET_OFFSET..].try_into().unwrap());
        assert_eq!(qword, target as u64);
    }

    /// Checks the 10 bytes at `slot` are `push index; jmp entry`.
    fn check_lazy(bytes: &[u8], slot: usize, index: u32, entry: usize) {
        assert_eq!(bytes.len(), LAZY_SLOT_SIZE);
        let instrs = decode_all(bytes, slot);
        assert_eq!(instrs.len(), 2, "{instrs:?}");
        assert_eq!(instrs[0].mnemonic(), Mnemonic::Push);
        assert_eq!(instrs[0].code(), Code::Pushq_imm32);
        assert_eq!(instrs[0].op0_kind(), OpKind::Immediate32to64);
        assert_eq!(instrs[0].immediate32(), index);
        assert_eq!(instrs[1].code(), Code::Jmp_rel32_64);
        assert_eq!(instrs[1].near_branch_target(), entry as u64);
    }

    #[test]
    fn near_slot_decodes_to_jmp_and_int3() {
        for (slot, target) in [
            (0x1000usize, 0x2000usize),
            (0x2000, 0x1000),
            (0x1000, 0x1005), // displacement 0
            (0x1000, 0x1000), // jump to itself
            (0x7fff_0000_0000, 0x7fff_7fff_0000),
        ] {
            let value = near_slot(slot, target).unwrap();
            check_near(&value.to_le_bytes(), slot, target);
        }
        assert_eq!(
            near_slot(0x1000, 0x1005).unwrap().to_le_bytes(),
            [0xE9, 0, 0, 0, 0, 0xCC, 0xCC, 0xCC]
        );
    }

    #[test]
    fn rel32_boundaries() {
        let slot = 0x4000_0000_0000usize;
        let end = slot + 5;
        let max = end + i32::MAX as usize;
        let min = end - (i32::MIN as i64).unsigned_abs() as usize;
        assert!(fits_rel32(end, max));
        assert!(fits_rel32(end, min));
        assert!(!fits_rel32(end, max + 1));
        assert!(!fits_rel32(end, min - 1));
        assert_eq!(rel32(end, max), Some(i32::MAX));
        assert_eq!(rel32(end, min), Some(i32::MIN));
        check_near(&near_slot(slot, max).unwrap().to_le_bytes(), slot, max);
        check_near(&near_slot(slot, min).unwrap().to_le_bytes(), slot, min);
        assert_eq!(near_slot(slot, max + 1), None);
        assert_eq!(near_slot(slot, min - 1), None);

        let lazy_end = slot + LAZY_SLOT_SIZE;
        let lmax = lazy_end + i32::MAX as usize;
        let lmin = lazy_end - (1usize << 31);
        check_lazy(&lazy_slot(slot, 7, lmax).unwrap(), slot, 7, lmax);
        check_lazy(&lazy_slot(slot, 7, lmin).unwrap(), slot, 7, lmin);
        assert_eq!(lazy_slot(slot, 7, lmax + 1), None);
        assert_eq!(lazy_slot(slot, 7, lmin - 1), None);
    }

    #[test]
    fn extreme_addresses_do_not_panic() {
        assert!(!fits_rel32(0, usize::MAX));
        assert!(!fits_rel32(usize::MAX, 0));
        assert!(fits_rel32(usize::MAX, usize::MAX));
        // No wrap-around across the top of the address space.
        assert_eq!(near_slot(usize::MAX - 7, 3), None);
        assert_eq!(near_slot(usize::MAX - 4, usize::MAX), None); // slot + 5 overflows
        assert_eq!(
            near_slot(usize::MAX - 7, usize::MAX),
            Some(u64::from_le_bytes([0xE9, 2, 0, 0, 0, 0xCC, 0xCC, 0xCC]))
        );
        assert_eq!(lazy_slot(usize::MAX - 5, 0, 0), None);
        assert_eq!(lazy_slot(usize::MAX - 9, 0, usize::MAX), None); // slot + 10 overflows
        assert_eq!(
            lazy_slot(usize::MAX - 10, 0, usize::MAX - 10),
            Some([0x68, 0, 0, 0, 0, 0xE9, 0xF6, 0xFF, 0xFF, 0xFF])
        );
        assert!(JumpTableLayout::new(usize::MAX - 15, 4, false).is_none());
        assert!(JumpTableLayout::new(usize::MAX - 15, 0, true).is_some());
        assert!(JumpTableLayout::new(0x1008, 1, true).is_none()); // misaligned base
        assert_eq!(near_table_size(usize::MAX), None);
        assert_eq!(far_table_size(usize::MAX / 8), None);
        assert_eq!(lazy_table_size(usize::MAX / 5), None);
        assert_eq!(lazy_table_size(3), Some(30));
    }

    #[test]
    fn high_canonical_addresses() {
        let slot = 0xFFFF_C000_0000_1000usize;
        for target in [
            0xFFFF_C000_0000_0000usize,
            0xFFFF_C000_7FFF_F000,
            0xFFFF_BFFF_8000_2000,
        ] {
            check_near(
                &near_slot(slot, target).unwrap().to_le_bytes(),
                slot,
                target,
            );
            check_lazy(&lazy_slot(slot, 42, target).unwrap(), slot, 42, target);
        }
        // Kernel text at the top of the address space is out of reach: use the far slot.
        let far_target = 0xFFFF_FFFF_8000_0000usize;
        assert_eq!(near_slot(slot, far_target), None);
        check_far(&far_slot(far_target), slot, far_target);
        check_far(&far_slot(0x1234), 0xFFFF_C000_0000_0010, 0x1234);
    }

    #[test]
    fn far_slot_encoding() {
        let bytes = far_slot(0x1122_3344_5566_7788);
        assert_eq!(
            bytes,
            [0xFF, 0x25, 2, 0, 0, 0, 0x66, 0x90, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        check_far(&bytes, 0x10_0000, 0x1122_3344_5566_7788);
    }

    #[test]
    fn lazy_slot_encoding() {
        let slot = 0x20_0003usize;
        for index in [0u32, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX] {
            let bytes = lazy_slot(slot, index, 0x10_0000).unwrap();
            check_lazy(&bytes, slot, index, 0x10_0000);
        }
    }

    #[test]
    fn layout_alignment_and_sizes() {
        for slots in [0u32, 1, 2, 3, 7, 100] {
            for with_lazy in [false, true] {
                let base = 0xFFFF_C000_0010_0000usize;
                let l = JumpTableLayout::new(base, slots, with_lazy).unwrap();
                let n = slots as usize;
                assert_eq!(l.base(), base);
                assert_eq!(l.slots(), slots);
                assert_eq!(
                    l.near(),
                    AddressRange::from_start_size(base, n * 8).unwrap()
                );
                assert_eq!(l.far().start() % FAR_SLOT_ALIGN, 0);
                assert!(l.far().start() >= l.near().end());
                assert!(l.far().start() - l.near().end() < FAR_SLOT_ALIGN);
                assert_eq!(l.far().size(), n * 16);
                match l.lazy() {
                    Some(lazy) => {
                        assert!(with_lazy);
                        assert_eq!(lazy.start(), l.far().end());
                        assert_eq!(lazy.size(), n * 10);
                    }
                    None => assert!(!with_lazy),
                }
                let pad = (n % 2) * 8;
                let expected = n * 8 + pad + n * 16 + if with_lazy { n * 10 } else { 0 };
                assert_eq!(l.total_size(), expected);
                assert_eq!(l.range().start(), base);
                assert_eq!(l.range().size(), expected);
            }
        }
    }

    #[test]
    fn slot_mapping_round_trips() {
        let l = JumpTableLayout::new(0x7000_0000_0000, 37, true).unwrap();
        for i in 0..37 {
            let near = l.near_slot_addr(i).unwrap();
            let far = l.far_slot_addr(i).unwrap();
            let lazy = l.lazy_slot_addr(i).unwrap();
            assert_eq!(near % NEAR_SLOT_ALIGN, 0);
            assert_eq!(far % FAR_SLOT_ALIGN, 0);
            assert_eq!(l.far_target_addr(i), Some(far + 8));
            assert_eq!(l.far_target_addr(i).unwrap() % 8, 0);
            assert_eq!(l.slot_for_near_addr(near), Some(i));
            assert_eq!(l.slot_for_far_addr(far), Some(i));
            assert_eq!(l.slot_for_lazy_addr(lazy), Some(i));
            // Not a slot start, or in a different table.
            assert_eq!(l.slot_for_near_addr(near + 1), None);
            assert_eq!(l.slot_for_far_addr(far + 8), None);
            assert_eq!(l.slot_for_lazy_addr(lazy + 5), None);
            assert_eq!(l.slot_for_near_addr(far), None);
            assert_eq!(l.slot_for_far_addr(near), None);
            assert_eq!(l.slot_for_lazy_addr(near), None);
        }
        assert_eq!(l.near_slot_addr(37), None);
        assert_eq!(l.far_slot_addr(37), None);
        assert_eq!(l.lazy_slot_addr(37), None);
        assert_eq!(l.far_target_addr(u32::MAX), None);
        assert_eq!(l.slot_for_near_addr(l.near().end()), None);
        assert_eq!(l.slot_for_far_addr(l.far().end()), None);
        assert_eq!(l.slot_for_lazy_addr(l.lazy().unwrap().end()), None);
        assert_eq!(l.slot_for_near_addr(0), None);
        assert_eq!(l.slot_for_near_addr(usize::MAX), None);

        let no_lazy = JumpTableLayout::new(0x1000, 4, false).unwrap();
        assert_eq!(no_lazy.lazy_slot_addr(0), None);
        assert_eq!(no_lazy.slot_for_lazy_addr(no_lazy.far().end()), None);
    }

    /// Decodes slot `i` of each table of `image` and checks it against the expectations.
    fn check_image(
        l: &JumpTableLayout,
        image: &[u8],
        targets: &[usize],
        lazy_entry: Option<usize>,
    ) {
        assert_eq!(image.len(), l.total_size());
        let base = l.base();
        let at = |addr: usize, size: usize| &image[addr - base..addr - base + size];
        for (i, &target) in (0u32..).zip(targets) {
            let near = l.near_slot_addr(i).unwrap();
            let far = l.far_slot_addr(i).unwrap();
            let via = if fits_rel32(near + 5, target) {
                target
            } else {
                far
            };
            check_near(at(near, NEAR_SLOT_SIZE), near, via);
            check_far(at(far, FAR_SLOT_SIZE), far, target);
            if let Some(entry) = lazy_entry {
                let lazy = l.lazy_slot_addr(i).unwrap();
                check_lazy(at(lazy, LAZY_SLOT_SIZE), lazy, i, entry);
            }
        }
        // Padding between the near and far tables is int3.
        assert!(image[l.near().size()..l.far().start() - base]
            .iter()
            .all(|&b| b == INT3));
    }

    #[test]
    fn whole_table_emission_mixed_near_and_far() {
        let base = 0xFFFF_C000_0000_0000usize;
        let l = JumpTableLayout::new(base, 5, true).unwrap();
        let entry = base + 0x10_0000;
        let targets = [
            base + 0x4000,                // near
            0xFFFF_FFFF_8000_1000,        // far (kernel text)
            base - 0x7000_0000,           // near, below the table
            0x0000_7fff_0000_0000,        // far (lower half)
            l.lazy_slot_addr(4).unwrap(), // lazily compiled: jump into its lazy slot
        ];
        let image = emit_tables(&l, &targets, Some(entry)).unwrap();
        check_image(&l, &image, &targets, Some(entry));
        // Decode the near table end to end: every jmp lands on the target or its far slot.
        let instrs = decode_all(&image[..l.near().size()], base);
        let jumps: Vec<u64> = instrs
            .iter()
            .filter(|i| i.mnemonic() == Mnemonic::Jmp)
            .map(|i| i.near_branch_target())
            .collect();
        assert_eq!(
            jumps,
            vec![
                targets[0] as u64,
                l.far_slot_addr(1).unwrap() as u64,
                targets[2] as u64,
                l.far_slot_addr(3).unwrap() as u64,
                targets[4] as u64,
            ]
        );
        // The lazy table decodes end to end as push/jmp pairs.
        let lazy = l.lazy().unwrap();
        let lazy_instrs = decode_all(&image[lazy.start() - base..], lazy.start());
        assert_eq!(lazy_instrs.len(), 10);

        let plain = JumpTableLayout::new(base, 5, false).unwrap();
        let image = emit_tables(&plain, &targets, None).unwrap();
        check_image(&plain, &image, &targets, None);
    }

    #[test]
    fn emission_errors() {
        let l = JumpTableLayout::new(0x10_0000, 2, true).unwrap();
        let plain = JumpTableLayout::new(0x10_0000, 2, false).unwrap();
        assert_eq!(
            emit_tables(&l, &[1], Some(0)),
            Err(JumpTableError::TargetCount {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            emit_tables(&l, &[1, 2], None),
            Err(JumpTableError::MissingLazyEntry)
        );
        assert_eq!(
            emit_tables(&plain, &[1, 2], Some(0)),
            Err(JumpTableError::NoLazyTable)
        );
        assert_eq!(
            emit_tables(&l, &[1, 2], Some(0x7fff_0000_0000)),
            Err(JumpTableError::LazyEntryOutOfReach { slot: 0 })
        );
        let mut small = [0u8; 31];
        assert_eq!(
            write_far_table(&[1, 2], &mut small),
            Err(JumpTableError::BufferTooSmall {
                needed: 32,
                got: 31
            })
        );
        assert_eq!(
            write_near_table(&l, &[1, 2], &mut small[..15]),
            Err(JumpTableError::BufferTooSmall {
                needed: 16,
                got: 15
            })
        );
        assert_eq!(
            write_lazy_table(&plain, 0, &mut small),
            Err(JumpTableError::NoLazyTable)
        );
        // A huge table whose last near slot cannot reach its own far slot.
        let huge = JumpTableLayout::new(0, u32::MAX, false).unwrap();
        let last = u32::MAX - 1;
        assert_eq!(huge.near_slot_value(last, usize::MAX / 2), None);
        assert_eq!(huge.patch(last, usize::MAX / 2), None);
        assert_eq!(huge.patch(0, usize::MAX / 2), None);
        assert!(huge.patch(0, 0x1000).unwrap().direct);
        assert!(!emit_tables(&l, &[1, 2], Some(0x10_0000))
            .unwrap()
            .is_empty());
        assert!(!JumpTableError::FarSlotOutOfReach { slot: 3 }
            .to_string()
            .is_empty());
    }

    #[test]
    fn patch_in_image() {
        let base = 0xFFFF_C000_0020_0000usize;
        let l = JumpTableLayout::new(base, 3, false).unwrap();
        let mut targets = [base + 0x1000, base + 0x2000, base + 0x3000];
        let mut image = emit_tables(&l, &targets, None).unwrap();
        for (i, new) in [
            (1u32, 0xFFFF_FFFF_8123_4560usize),
            (1, base + 0x5000),
            (2, 0x1000),
        ] {
            let p = l.patch(i, new).unwrap();
            assert_eq!(p.near_addr % 8, 0);
            assert_eq!(p.far_target_addr % 8, 0);
            assert_eq!(p.target, new);
            assert_eq!(p.direct, fits_rel32(p.near_addr + 5, new));
            assert_eq!(Some(p.near_value), l.near_slot_value(i, new));
            let far = p.far_target_addr - base;
            image[far..far + 8].copy_from_slice(&(p.target as u64).to_le_bytes());
            let near = p.near_addr - base;
            image[near..near + 8].copy_from_slice(&p.near_value.to_le_bytes());
            targets[i as usize] = new;
            check_image(&l, &image, &targets, None);
        }
        assert_eq!(l.patch(3, 0), None);
    }
}
