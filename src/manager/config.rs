//! Settings of a [`CodeManager`](super::CodeManager), validated before anything is reserved.

use super::error::CodeError;
use crate::breakpoint::BreakpointSites;
use crate::{AddressRange, PAGE_SIZE};

/// Largest code space: every address of a space must reach its jump tables (which lie inside
/// it) with a rel32 displacement, so a space spans less than 2 GiB.
pub const MAX_CODE_SPACE_SIZE: usize = (i32::MAX as usize + 1) - PAGE_SIZE;

/// How code lands on a page that already holds published (R+X) code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtectionMode {
    /// Make the page RW+NX, write, make it R+X again, each step flushed. Other code on the page
    /// cannot execute meanwhile, so this mode is for kernels that run one CPU: a manager in this
    /// mode is refused ([`CodeError::FlipNeedsOneCpu`]) while more than one CPU is online, and
    /// so is any write that would flip a page if more CPUs came online later. V8's write scopes.
    Flip,
    /// Write through a private, writable alias of the page's frame that only the writing CPU
    /// can see; the executable mapping is never writable. Linux's `text_poke`. The default.
    Alias,
}

/// How a jump slot that other CPUs may be executing is rewritten (cross-modifying code).
///
/// Only the near slots' instruction bytes (`jmp rel32`) are concerned: far-slot targets and code
/// pointers are data, always written with one aligned 8-byte store.
///
/// **The default is [`AtomicStore`](Self::AtomicStore)**: it needs nothing from the kernel's
/// #BP handler (so `ManagerConfig::default()` is right for any kernel), it costs one
/// serialization round per patch instead of three, and it is what V8 ships on x86-64. Its cost
/// is that the Intel SDM does not define it: choose [`Int3`](Self::Int3) to rely only on the
/// documented protocol (as Linux does for its live kernel text) once the #BP hook is installed.
#[derive(Debug, Clone, Copy, Default)]
pub enum PatchProtocol {
    /// One naturally aligned 8-byte store of the whole slot, then one serialization round of
    /// every CPU (V8's jump-table patching). x86 makes the store atomic for data accesses, and
    /// a CPU that serialized afterwards executes the new bytes; but the SDM (vol. 3, 8.1.3)
    /// does not say what a CPU executing the slot *while* it changes runs, so this relies on
    /// what every x86-64 implementation does in practice rather than on the manual.
    #[default]
    AtomicStore,
    /// Linux's `text_poke_bp`: INT3 over the slot's first byte, every CPU serializes; the other
    /// seven bytes, every CPU serializes; the new first byte, every CPU serializes — three
    /// rounds per patch (however many slots it changes). A CPU that executes the slot meanwhile
    /// runs either the whole old slot, or the INT3 — whose #BP handler must resume it at the new
    /// target through this [`BreakpointSites`] (see [`crate::breakpoint`]); no CPU ever
    /// executes bytes that changed other than by that one INT3 byte since it last serialized.
    Int3(&'static BreakpointSites),
}

/// Settings of a [`CodeManager`](super::CodeManager).
#[derive(Debug, Clone, Copy)]
pub struct ManagerConfig {
    /// Hard limit on committed code bytes (V8: 4095 MiB on x64).
    pub max_committed: usize,
    /// Largest code space one reservation may take, page aligned, at most
    /// [`MAX_CODE_SPACE_SIZE`] (V8: 1024 MiB on x64).
    pub max_code_space_size: usize,
    /// Unmapped guard pages on each side of every code space (at least 1).
    pub guard_pages: usize,
    /// How published pages are written.
    pub protection: ProtectionMode,
    /// How live jump slots are rewritten ([`PatchProtocol::AtomicStore`] by default; see there
    /// why).
    pub patch_protocol: PatchProtocol,
    /// Whether code spaces may live on 2 MiB pages that are read-only and executable from
    /// the start and never writable (the ROX mode, Linux's execmem ROX cache): allocators that
    /// ask for it ([`AllocatorConfig::rox`](super::AllocatorConfig::rox)) get such spaces, or
    /// 4 KiB ones when the backend has no 2 MiB frame for one (counted in
    /// [`ManagerStats::rox_fallbacks`](super::ManagerStats::rox_fallbacks)). Off by default.
    /// Needs [`ProtectionMode::Alias`]: every write of such code goes through the private
    /// alias.
    pub rox_code: bool,
    /// Called (with the manager lock held: record, don't re-enter) when committed bytes cross the
    /// critical threshold, which then moves halfway to the limit (V8's memory-pressure signal).
    pub on_critical: Option<fn(committed: usize)>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            max_committed: 4095 << 20,
            max_code_space_size: 1024 << 20,
            guard_pages: 1,
            protection: ProtectionMode::Alias,
            patch_protocol: PatchProtocol::AtomicStore,
            rox_code: false,
            on_critical: None,
        }
    }
}

impl ManagerConfig {
    /// Bytes of guard on each side of a code space.
    pub(crate) fn guard_bytes(&self) -> usize {
        // Validated: cannot overflow.
        self.guard_pages * PAGE_SIZE
    }

    /// Checks every setting against `window`.
    ///
    /// # Errors
    /// [`CodeError::InvalidConfig`] naming the first bad setting: an unaligned or empty window,
    /// no guard pages or guards that overflow or leave no room for one page of code, a code-space
    /// size that is zero, unaligned or past [`MAX_CODE_SPACE_SIZE`], a commit limit that is
    /// not page aligned, or `rox_code` with [`ProtectionMode::Flip`].
    pub fn validate(&self, window: AddressRange) -> Result<(), CodeError> {
        let bad = |setting: &'static str| Err(CodeError::InvalidConfig { setting });
        if !window.is_page_aligned() || window.is_empty() {
            return bad("window");
        }
        let Some(guards) = self
            .guard_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|g| g.checked_mul(2))
            .filter(|_| self.guard_pages > 0)
        else {
            return bad("guard_pages");
        };
        if guards
            .checked_add(PAGE_SIZE)
            .is_none_or(|need| need > window.size())
        {
            return bad("guard_pages");
        }
        let space = self.max_code_space_size;
        if space == 0 || !space.is_multiple_of(PAGE_SIZE) || space > MAX_CODE_SPACE_SIZE {
            return bad("max_code_space_size");
        }
        if !self.max_committed.is_multiple_of(PAGE_SIZE) {
            return bad("max_committed");
        }
        // ROX code is never made writable: flipping a page to write it is refused outright.
        if self.rox_code && self.protection == ProtectionMode::Flip {
            return bad("rox_code");
        }
        Ok(())
    }
}
