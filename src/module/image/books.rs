//! The module's books of images: publishing under the module lock, unregistering, freeing.

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::{text_offsets, Image, ImageTraps, LandingPad, Pad, Published, RetiredImage};
use crate::code_events::CodeEvent;
use crate::code_object::{CodeDesc, CodeKind, CodeObject};
use crate::mmu::Mmu;
use crate::module::config::ModuleError;
use crate::module::state::ModuleState;
use crate::trap::{TrapError, TrapHandle, TrapRegistration};
use crate::AddressRange;

impl<M: Mmu> ModuleState<M> {
    /// The book entry of `image`, if this module loaded it and did not unpublish it.
    pub(super) fn image(&self, image: &super::CodeImage) -> Result<&Image, ModuleError> {
        self.images
            .get(&image.bytes.start())
            .filter(|i| i.serial == image.serial)
            .ok_or(ModuleError::UnknownImage)
    }

    /// Registers the trap sites and PC lookup of `text`, then flips it R+X; undoes each step if
    /// a later one fails.
    pub(super) fn publish_image_locked(
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
    pub(in crate::module) fn unregister_images(&mut self, images: &mut [Image]) {
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
    pub(in crate::module) fn reclaim_images(&mut self) -> usize {
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
