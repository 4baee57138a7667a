//! Images: bytes placed whole in a code space of the module (a precompiled wasm module, a
//! `.cwasm`), read-only and non-executable, then published with per-range protections: only
//! the text becomes executable, every other page stays R+NX for the image's life.
//!
//! 1. [`CodeModule::load_image`] copies the bytes into fresh page-aligned pages through their
//!    RW+NX mapping and makes every page R+NX (one flush). The runtime reads the image in place
//!    ([`CodeImage::as_ptr`]) to find its text and trap records.
//! 2. [`CodeModule::publish_image`] registers the text's trap sites (one trap-table update)
//!    and its PC lookup, then makes exactly the text pages R+X (one flush). The order means a
//!    CPU can execute the text only once its trap entries are visible; on failure each step is
//!    undone and the image is as it was.
//! 3. [`CodeModule::unpublish_image`] retires the image: after a grace period of the
//!    registries' domain its trap and PC entries go, then its pages (decommitted whole).
//!    Dropping the module does the same for every image it still holds.
//!
//! # Landing pads outside the module
//! A trap site resumes at a landing pad that must lie in the registered code (the trap table
//! refuses anything else: a fault handler would jump there). wasm's landing pad is a kernel
//! trampoline, outside the code window. The module therefore writes a landing stub of its own,
//! `jmp [rip+0]` and the trampoline's address, into a lead page in front of the image (loaded
//! RW+NX, made R+X with the text, never holding image bytes), and registers the range from the
//! stub to the end of the text. The stub preserves every register, so the trampoline sees the
//! faulting context (r10 = faulting PC). The trampoline's address cannot be checked: a pad
//! outside the text is made with the `unsafe` [`LandingPad::external`], whose contract is the
//! trampoline's. The range registered also covers any image pages between the lead page and
//! the text: they hold no trap site, so no lookup ever hits there.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::config::ModuleError;
use super::state::ModuleState;
use super::CodeModule;
use crate::code_events::CodeEvent;
use crate::code_object::{CodeDesc, CodeKind, CodeObject};
use crate::manager::ImagePages;
use crate::mmu::Mmu;
use crate::range::page_round_up;
use crate::sync::grace::GraceTicket;
use crate::trap::{TrapError, TrapHandle, TrapRegistration, TrapVector};
use crate::{AddressRange, PAGE_SIZE};

/// Bytes in front of an image: one page for the landing stub.
const LEAD: usize = PAGE_SIZE;

/// Serial numbers of images: a [`CodeImage`] names one image of one module, never reused.
static IMAGE_SERIALS: AtomicU64 = AtomicU64::new(1);

