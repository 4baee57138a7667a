//! wasmtime's code memory on codespace: a precompiled module is copied into code-window pages
//! (readable, never writable through the window, not executable), wasmtime reads it in place
//! (`Module::deserialize_raw`), and when it publishes the text only the text becomes executable
//! — every other page of the image stays R+NX — with every trap site of `.wasmtime.traps`
//! registered in codespace's trap table, in the same update.
//!
//! Each trap site gets the exception its instruction raises, read from the instruction itself
//! (wasmtime records the trap code, not the vector): `ud2` raises #UD (unreachable, stack
//! overflow, explicit checks), `div`/`idiv` #DE (a zero divisor), anything else is a memory
//! access raising #PF, resumed only for addresses in the platform's fault ranges.

use alloc::format;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ptr::NonNull;

use codespace::mmu::Mmu;
use codespace::module::{CodeImage, CodeModule, ImageTraps, LandingPad, ModuleError};
use codespace::trap::TrapVector;
use codespace::AddressRange;
use object::read::elf::ElfFile64;
use object::{LittleEndian, Object, ObjectSection};
use wasmtime::{CustomCodeMemory, Engine, Module};

use crate::image::{self, ImageError};
use crate::settings;

/// Why [`WasmCode::load`] refused a container.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError {
    /// The container's header, settings or checksum (nothing was placed).
    Image(ImageError),
    /// codespace could not place the image (nothing was placed).
    Code(ModuleError),
    /// wasmtime refused the image (other target, flags, tunables or version; a malformed
    /// object); the image was unpublished again.
    Wasmtime(wasmtime::Error),
}

/// wasmtime's code memory over one codespace module. Create it first, give it to the engine's
/// `Config::with_custom_code_memory`, then [`load`](Self::load) modules with that engine.
pub struct WasmCode<M: Mmu + Send + 'static> {
    module: Arc<CodeModule<M>>,
    /// Where a #PF at a trap site is wasm's (linear memories' reservations, the null page).
    fault_ranges: Vec<AddressRange>,
    /// Images placed and not yet unpublished. Taken only outside exceptions (loading,
    /// publishing, dropping a module), so a spin lock suffices: a waiter spins with interrupts
    /// as they were and keeps answering IPIs.
    images: spin::Mutex<Vec<CodeImage>>,
}

impl<M: Mmu + Send + 'static> core::fmt::Debug for WasmCode<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WasmCode")
            .field("fault_ranges", &self.fault_ranges)
            .field("images", &self.images.lock().len())
            .finish_non_exhaustive()
    }
}

/// The exception a trap site's instruction raises: `ud2` → #UD, `div`/`idiv` (opcode F6/F7 with
/// ModRM.reg 6 or 7, after operand-size and REX prefixes) → #DE, anything else #PF.
#[must_use]
pub fn classify_site(code: &[u8]) -> TrapVector {
    if code.starts_with(&[0x0F, 0x0B]) {
        return TrapVector::InvalidOpcode;
    }
    let mut at = 0;
    while code
        .get(at)
        .is_some_and(|&b| b == 0x66 || (0x40..=0x4F).contains(&b))
    {
        at += 1;
    }
    match (code.get(at), code.get(at + 1)) {
        (Some(0xF6 | 0xF7), Some(modrm)) if (modrm >> 3) & 7 >= 6 => TrapVector::DivideError,
        _ => TrapVector::PageFault,
    }
}

/// The trap sites of the wasmtime ELF image `elf` whose text is `text`, with their vectors.
fn trap_sites(elf: &[u8], text: &[u8]) -> Result<Vec<(u32, TrapVector)>, &'static str> {
    let file = ElfFile64::<LittleEndian>::parse(elf).map_err(|_| "not an ELF image")?;
    let Some(section) = file.section_by_name(wasmtime_environ::obj::ELF_WASMTIME_TRAPS) else {
        return Ok(Vec::new());
    };
    let data = section.data().map_err(|_| "unreadable trap section")?;
    let traps = wasmtime_environ::iterate_traps(data).ok_or("malformed trap section")?;
    let mut sites = Vec::new();
    for (offset, _) in traps {
        let at = offset as usize;
        let code = text
            .get(at..)
            .filter(|c| !c.is_empty())
            .ok_or("trap site outside the text")?;
        sites.push((offset, classify_site(&code[..code.len().min(16)])));
    }
    Ok(sites)
}

