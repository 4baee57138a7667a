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

mod books;
mod types;

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use super::config::ModuleError;
use super::CodeModule;
use crate::code_object::CodeObject;
use crate::manager::{ImagePages, ImageSource};
use crate::mmu::Mmu;
use crate::range::page_round_up;
use crate::sync::grace::GraceTicket;
use crate::trap::{TrapError, TrapHandle};
use crate::{AddressRange, PAGE_SIZE};
use types::Pad;
pub use types::{CodeImage, ImageTraps, LandingPad};

/// Bytes in front of an image: one page for the landing stub.
const LEAD: usize = PAGE_SIZE;

/// Serial numbers of images: a [`CodeImage`] names one image of one module, never reused.
static IMAGE_SERIALS: AtomicU64 = AtomicU64::new(1);

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
        self.load(ImageSource::Bytes(bytes))
    }

    /// Like [`load_image`](Self::load_image) for `len` bytes that `fill` writes once their
    /// address is known: it gets the address of the image's first byte and the zeroed bytes to
    /// write, before anything is made read-only. For data whose pointers point into the image
    /// itself (a JIT's read-only data objects referring to each other). `fill` runs under the
    /// module's lock: it must not call into this module.
    ///
    /// # Errors
    /// As [`load_image`](Self::load_image) (`len == 0` is
    /// [`InvalidSize`](crate::CodeError::InvalidSize)); `fill` is not called then, or its bytes
    /// are discarded. Nothing changes on error.
    pub fn load_image_with(
        &self,
        len: usize,
        fill: impl FnOnce(usize, &mut [u8]),
    ) -> Result<CodeImage, ModuleError> {
        let mut fill = Some(fill);
        let mut once = |start: usize, bytes: &mut [u8]| {
            if let Some(f) = fill.take() {
                f(start, bytes);
            }
        };
        self.load(ImageSource::Fill(len, &mut once))
    }

    fn load(&self, source: ImageSource<'_>) -> Result<CodeImage, ModuleError> {
        let len = match &source {
            ImageSource::Bytes(bytes) => bytes.len(),
            ImageSource::Fill(len, _) => *len,
        };
        self.writing(|s| {
            let before = (s.allocator.code_spaces().len(), s.tables.len());
            let pages = match s.allocator.load_image(source, LEAD) {
                Ok(p) => p,
                Err(e) => {
                    s.undo_new_spaces(before);
                    return Err(e.into());
                }
            };
            // Every code space of the module reaches a jump table before code lands in it
            // (later code may be allocated next to the image).
            if let Err(e) = s.ensure_tables_for(pages.range().start()) {
                // SAFETY: never executable and never handed out: nothing runs or reads it.
                let _ = unsafe { s.allocator.free_image(pages) };
                s.undo_new_spaces(before);
                return Err(e);
            }
            let start = pages.range().start() + LEAD;
            let image = Image {
                serial: IMAGE_SERIALS.fetch_add(1, Ordering::Relaxed),
                bytes: AddressRange::new(start, start + len),
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
                    // Without sites nothing lands: no stub page becomes executable.
                    (!traps.sites.is_empty()).then(|| landing_stub(entry))
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