/// An image loaded into a code space of a module by [`CodeModule::load_image`]: its pages
/// are R+NX until [`CodeModule::publish_image`] makes its text R+X. Not `Clone`: handing it to
/// [`CodeModule::unpublish_image`] gives it back. Dropping it keeps the image loaded (and
/// published) until the module is dropped.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a loaded image stays in the module until unpublished or the module is dropped"]
pub struct CodeImage {
    bytes: AddressRange,
    serial: u64,
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
pub struct LandingPad(Pad);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pad {
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
    /// domain after [`CodeModule::unpublish_image`] (or the module's drop). Its address is
    /// checked to lie outside the module's code spaces and outside the code window's unused
    /// parts; nothing else about it can be.
    #[must_use]
    pub const unsafe fn external(entry: usize) -> Self {
        LandingPad(Pad::External(entry))
    }
}

/// What [`CodeModule::publish_image`] registers for an image's text.
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

/// A loaded image in the module's books.
pub(super) struct Image {
    pub pages: ImagePages,
    pub serial: u64,
    /// The image's bytes (after the lead page).
    pub bytes: AddressRange,
    pub published: Option<Published>,
}

/// A published image's registrations.
pub(super) struct Published {
    pub object: Arc<CodeObject>,
    pub trap: Option<TrapHandle>,
}

/// An unpublished image waiting for its grace period, still registered.
pub(super) struct RetiredImage {
    pub image: Image,
    pub ticket: GraceTicket,
}

/// `e` with the offsets it names counted from the text's start again (registered ones count
/// from the lead page when there is a stub).
fn text_offsets(e: TrapError, shift: usize) -> TrapError {
    let back = |o: u32| o.wrapping_sub(shift as u32);
    match e {
        TrapError::OffsetOutOfRange { offset } => TrapError::OffsetOutOfRange {
            offset: back(offset),
        },
        TrapError::DuplicateOffset { offset } => TrapError::DuplicateOffset {
            offset: back(offset),
        },
        e => e,
    }
}

/// `jmp [rip+0]` followed by the absolute target: 14 bytes, every register preserved.
fn landing_stub(target: usize) -> [u8; 14] {
    let mut stub = [0u8; 14];
    stub[..6].copy_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
    stub[6..].copy_from_slice(&(target as u64).to_le_bytes());
    stub
}

impl<M: Mmu + Send + 'static> CodeModule<M> {
    /// Copies `bytes` into fresh page-aligned pages of a code space of this module (a new one
    /// if none has room) through their writable, non-executable mapping, then makes every page
    /// read-only and non-executable (one flush). The image starts on a page boundary.
    ///
    /// # Errors
    /// [`ModuleError::Code`]`(`[`InvalidSize`](crate::CodeError::InvalidSize)`)` for an empty
    /// image; [`CodeSpaceTooLarge`](crate::CodeError::CodeSpaceTooLarge) when it does not fit a
    /// code space; commit limit, window or frames exhausted; backend failures; [`ModuleError::Busy`].
    /// Nothing changes on error.
    pub fn load_image(&self, bytes: &[u8]) -> Result<CodeImage, ModuleError> {
        self.writing(|s| {
            let before = (s.allocator.code_spaces().len(), s.tables.len());
            let pages = match s.allocator.load_image(bytes, LEAD) {
                Ok(p) => p,
                Err(e) => {
                    s.undo_new_spaces(before);
                    return Err(e.into());
                }
            };
            let start = pages.range().start() + LEAD;
            let image = Image {
                serial: IMAGE_SERIALS.fetch_add(1, Ordering::Relaxed),
                bytes: AddressRange::new(start, start + bytes.len()),
                pages,
                published: None,
            };
            let handle = CodeImage {
                bytes: image.bytes,
                serial: image.serial,
            };
            s.images.insert(start, image);
            Ok(handle)
        })
    }

    /// Makes exactly `text` (page aligned, inside `image`) executable, R+X — every other page of
    /// the image stays R+NX — after registering `traps` for it in one trap-table update and the
    /// text for PC lookup ([`lookup_code`](Self::lookup_code) names it). All page changes take
    /// one flush (one shootdown round).
    ///
    /// # Errors
    /// [`ModuleError::UnknownImage`] (another module's image, or unpublished);
    /// [`ModuleError::ImageAlreadyPublished`]; [`ModuleError::ImageTextUnaligned`];
    /// [`ModuleError::ImageTextOutside`] (not inside the image's pages);
    /// [`ModuleError::BadLandingPad`] (sites without a pad, a pad in the text past its end, an
    /// external pad inside this module's code spaces or in no code space of the window);
    /// [`ModuleError::Trap`] for invalid sites (offsets are the text's) or fault ranges;
    /// backend failures; [`ModuleError::Busy`]. Nothing changes on error (see
    /// [`CodeError::FlushFailed`](crate::CodeError::FlushFailed) for a failed undo).
    pub fn publish_image(
        &self,
        image: &CodeImage,
        text: AddressRange,
        traps: &ImageTraps<'_>,
    ) -> Result<(), ModuleError> {
        self.writing(|s| {
            let img = s.image(image)?;
            if img.published.is_some() {
                return Err(ModuleError::ImageAlreadyPublished);
            }
            let bytes = img.bytes;
            let aligned = text.start().is_multiple_of(PAGE_SIZE)
                && text.end().is_multiple_of(PAGE_SIZE)
                && !text.is_empty();
            if !aligned {
                return Err(ModuleError::ImageTextUnaligned { text });
            }
            let pages = AddressRange::new(bytes.start(), page_round_up(bytes.end()).unwrap_or(0));
            if !pages.contains_range(&text) {
                return Err(ModuleError::ImageTextOutside { text });
            }
            let lead = match traps.landing_pad {
                Some(LandingPad(Pad::External(entry))) => {
                    let outside = s.allocator.space_of(entry).is_none()
                        && (!self.manager.window().contains(entry)
                            || self.manager.space_of(entry)?.is_some());
                    if !outside {
                        return Err(ModuleError::BadLandingPad);
                    }
                    Some(landing_stub(entry))
                }
                Some(LandingPad(Pad::Text(offset))) if offset as usize >= text.size() => {
                    return Err(ModuleError::BadLandingPad)
                }
                None if !traps.sites.is_empty() => return Err(ModuleError::BadLandingPad),
                _ => None,
            };
            s.publish_image_locked(image.bytes.start(), text, traps, lead)
        })
    }

