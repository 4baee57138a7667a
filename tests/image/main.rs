//! Host tests of images with per-range protections (`CodeModule::load_image`, `publish_image`,
//! `unpublish_image`) on the software machine: 4 CPUs with per-CPU TLBs and a direct map (one
//! CPU in flip mode).
//!
//! What they prove: no byte of an image outside its text is ever executable — checked against
//! the machine's record of every leaf ever stored executable, across load, publish, unpublish,
//! module drop and every injected backend failure; the text is executable on every CPU once
//! published and its trap sites resolve for their vector only; bad ranges get typed errors and
//! change nothing; W^X holds at every step (the machine's violation recorder) and the audit is
//! clean after every operation.

#[path = "../common/mod.rs"]
mod common;

mod errors;
mod inject;

use codespace::code_object::CodeKind;
use codespace::mmu::soft::SoftMmu;
use codespace::module::NewCode;
use codespace::module::{CodeImage, CodeModule, ImageTraps, LandingPad, Registries};
use codespace::trap::TrapVector;
use codespace::{AddressRange, CodeManager, ManagerConfig, ProtectionMode};
use iced_x86::Mnemonic;

use common::*;

/// A kernel trampoline the landing stubs jump to: outside the code window. No CPU executes it
/// in these tests (nothing faults), so the `unsafe` contract of `LandingPad::external` holds.
pub const TRAMPOLINE: usize = 0x20_0000;
/// A linear memory's reservation and the null range, the #PF sites' accepted fault addresses.
pub const MEMORY: AddressRange = AddressRange::new(0x10_0000_0000, 0x11_0000_0000);
pub const NULL: AddressRange = AddressRange::new(0, 0x1_0000);

/// Six pages and a bit: data (2 pages), text (2 pages), data (2 pages and 100 bytes).
pub fn image_bytes() -> Vec<u8> {
    (0..6 * PAGE + 100)
        .map(|i| (i * 7 + i / PAGE) as u8)
        .collect()
}

/// The text of an image at `image`: its pages 2 and 3.
pub fn text_of(image: &CodeImage) -> AddressRange {
    let s = image.range().start();
    AddressRange::new(s + 2 * PAGE, s + 4 * PAGE)
}

pub const SITES: [(u32, TrapVector); 4] = [
    (0x10, TrapVector::PageFault),
    (0x20, TrapVector::InvalidOpcode),
    (0x30, TrapVector::DivideError),
    (PAGE as u32 + 0x40, TrapVector::PageFault),
];
pub const FAULT_RANGES: [AddressRange; 2] = [MEMORY, NULL];

pub fn traps(pad: LandingPad) -> ImageTraps<'static> {
    ImageTraps {
        sites: &SITES,
        fault_ranges: &FAULT_RANGES,
        landing_pad: Some(pad),
        name: Some("wasm[0]"),
    }
}

pub fn external_pad() -> LandingPad {
    // SAFETY: see `TRAMPOLINE`.
    unsafe { LandingPad::external(TRAMPOLINE) }
}

pub struct Rig {
    pub machine: SoftMmu,
    pub manager: CodeManager<SoftMmu>,
    pub regs: &'static Registries,
    pub module: CodeModule<SoftMmu>,
}

/// A module of 2 functions in `mode` (in the ROX mode its images go to 4 KiB spaces of their
/// own, its code to ROX pages).
pub fn rig_for(mode: Mode) -> Rig {
    let (machine, manager) = rig(1 << 14, mode.manager(ManagerConfig::default()));
    let regs = registries();
    let module = module(&manager, regs, mode.module(functions(2)));
    Rig {
        machine,
        manager,
        regs,
        module,
    }
}

/// The pages of `range` that are mapped executable now.
pub fn executable_now(r: &Rig, range: AddressRange) -> Vec<usize> {
    range
        .pages()
        .filter(|&p| r.manager.query(p).unwrap().is_some_and(|m| m.executable))
        .collect()
}

