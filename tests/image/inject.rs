//! Failure injection at every backend call of loading, publishing and freeing an image: a
//! failed load or publish changes nothing (window leaves, commit, trap and PC lookups, images)
//! and makes no byte of the image executable, not even for an instant; a free that fails part
//! way keeps the pages out of use until a later operation finishes it. After each run the audit
//! is clean, W^X held throughout, nothing leaked, and the operation succeeds when retried.

use codespace::mmu::soft::CallKind;
use codespace::mmu::MmuError;
use codespace::module::{CodeImage, ModuleError};
use codespace::{AddressRange, CodeError};

use super::errors::seen;
use super::*;

/// A world whose module has no jump tables: every executable page of the window is an image's.
/// In the ROX mode the module asks for ROX spaces, and its images take 4 KiB spaces of their own.
fn world(mode: Mode) -> Rig {
    let (machine, manager) = rig(1 << 14, mode.manager(config(mode.protection)));
    let regs = registries();
    let module = module(&manager, regs, mode.module(functions(0)));
    Rig {
        machine,
        manager,
        regs,
        module,
    }
}

fn injected(label: &str, e: ModuleError) {
    assert_eq!(
        e,
        ModuleError::Code(CodeError::Mmu(MmuError::Injected)),
        "{label}: not a clean failure"
    );
}

/// Runs `setup`, then `op` once cleanly to count its backend calls, then once per call with
/// that call failing; `check` judges each run. Returns the number of failure points.
fn exhaustive<S>(
    name: &str,
    mode: Mode,
    setup: impl Fn(&Rig) -> S,
    op: impl Fn(&Rig, &mut S) -> Result<(), ModuleError>,
    check: impl Fn(&str, &Rig, &mut S, Result<(), ModuleError>),
) -> usize {
    let clean = world(mode);
    let mut s = setup(&clean);
    let before: Vec<u64> = CallKind::ALL
        .iter()
        .map(|&k| clean.machine.calls(k))
        .collect();
    op(&clean, &mut s).expect("clean run");
    let calls: Vec<u64> = CallKind::ALL
        .iter()
        .zip(&before)
        .map(|(&k, b)| clean.machine.calls(k) - b)
        .collect();
    let mut points = 0;
    for (&kind, &count) in CallKind::ALL.iter().zip(&calls) {
        for n in 0..count {
            let label = format!("{name} ({mode:?}): {kind:?} call {n} of {count} fails");
            let w = world(mode);
            let mut s = setup(&w);
            w.machine.fail_nth(kind, n);
            let result = op(&w, &mut s);
            w.machine.clear_failures();
            assert!(
                w.machine.violations().is_empty(),
                "{label}: {:#?}",
                w.machine.violations()
            );
            assert!(!w.machine.wx_ever_observed(), "{label}: W+X");
            check(&label, &w, &mut s, result);
            assert_sound_no_leak(&w.machine, &w.manager);
            points += 1;
        }
    }
    assert!(points > 0);
    eprintln!("{name} ({mode:?}): {points} failure points {calls:?}");
    points
}

fn window_of(r: &Rig) -> AddressRange {
    r.manager.window()
}

#[test]
fn a_failed_load_changes_nothing() {
    for mode in MODES {
        exhaustive(
            "load_image",
            mode,
            |r| (seen(r, AddressRange::new(0, 0)), None::<CodeImage>),
            |r, s| {
                s.1 = Some(r.module.load_image(&image_bytes())?);
                Ok(())
            },
            |label, r, s, result| {
                if let Err(e) = result {
                    injected(label, e);
                    assert_eq!(seen(r, AddressRange::new(0, 0)), s.0, "{label}");
                    s.1 = Some(r.module.load_image(&image_bytes()).expect("retry"));
                }
                let image = s.1.as_ref().unwrap();
                assert_eq!(
                    read(&r.manager, image.range().start(), image.len()),
                    image_bytes()
                );
                assert!(
                    r.machine.ever_executable(window_of(r)).is_empty(),
                    "{label}"
                );
            },
        );
    }
}

#[test]
fn a_failed_publish_changes_nothing_and_executes_nothing() {
    for mode in MODES {
        exhaustive(
            "publish_image",
            mode,
            |r| {
                let image = r.module.load_image(&image_bytes()).unwrap();
                let probe = AddressRange::new(image.range().start() - PAGE, image.range().end());
                (seen(r, probe), probe, image)
            },
            |r, s| {
                r.module
                    .publish_image(&s.2, text_of(&s.2), &traps(external_pad()))
            },
            |label, r, s, result| {
                if let Err(e) = result {
                    injected(label, e);
                    assert_eq!(seen(r, s.1), s.0, "{label}");
                    assert!(
                        r.machine.ever_executable(window_of(r)).is_empty(),
                        "{label}"
                    );
                    r.module
                        .publish_image(&s.2, text_of(&s.2), &traps(external_pad()))
                        .expect("retry");
                }
                let text = text_of(&s.2);
                let lead = s.2.range().start() - PAGE;
                let expected: Vec<usize> = core::iter::once(lead).chain(text.pages()).collect();
                assert_eq!(r.machine.ever_executable(window_of(r)), expected, "{label}");
                let hit = r
                    .regs
                    .traps
                    .lookup_trap(TrapVector::InvalidOpcode, text.start() + 0x20);
                assert_eq!(hit.map(|h| h.landing_pad()), Some(lead), "{label}");
            },
        );
    }
}

#[test]
fn a_failed_free_keeps_the_pages_until_a_later_operation() {
    for mode in MODES {
        exhaustive(
            "unpublish_image + reclaim",
            mode,
            |r| {
                let image = r.module.load_image(&image_bytes()).unwrap();
                let text = text_of(&image);
                r.module
                    .publish_image(&image, text, &traps(external_pad()))
                    .unwrap();
                let lead = image.range().start() - PAGE;
                (Some(image), text, lead)
            },
            |r, s| {
                r.module.unpublish_image(s.0.take().expect("image"))?;
                pass_grace(r.regs);
                r.module.reclaim()?;
                Ok(())
            },
            |label, r, s, result| {
                result.expect("freeing reports no error: it retries");
                let (text, lead) = (s.1, s.2);
                assert_eq!(r.module.image_count().unwrap(), (0, 0), "{label}");
                assert!(r.regs.traps.is_empty() && r.regs.code.is_empty(), "{label}");
                // A later load retries a decommit that failed; then only the new image is left.
                let next = r.module.load_image(&[7; 10]).unwrap();
                assert_eq!(r.manager.committed(), 2 * PAGE, "{label}");
                let expected: Vec<usize> = core::iter::once(lead).chain(text.pages()).collect();
                let old = AddressRange::new(lead, text.end() + 3 * PAGE);
                assert_eq!(r.machine.ever_executable(old), expected, "{label}");
                r.module.unpublish_image(next).unwrap();
                pass_grace(r.regs);
                r.module.reclaim().unwrap();
                assert_eq!(r.manager.committed(), 0, "{label}");
            },
        );
    }
}