impl<M: Mmu + Send + 'static> WasmCode<M> {
    /// Code memory placing images in `module`; #PF trap sites resume for faults in
    /// `fault_ranges` only.
    #[must_use]
    pub fn new(module: Arc<CodeModule<M>>, fault_ranges: Vec<AddressRange>) -> Arc<Self> {
        Arc::new(WasmCode {
            module,
            fault_ranges,
            images: spin::Mutex::new(Vec::new()),
        })
    }

    /// The codespace module the images go into.
    #[must_use]
    pub fn module(&self) -> &Arc<CodeModule<M>> {
        &self.module
    }

    /// Images placed and not yet unpublished.
    #[must_use]
    pub fn images(&self) -> usize {
        self.images.lock().len()
    }

    /// The byte ranges of the images placed and not yet unpublished.
    #[must_use]
    pub fn image_ranges(&self) -> Vec<AddressRange> {
        self.images.lock().iter().map(CodeImage::range).collect()
    }

    /// Checks a `.cwasm` container, places its image in code memory and has wasmtime load it in
    /// place. On any error nothing stays placed or registered.
    ///
    /// # Errors
    /// [`LoadError`].
    ///
    /// # Safety
    /// `engine` was built with this code memory (`Config::with_custom_code_memory`), and
    /// `cwasm` was written by `codespace-wasm-precompile` (the checksum detects corruption, not
    /// forgery: wasmtime runs the machine code it is given).
    pub unsafe fn load(&self, engine: &Engine, cwasm: &[u8]) -> Result<Module, LoadError> {
        let payload = image::payload(cwasm, settings::fingerprint()).map_err(LoadError::Image)?;
        let image = self.module.load_image(payload).map_err(LoadError::Code)?;
        let start = image.range().start();
        let len = image.len();
        self.images.lock().push(image);
        let memory = NonNull::slice_from_raw_parts(
            NonNull::new(start as *mut u8).expect("an image is never at address 0"),
            len,
        );
        // SAFETY: the image's pages stay mapped and unmodified until wasmtime unpublishes the
        // text (when the module drops: `unpublish_executable` retires the image after a grace
        // period); the bytes are a trusted precompiled module (the caller's contract).
        match unsafe { Module::deserialize_raw(engine, memory) } {
            Ok(module) => Ok(module),
            Err(e) => {
                // Not published (or unpublished by wasmtime's own cleanup): retire it if still ours.
                if let Some(image) = self.take(start, start + 1) {
                    let _ = self.module.unpublish_image(image);
                }
                Err(LoadError::Wasmtime(e))
            }
        }
    }

    /// Removes and returns the placed image holding `[start, end)`.
    fn take(&self, start: usize, end: usize) -> Option<CodeImage> {
        let mut images = self.images.lock();
        let i = images.iter().position(|im| holds(im, start, end))?;
        Some(images.swap_remove(i))
    }
}

/// Whether `image`'s pages hold `[start, end)`.
fn holds(image: &CodeImage, start: usize, end: usize) -> bool {
    let r = image.range();
    let pages_end = r.end().next_multiple_of(crate::PAGE);
    r.start() <= start && end <= pages_end
}

impl<M: Mmu + Send + 'static> CustomCodeMemory for WasmCode<M>
where
    CodeModule<M>: Send + Sync,
{
    fn required_alignment(&self) -> usize {
        crate::PAGE
    }

    fn publish_executable(&self, ptr: *const u8, len: usize) -> wasmtime::Result<()> {
        let (start, end) = (ptr as usize, ptr as usize + len);
        let images = self.images.lock();
        let image = images
            .iter()
            .find(|im| holds(im, start, end))
            .ok_or_else(|| {
                wasmtime::format_err!("text {start:#x}+{len:#x} is in no codespace image")
            })?;
        // SAFETY: the image is mapped readable in the running page table until it is
        // unpublished, which needs `images`' lock we hold.
        let bytes = unsafe { image.as_slice() };
        let text_bytes = &bytes[start - image.range().start()..][..len];
        let sites = trap_sites(bytes, text_bytes).map_err(|e| wasmtime::format_err!("{e}"))?;
        let traps = ImageTraps {
            sites: &sites,
            fault_ranges: &self.fault_ranges,
            // SAFETY: the landing pad is this crate's assembly in the kernel text (mapped R+X
            // for ever), written to be entered from any wasm trap site with r10 = the faulting
            // PC and r11 = the fault address set by the kernel's exception path.
            landing_pad: Some(unsafe { LandingPad::external(crate::trap_landing_pad()) }),
            name: Some("wasm"),
        };
        self.module
            .publish_image(image, AddressRange::new(start, end), &traps)
            .map_err(|e| wasmtime::format_err!("codespace refused the text: {e:?}"))
    }

    fn unpublish_executable(&self, ptr: *const u8, len: usize) -> wasmtime::Result<()> {
        let (start, end) = (ptr as usize, ptr as usize + len);
        let image = self
            .take(start, end)
            .ok_or_else(|| wasmtime::format_err!("text {start:#x} is in no codespace image"))?;
        self.module
            .unpublish_image(image)
            .map_err(|e| wasmtime::format_err!("{}", format!("unpublish: {e:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_are_classified_by_instruction() {
        assert_eq!(classify_site(&[0x0F, 0x0B]), TrapVector::InvalidOpcode);
        // idiv ecx; idiv rcx; div r8d; div word [rax]
        assert_eq!(classify_site(&[0xF7, 0xF9]), TrapVector::DivideError);
        assert_eq!(classify_site(&[0x48, 0xF7, 0xF9]), TrapVector::DivideError);
        assert_eq!(classify_site(&[0x41, 0xF7, 0xF0]), TrapVector::DivideError);
        assert_eq!(classify_site(&[0x66, 0xF7, 0x30]), TrapVector::DivideError);
        // mov eax, [rdi + rsi]; not eax (F7 /2); neg rax (F7 /3); test (F7 /0)
        assert_eq!(classify_site(&[0x8B, 0x04, 0x37]), TrapVector::PageFault);
        assert_eq!(classify_site(&[0xF7, 0xD0]), TrapVector::PageFault);
        assert_eq!(classify_site(&[0x48, 0xF7, 0xD8]), TrapVector::PageFault);
        assert_eq!(
            classify_site(&[0xF7, 0xC0, 1, 0, 0, 0]),
            TrapVector::PageFault
        );
        assert_eq!(classify_site(&[0x48]), TrapVector::PageFault);
    }
}