/// In the ROX mode: `image` is on 4 KiB pages in a code space of its own, not a ROX one and
/// not a fallback, while the module's `code` stays on its 2 MiB ROX page.
fn assert_image_beside_rox_code(r: &Rig, image: &CodeImage, code: usize) {
    let spaces = r.module.code_spaces().unwrap();
    let space_of = |a: usize| spaces.iter().copied().find(|s| s.contains(a)).unwrap();
    assert_ne!(
        space_of(image.range().start()),
        space_of(code),
        "shares code's space"
    );
    let stats = r.manager.stats();
    assert_eq!((stats.rox_spaces, stats.rox_fallbacks), (1, 0), "{stats:?}");
    let audit = r.manager.audit().unwrap();
    let pages = image.range().end().next_multiple_of(PAGE) - image.range().start() + PAGE;
    assert_eq!(audit.huge_leaves, 1, "the code's 2 MiB page only");
    assert!(audit.small_leaves >= pages / PAGE, "{audit:?}");
    let leaf = r.manager.query(code).unwrap().unwrap();
    assert!(leaf.executable && !leaf.writable);
}

/// The image's pages (lead page included) that were ever executable are exactly `allowed`.
pub fn assert_executable_history(r: &Rig, image: AddressRange, allowed: &[usize]) {
    let all = AddressRange::new(image.start() - PAGE, image.end().next_multiple_of(PAGE));
    assert_eq!(
        r.machine.ever_executable(all),
        allowed,
        "pages ever executable"
    );
}

