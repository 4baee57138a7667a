//! Where a table's near, far and lazy slots lie, slot index <-> address, and the stores that
//! retarget a live slot.

use super::*;

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