    /// Retires `image`: it stays mapped, registered and (its text) executable for a grace period
    /// of the registries' domain, then its trap and PC entries go and its pages are freed whole
    /// (by a later [`reclaim`](Self::reclaim) or any writing method). Loaded but never published
    /// images go the same way.
    ///
    /// # Errors
    /// [`ModuleError::UnknownImage`] (another module's image; nothing changes);
    /// [`ModuleError::Busy`].
    pub fn unpublish_image(&self, image: CodeImage) -> Result<(), ModuleError> {
        self.writing(|s| {
            s.image(&image)?;
            let Some(img) = s.images.remove(&image.bytes.start()) else {
                return Err(ModuleError::UnknownImage);
            };
            // No code pointer of the module leads into an image: the ticket can be taken now.
            let ticket = s.registries.grace().defer();
            s.retired_images.push(RetiredImage { image: img, ticket });
            Ok(())
        })
    }

    /// Loaded images (published or not) and unpublished ones waiting for their grace period.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn image_count(&self) -> Result<(usize, usize), ModuleError> {
        self.with(|s| Ok((s.images.len(), s.retired_images.len())))
    }
}

impl<M: Mmu> ModuleState<M> {
    /// The book entry of `image`, if this module loaded it and did not unpublish it.
    fn image(&self, image: &CodeImage) -> Result<&Image, ModuleError> {
        self.images
            .get(&image.bytes.start())
            .filter(|i| i.serial == image.serial)
            .ok_or(ModuleError::UnknownImage)
    }

