//! Writing whole tables (near, far, lazy) into a buffer before they are published.

use super::*;

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
    if usize::try_from(layout.slots()) != Ok(targets.len()) {
        return Err(JumpTableError::TargetCount {
            expected: layout.slots(),
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
    check_len(out, Some(layout.near().size()))?;
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
    let lazy = layout.lazy().ok_or(JumpTableError::NoLazyTable)?;
    check_len(out, Some(lazy.size()))?;
    for (slot, chunk) in (0u32..layout.slots()).zip(out.chunks_exact_mut(LAZY_SLOT_SIZE)) {
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
    match (layout.lazy().is_some(), lazy_entry.is_some()) {
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
    write_far_table(targets, &mut image[layout.far().start() - base..])?;
    if let (Some(lazy), Some(entry)) = (layout.lazy(), lazy_entry) {
        write_lazy_table(layout, entry, &mut image[lazy.start() - base..])?;
    }
    Ok(image)
}
