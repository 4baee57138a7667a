//! Refused input changes nothing: unaligned, empty, foreign and out-of-image text ranges,
//! missing or misplaced landing pads, invalid sites and fault ranges, foreign and published
//! images, empty images.

use codespace::module::{ImageTraps, LandingPad, ModuleError};
use codespace::trap::{TrapError, TrapVector};
use codespace::{AddressRange, CodeError, ProtectionMode};

use super::*;

/// Everything a refused call must leave as it was.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    leaves: Vec<codespace::mmu::Leaf>,
    committed: usize,
    traps: usize,
    code: usize,
    images: (usize, usize),
    lookups: Vec<bool>,
}

pub fn seen(r: &Rig, probe: AddressRange) -> Seen {
    let window = r.manager.window();
    let t = &r.regs.traps;
    let lookups = probe
        .pages()
        .flat_map(|p| [p + 0x10, p + 0x20, p + 0x30, p + 0x40])
        .flat_map(|pc| {
            [
                t.lookup_fault(pc, MEMORY.start()).is_some(),
                t.lookup_trap(TrapVector::InvalidOpcode, pc).is_some(),
                t.lookup_trap(TrapVector::DivideError, pc).is_some(),
                r.regs.lookup_code(pc).is_some(),
            ]
        })
        .collect();
    Seen {
        leaves: r
            .machine
            .snapshot()
            .leaves
            .into_iter()
            .filter(|l| window.contains(l.virt))
            .collect(),
        committed: r.manager.committed(),
        traps: t.len(),
        code: r.regs.code.len(),
        images: r.module.image_count().unwrap(),
        lookups,
    }
}

#[test]
fn bad_ranges_and_images_are_refused_with_typed_errors() {
    let r = rig_for(Mode::ALIAS);
    let other = module(&r.manager, r.regs, functions(0));
    let image = r.module.load_image(&image_bytes()).unwrap();
    let foreign = other.load_image(&image_bytes()).unwrap();
    let s = image.range().start();
    let text = text_of(&image);
    let probe = AddressRange::new(s - PAGE, s + 8 * PAGE);
    let before = seen(&r, probe);
    let refused = |text: AddressRange, traps: &ImageTraps<'_>| {
        let e = r.module.publish_image(&image, text, traps).unwrap_err();
        assert_eq!(seen(&r, probe), before, "{e:?} changed something");
        e
    };
    let pad = traps(external_pad());
    for bad in [
        AddressRange::new(s + 2 * PAGE + 1, s + 4 * PAGE),
        AddressRange::new(s + 2 * PAGE, s + 4 * PAGE - 8),
        AddressRange::new(s + 2 * PAGE, s + 2 * PAGE),
    ] {
        assert_eq!(
            refused(bad, &pad),
            ModuleError::ImageTextUnaligned { text: bad }
        );
    }
    for bad in [
        AddressRange::new(s - PAGE, s + PAGE),
        AddressRange::new(s + 6 * PAGE, s + 8 * PAGE),
        AddressRange::new(foreign.range().start(), foreign.range().start() + PAGE),
    ] {
        assert_eq!(
            refused(bad, &pad),
            ModuleError::ImageTextOutside { text: bad }
        );
    }
    let no_pad = ImageTraps {
        landing_pad: None,
        ..pad
    };
    assert_eq!(refused(text, &no_pad), ModuleError::BadLandingPad);
    let past = ImageTraps {
        landing_pad: Some(LandingPad::in_text(2 * PAGE as u32)),
        ..pad
    };
    assert_eq!(refused(text, &past), ModuleError::BadLandingPad);
    // SAFETY: refused before anything could jump there.
    for inside in [s + 0x10, r.manager.window().start() + (256 << 30)] {
        let own = ImageTraps {
            landing_pad: Some(unsafe { LandingPad::external(inside) }),
            ..pad
        };
        assert_eq!(
            refused(text, &own),
            ModuleError::BadLandingPad,
            "pad {inside:#x}"
        );
    }
    let site_outside = ImageTraps {
        sites: &[(2 * PAGE as u32, TrapVector::InvalidOpcode)],
        ..pad
    };
    assert_eq!(
        refused(text, &site_outside),
        ModuleError::Trap(TrapError::OffsetOutOfRange {
            offset: 2 * PAGE as u32
        })
    );
    let twice = ImageTraps {
        sites: &[
            (8, TrapVector::InvalidOpcode),
            (8, TrapVector::InvalidOpcode),
        ],
        ..pad
    };
    assert_eq!(
        refused(text, &twice),
        ModuleError::Trap(TrapError::DuplicateOffset { offset: 8 })
    );
    let empty_range = [AddressRange::new(5, 5)];
    let empty = ImageTraps {
        fault_ranges: &empty_range,
        ..pad
    };
    assert_eq!(
        refused(text, &empty),
        ModuleError::Trap(TrapError::EmptyFaultRange)
    );
    assert_eq!(
        r.module.publish_image(&foreign, text, &pad),
        Err(ModuleError::UnknownImage)
    );
    assert_eq!(seen(&r, probe), before);
    assert_eq!(
        r.module.unpublish_image(foreign),
        Err(ModuleError::UnknownImage)
    );
    assert_eq!(
        other.image_count().unwrap(),
        (1, 0),
        "another module's image stays"
    );
    assert_eq!(
        r.module.load_image(&[]).unwrap_err(),
        ModuleError::Code(CodeError::InvalidSize { size: 0 })
    );
    assert_eq!(seen(&r, probe), before);

    // The last, partial page of the image may be text; published once, a second publish is
    // refused.
    let last = AddressRange::new(s + 6 * PAGE, s + 7 * PAGE);
    r.module
        .publish_image(&image, last, &ImageTraps::NONE)
        .unwrap();
    assert_eq!(
        r.module.publish_image(&image, text, &pad),
        Err(ModuleError::ImageAlreadyPublished)
    );
    assert_executable_history(&r, image.range(), &[last.start()]);
    assert_sound(&r.machine, &r.manager);
}

/// What a code window and a machine cannot hold is a typed error that changes nothing: an
/// image larger than the whole window, and one larger than the machine's memory.
#[test]
fn an_image_the_window_or_the_memory_cannot_hold_is_refused_and_changes_nothing() {
    // A 1 MiB window: a 2 MiB image has no room whatever the memory.
    let machine = machine(1 << 12);
    let manager = manager_on(&machine, window(256), config(ProtectionMode::Alias));
    let regs = registries();
    let small = module(&manager, regs, functions(0));
    let before = (
        manager.committed(),
        manager.stats(),
        machine.snapshot().leaves,
    );
    let e = small.load_image(&vec![0x90u8; 2 << 20]).unwrap_err();
    assert!(matches!(e, ModuleError::Code(_)), "{e:?}");
    assert_eq!(
        (
            manager.committed(),
            manager.stats(),
            machine.snapshot().leaves
        ),
        before
    );
    assert_eq!(small.image_count().unwrap(), (0, 0));

    // A window with room, but 80 MiB of image on a 64 MiB machine.
    let r = rig_for(Mode::ALIAS);
    let probe = AddressRange::new(
        r.manager.window().start(),
        r.manager.window().start() + (1 << 20),
    );
    let before = seen(&r, probe);
    let e = r.module.load_image(&vec![0x90u8; 80 << 20]).unwrap_err();
    assert!(matches!(e, ModuleError::Code(_)), "{e:?}");
    assert_eq!(seen(&r, probe), before);
    assert_sound_no_leak(&r.machine, &r.manager);
}
