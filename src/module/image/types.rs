//! The public types of images: the loaded image, its landing pad, what a publish registers.

use crate::trap::TrapVector;
use crate::AddressRange;

/// An image loaded into a code space of a module by [`CodeModule::load_image`](super::super::CodeModule::load_image): its pages
/// are R+NX until [`CodeModule::publish_image`](super::super::CodeModule::publish_image) makes its text R+X. Not `Clone`: handing it to
/// [`CodeModule::unpublish_image`](super::super::CodeModule::unpublish_image) gives it back. Dropping it keeps the image loaded (and
/// published) until the module is dropped.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a loaded image stays in the module until unpublished or the module is dropped"]
pub struct CodeImage {
    pub(super) bytes: AddressRange,
    pub(super) serial: u64,
}

impl CodeImage {
    /// The image's bytes: `range().start()` is page aligned; `len()` bytes long.
    #[must_use]
    pub fn range(&self) -> AddressRange {
        self.bytes
    }

    /// The address of the image's first byte (page aligned).
    #[must_use]
    pub fn as_ptr(&self) -> *const u8 {
        self.bytes.start() as *const u8
    }

    /// Bytes in the image.
    #[must_use]
    pub fn len(&self) -> usize {
        self.bytes.size()
    }

    /// Whether the image holds no byte (never: empty images are refused).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The image in place, as the calling CPU reads it.
    ///
    /// # Safety
    /// The module's code window is mapped in the calling address space at its own addresses
    /// (the [`X86Mmu`](crate::mmu::x86::X86Mmu) backend over the running page table; never the
    /// software machine, whose window is not host memory), and the module that loaded the image
    /// is not dropped while the slice lives (the slice borrows the image, so it cannot be
    /// unpublished meanwhile).
    #[must_use]
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the caller's contract: the image's pages are mapped readable (R+NX or R+X)
        // at these addresses until the module frees them, which it does only after
        // `unpublish_image` (which takes the image, so not while `&self` is borrowed) or its
        // drop. Nothing writes them while loaded.
        unsafe { core::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }
}

/// Where a trap site of a published image resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandingPad(pub(super) Pad);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pad {
    Text(u32),
    External(usize),
}

impl LandingPad {
    /// An instruction of the text itself, `offset` bytes from its start.
    #[must_use]
    pub const fn in_text(offset: u32) -> Self {
        LandingPad(Pad::Text(offset))
    }

    /// Code outside the module (a kernel trampoline), reached through a landing stub the module
    /// writes next to the image (`jmp [rip+0]`): a trap of the image resumes at `entry` with
    /// the registers of the faulting instruction and r10 = the faulting PC.
    ///
    /// # Safety
    /// `entry` is code written to be entered that way from any trap site of the image it is
    /// published with, on any CPU, in any context the image's code runs in, and it stays mapped
    /// and executable while the image is published and for a grace period of the registries'
    /// domain after [`CodeModule::unpublish_image`](super::super::CodeModule::unpublish_image) (or the module's drop). Its address is
    /// checked to lie outside the module's code spaces and outside the code window's unused
    /// parts; nothing else about it can be.
    #[must_use]
    pub const unsafe fn external(entry: usize) -> Self {
        LandingPad(Pad::External(entry))
    }
}

/// What [`CodeModule::publish_image`](super::super::CodeModule::publish_image) registers for an image's text.
#[derive(Debug, Clone, Copy)]
pub struct ImageTraps<'a> {
    /// Trap sites: offsets from the text's start, each with the exception it raises. #PF sites
    /// are resumed only for faults in `fault_ranges`.
    pub sites: &'a [(u32, TrapVector)],
    /// The addresses #PF sites may fault on: each linear memory's reservation with its guard
    /// region, the low null-page range... Empty: any address.
    pub fault_ranges: &'a [AddressRange],
    /// Where every site resumes; required when there are sites.
    pub landing_pad: Option<LandingPad>,
    /// The text's name for PC lookup and profilers (`image` when `None`).
    pub name: Option<&'a str>,
}

impl ImageTraps<'_> {
    /// No trap sites, no name.
    pub const NONE: ImageTraps<'static> = ImageTraps {
        sites: &[],
        fault_ranges: &[],
        landing_pad: None,
        name: None,
    };
}