    /// Registers the trap sites and PC lookup of `text`, then flips it R+X; undoes each step if
    /// a later one fails.
    fn publish_image_locked(
        &mut self,
        start: usize,
        text: AddressRange,
        traps: &ImageTraps<'_>,
        lead: Option<[u8; 14]>,
    ) -> Result<(), ModuleError> {
        let Some(img) = self.images.get(&start) else {
            return Err(ModuleError::UnknownImage);
        };
        let stub = img.pages.range().start();
        let trap = if traps.sites.is_empty() {
            None
        } else {
            if let Some(&(offset, _)) = traps.sites.iter().find(|s| s.0 as usize >= text.size()) {
                return Err(ModuleError::Trap(TrapError::OffsetOutOfRange { offset }));
            }
            // With a stub, the registered code runs from the stub to the end of the text.
            let (code, landing_pad) = match (lead, traps.landing_pad) {
                (Some(_), _) => (AddressRange::new(stub, text.end()), stub),
                (None, Some(LandingPad(Pad::Text(o)))) => (text, text.start() + o as usize),
                (None, _) => return Err(ModuleError::BadLandingPad),
            };
            let shift = text.start() - code.start();
            let shifted = traps
                .sites
                .iter()
                .map(|&(o, v)| {
                    u32::try_from(o as usize + shift)
                        .map(|o| (o, v))
                        .map_err(|_| {
                            ModuleError::Trap(TrapError::CodeTooLarge { size: code.size() })
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let registration = TrapRegistration {
                code,
                protected: &[],
                sites: &shifted,
                landing_pad,
                fault_ranges: traps.fault_ranges,
            };
            // SAFETY: `code` is pages of this module's own image: the lead page (the landing
            // stub written below, or nothing executable) and the image up to the end of its
            // text, with the sites inside the text (checked above) and the pad at the stub or
            // in the text. The pages are freed only after the handle is released
            // (`release_image` after a grace period, or the module's drop).
            let handle = unsafe { self.registries.traps.register_with(&registration) }
                .map_err(|e| ModuleError::Trap(text_offsets(e, shift)))?;
            Some(handle)
        };
        let object = CodeObject::new(&CodeDesc {
            kind: CodeKind::Image,
            index: None,
            instructions: text,
            protected_instructions: &[],
            relocations: &[],
            source_positions: &[],
            name: traps.name,
        })
        .map(Arc::new)
        .map_err(ModuleError::Metadata);
        let registered = object.and_then(|object| {
            self.registries
                .code
                .insert(Arc::clone(&object))
                .map(|()| object)
                .map_err(ModuleError::CodeMap)
        });
        let object = match registered {
            Ok(o) => o,
            Err(e) => {
                if let Some(h) = trap {
                    let _ = self.registries.traps.release(h);
                }
                return Err(e);
            }
        };
        let Some(img) = self.images.get_mut(&start) else {
            return Err(ModuleError::UnknownImage);
        };
        let flipped = self
            .allocator
            .publish_image(&img.pages, text, lead.as_ref().map(|l| &l[..]));
        match flipped {
            Ok(()) | Err(crate::CodeError::SyncFailed(_)) => {}
            Err(e) => {
                let _ = self.registries.code.remove(text.start());
                if let Some(h) = trap {
                    let _ = self.registries.traps.release(h);
                }
                return Err(e.into());
            }
        }
        if let Some(listener) = self.listener {
            listener.code_published(&CodeEvent::new(&object));
        }
        img.published = Some(Published { object, trap });
        flipped.map_err(Into::into)
    }

    /// Takes `images` out of the trap table and the PC map (one update each) and reports them
    /// freed. Only for images no CPU can be running.
    pub(super) fn unregister_images(&mut self, images: &mut [Image]) {
        let published: Vec<Published> = images
            .iter_mut()
            .filter_map(|i| i.published.take())
            .collect();
        let handles: Vec<TrapHandle> = published.iter().filter_map(|p| p.trap).collect();
        if self.registries.traps.release_batch(&handles).is_err() {
            for h in handles {
                let _ = self.registries.traps.release(h);
            }
        }
        let starts: Vec<usize> = published
            .iter()
            .map(|p| p.object.instruction_start())
            .collect();
        self.registries.code.remove_batch(&starts);
        if let Some(listener) = self.listener {
            for p in &published {
                listener.code_freed(&CodeEvent::new(&p.object));
            }
        }
    }

    /// Unregisters and frees unpublished images whose grace period is over; returns how many.
    pub(super) fn reclaim_images(&mut self) -> usize {
        let grace = self.registries.grace();
        let (over, waiting): (Vec<RetiredImage>, Vec<RetiredImage>) =
            core::mem::take(&mut self.retired_images)
                .into_iter()
                .partition(|r| grace.is_over(r.ticket));
        self.retired_images = waiting;
        let mut images: Vec<Image> = over.into_iter().map(|r| r.image).collect();
        self.unregister_images(&mut images);
        let freed = images.len();
        for image in images {
            // SAFETY: the image was unpublished and a grace period of the registries' domain
            // has passed since: no CPU runs, returns into or reads it any more (the kernel's
            // quiescent states promise it), and its trap and PC entries are gone.
            let _ = unsafe { self.allocator.free_image(image.pages) };
        }
        freed
    }
}