#[test]
fn only_the_text_is_ever_executable_from_load_to_free() {
    for mode in MODES {
        let r = rig_for(mode);
        // In the ROX mode the module's code is on a ROX page; its image must not be.
        let code = mode.rox.then(|| {
            let f = r
                .module
                .add_code(&NewCode::function(0, &[0xC3; 64]))
                .unwrap();
            mode.assert_in_use(&r.manager);
            f.instruction_start()
        });
        let bytes = image_bytes();
        let committed = r.manager.committed();
        let rounds = r.manager.flush_stats().unwrap();
        let image = r.module.load_image(&bytes).unwrap();
        assert_eq!(image.len(), bytes.len());
        assert!(image.range().start().is_multiple_of(PAGE));
        assert_eq!(read(&r.manager, image.range().start(), bytes.len()), bytes);
        let pages = AddressRange::new(
            image.range().start(),
            image.range().end().next_multiple_of(PAGE),
        );
        for p in pages.pages() {
            let m = r.manager.query(p).unwrap().expect("mapped");
            assert!(!m.writable && !m.executable, "{p:#x} R+NX after load");
        }
        // One flush for the whole image (the pages were fresh: no other round).
        if mode.protection == ProtectionMode::Alias {
            let after_load = r.manager.flush_stats().unwrap();
            assert_eq!(
                after_load.shootdowns - rounds.shootdowns,
                1,
                "one round to load"
            );
        }
        assert_executable_history(&r, image.range(), &[]);
        assert_sound(&r.machine, &r.manager);
        if let Some(code) = code {
            assert_image_beside_rox_code(&r, &image, code);
        }

        let text = text_of(&image);
        let before = r.manager.flush_stats().unwrap();
        r.module
            .publish_image(&image, text, &traps(external_pad()))
            .unwrap();
        let after = r.manager.flush_stats().unwrap();
        if mode.protection == ProtectionMode::Alias {
            assert_eq!(
                after.shootdowns - before.shootdowns,
                1,
                "one shootdown round"
            );
        }
        let lead = image.range().start() - PAGE;
        let expected: Vec<usize> = core::iter::once(lead).chain(text.pages()).collect();
        assert_eq!(executable_now(&r, pages), text.pages().collect::<Vec<_>>());
        assert_executable_history(&r, image.range(), &expected);
        // The landing stub: `jmp [rip+0]` to the trampoline, as every CPU executes it.
        let cpus = if mode.protection == ProtectionMode::Flip {
            1
        } else {
            4
        };
        for cpu in 0..cpus {
            let mut fetched = [0u8; 14];
            r.machine.exec_as(cpu, lead, &mut fetched).unwrap();
            let stub = decode(&fetched, lead);
            assert_eq!(stub[0].mnemonic(), Mnemonic::Jmp);
            assert_eq!(indirect_jmp_operand(&stub[0]), lead + 6);
            assert_eq!(
                u64::from_le_bytes(fetched[6..].try_into().unwrap()),
                TRAMPOLINE as u64
            );
            let mut code = [0u8; 16];
            r.machine
                .exec_as(cpu, text.start() + 0x10, &mut code)
                .unwrap();
            assert_eq!(code[..], bytes[2 * PAGE + 0x10..2 * PAGE + 0x20]);
            assert!(r
                .machine
                .exec_as(cpu, text.start() - 1, &mut code[..1])
                .is_err());
            assert!(r.machine.exec_as(cpu, text.end(), &mut code[..1]).is_err());
        }
        // Trap sites: each resolves for its vector only, resuming at the stub.
        let t = &r.regs.traps;
        let pf = t
            .lookup_fault(text.start() + 0x10, MEMORY.start() + 8)
            .unwrap();
        assert_eq!(
            (pf.landing_pad(), pf.pc(), pf.vector()),
            (lead, text.start() + 0x10, TrapVector::PageFault)
        );
        assert!(
            t.lookup_fault(text.start() + PAGE + 0x40, 0x8).is_some(),
            "null range"
        );
        assert!(
            t.lookup_fault(text.start() + 0x10, 0x2_0000).is_none(),
            "outside every range"
        );
        let ud = t
            .lookup_trap(TrapVector::InvalidOpcode, text.start() + 0x20)
            .unwrap();
        assert_eq!(ud.landing_pad(), lead);
        assert!(t
            .lookup_trap(TrapVector::DivideError, text.start() + 0x20)
            .is_none());
        assert!(t
            .lookup_trap(TrapVector::DivideError, text.start() + 0x30)
            .is_some());
        assert!(t
            .lookup_fault(text.start() + 0x20, MEMORY.start())
            .is_none());
        for data in [image.range().start() + 0x10, text.end() + 0x10] {
            assert!(t.lookup_fault(data, MEMORY.start()).is_none());
        }
        // PC lookup names the text, and only the text.
        let object = r.module.lookup_code(text.start() + 5).unwrap();
        assert_eq!(
            (object.kind(), object.instructions()),
            (CodeKind::Image, text)
        );
        assert_eq!(object.debug_name().to_string(), "wasm[0]");
        assert!(r.module.lookup_code(text.start() - 1).is_none());
        assert_sound(&r.machine, &r.manager);

        // Unpublished: registered and executable until a grace period passed.
        r.module.unpublish_image(image).unwrap();
        assert_eq!(r.module.image_count().unwrap(), (0, 1));
        r.module.reclaim().unwrap();
        assert!(t
            .lookup_trap(TrapVector::InvalidOpcode, text.start() + 0x20)
            .is_some());
        assert_eq!(executable_now(&r, pages).len(), 2);
        pass_grace(r.regs);
        assert_eq!(r.module.reclaim().unwrap(), 1);
        assert_eq!(r.module.image_count().unwrap(), (0, 0));
        assert!(t
            .lookup_trap(TrapVector::InvalidOpcode, text.start() + 0x20)
            .is_none());
        assert!(t
            .lookup_fault(text.start() + 0x10, MEMORY.start())
            .is_none());
        assert!(r.module.lookup_code(text.start()).is_none());
        assert!(
            t.is_empty() && r.regs.code.len() == 1 + usize::from(code.is_some()),
            "only the module's jump table (and its function in the ROX mode) is left"
        );
        assert!(
            pages.pages().all(|p| !is_mapped(&r.manager, p)),
            "decommitted"
        );
        assert_eq!(r.manager.committed(), committed);
        let whole = AddressRange::new(lead, pages.end());
        assert_eq!(r.machine.ever_executable(whole), expected, "{mode:?}");
        assert_sound_no_leak(&r.machine, &r.manager);
    }
}

