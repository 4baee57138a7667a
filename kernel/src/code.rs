//! codespace wired into this kernel: the code window and a manager over the live page tables.

use codespace::mmu::x86::X86Mmu;
use codespace::{AddressRange, CodeError, CodeManager, ManagerConfig};

use crate::memory::{self, FrameBitmap};

/// The code window: PML4 slot 384, 512 GiB that nothing else maps.
pub const CODE_WINDOW: AddressRange =
    AddressRange::new(0xFFFF_C000_0000_0000, 0xFFFF_C000_0000_0000 + (512 << 30));

/// The page-table backend over the kernel's page table and frame allocator.
pub type KernelMmu = X86Mmu<'static, FrameBitmap>;

/// A backend over the kernel's live page tables, reporting the frame allocator's free count.
#[must_use]
pub fn kernel_mmu() -> KernelMmu {
    X86Mmu::new(memory::page_table_lock(), memory::frames_lock())
        .with_free_count(FrameBitmap::free_frames)
}

/// A manager over `window` (by default use [`CODE_WINDOW`]; tests take disjoint slices of it).
///
/// # Errors
/// What [`CodeManager::new`] reports (NX or WP off, bad window).
pub fn manager(
    window: AddressRange,
    config: ManagerConfig,
) -> Result<CodeManager<KernelMmu>, CodeError> {
    CodeManager::new(kernel_mmu(), window, config)
}

/// Slice `n` (4 GiB) of the code window, so tests never share page-table state.
#[must_use]
pub fn test_window(n: usize) -> AddressRange {
    let size = 4usize << 30;
    AddressRange::new(
        CODE_WINDOW.start() + n * size,
        CODE_WINDOW.start() + (n + 1) * size,
    )
}