#[test]
fn a_pad_in_the_text_needs_no_stub() {
    let r = rig_for(Mode::ALIAS);
    let image = r.module.load_image(&image_bytes()).unwrap();
    let text = text_of(&image);
    r.module
        .publish_image(&image, text, &traps(LandingPad::in_text(0x100)))
        .unwrap();
    let hit = r
        .regs
        .traps
        .lookup_trap(TrapVector::DivideError, text.start() + 0x30)
        .unwrap();
    assert_eq!(
        (hit.code(), hit.landing_pad()),
        (text, text.start() + 0x100)
    );
    let lead = image.range().start() - PAGE;
    assert_eq!(
        leaf_flags(&r.machine, lead),
        RW_NX,
        "the lead page stays RW+NX"
    );
    assert_executable_history(&r, image.range(), &text.pages().collect::<Vec<_>>());
    // An image without trap sites needs no pad at all, and an external pad then writes no stub.
    let plain = r.module.load_image(&[0xC3; 100]).unwrap();
    let one = AddressRange::new(plain.range().start(), plain.range().start() + PAGE);
    let unused = ImageTraps {
        landing_pad: Some(external_pad()),
        ..ImageTraps::NONE
    };
    r.module.publish_image(&plain, one, &unused).unwrap();
    assert_executable_history(&r, plain.range(), &[one.start()]);
    assert_eq!(
        r.module
            .lookup_code(one.start())
            .unwrap()
            .debug_name()
            .to_string(),
        "image"
    );
    assert_eq!(r.regs.traps.len(), 1);
    assert_sound(&r.machine, &r.manager);
}

#[test]
fn dropping_the_module_unregisters_and_frees_its_images() {
    let r = rig_for(Mode::ALIAS);
    let published = r.module.load_image(&image_bytes()).unwrap();
    let text = text_of(&published);
    r.module
        .publish_image(&published, text, &traps(external_pad()))
        .unwrap();
    let retired = r.module.load_image(&image_bytes()).unwrap();
    r.module
        .publish_image(&retired, text_of(&retired), &traps(external_pad()))
        .unwrap();
    let loaded = r.module.load_image(&[1, 2, 3]).unwrap();
    r.module.unpublish_image(retired).unwrap();
    assert_eq!(r.regs.traps.len(), 2);
    let Rig {
        machine,
        manager,
        regs,
        module,
    } = r;
    drop(module);
    assert!(regs
        .traps
        .lookup_trap(TrapVector::InvalidOpcode, text.start() + 0x20)
        .is_some());
    assert_eq!(settle(regs), 1);
    assert!(regs.traps.is_empty() && regs.code.is_empty());
    assert_eq!(manager.committed(), 0);
    assert_eq!(manager.stats().code_spaces, 0);
    drop((published, loaded));
    assert_sound_no_leak(&machine, &manager);
}

#[test]
fn an_image_filled_once_its_address_is_known_holds_pointers_into_itself() {
    for mode in MODES {
        let r = rig_for(mode);
        let mut seen = None;
        // Two words: the address of the second one, then 7 (data pointing into itself).
        let image = r
            .module
            .load_image_with(16, |start, bytes| {
                assert_eq!(bytes, &[0; 16], "zeroed");
                seen = Some(start);
                bytes[..8].copy_from_slice(&(start as u64 + 8).to_le_bytes());
                bytes[8..].copy_from_slice(&7u64.to_le_bytes());
            })
            .unwrap();
        let start = image.range().start();
        assert_eq!(seen, Some(start), "the closure saw the image's address");
        let mut expected = (start as u64 + 8).to_le_bytes().to_vec();
        expected.extend_from_slice(&7u64.to_le_bytes());
        assert_eq!(read(&r.manager, start, 16), expected);
        assert!(executable_now(&r, image.range()).is_empty());
        assert!(
            !r.manager.query(start).unwrap().unwrap().writable,
            "read-only once loaded"
        );
        // Nothing to fill: refused before the closure runs, nothing changes.
        let committed = r.manager.committed();
        let e = r
            .module
            .load_image_with(0, |_, _| panic!("not called"))
            .unwrap_err();
        assert!(
            matches!(
                e,
                codespace::module::ModuleError::Code(codespace::CodeError::InvalidSize { size: 0 })
            ),
            "{e:?}"
        );
        assert_eq!(r.manager.committed(), committed);
        assert_executable_history(&r, image.range(), &[]);
        r.module.unpublish_image(image).unwrap();
    }
}
