//! Stale translations and stale instruction bytes: what other CPUs could still use after an
//! operation returns. The machine model assumes every CPU caches every translation it could
//! (pessimistic TLBs) and keeps executing the bytes it fetched until it serializes; these tests
//! make other CPUs use what they may have cached and check they cannot reach what they must not.
//!
//! Each fails when the backend's shootdown is reduced to the calling CPU, or (the last two) when
//! the manager's cross-CPU serialization after a patch is removed.

use codespace::mmu::soft::{Fault, SoftMmu, PHYS_BASE};
use codespace::module::NewCode;
use codespace::{CodeError, ManagerConfig, ProtectionMode};

use crate::common::*;

fn allocator(mode: Mode, m: &codespace::CodeManager<SoftMmu>) -> codespace::CodeAllocator<SoftMmu> {
    codespace::CodeAllocator::new(m, mode.allocator(codespace::AllocatorConfig::default())).unwrap()
}

/// The modes these tests run in (flip mode refuses several CPUs, see the last test).
const TLB_MODES: [Mode; 2] = [Mode::ALIAS, Mode::ROX];

/// A 4-CPU rig for `mode` (room for two 2 MiB pages in the ROX mode).
fn rig_in(mode: Mode, frames: usize) -> (SoftMmu, codespace::CodeManager<SoftMmu>) {
    rig(frames.max(1 << 12), mode.manager(ManagerConfig::default()))
}

/// Decommitted code's frame goes back to the allocator and is reused for other code; a CPU
/// that executed the old code must not reach the new bytes through a translation it cached.
#[test]
fn stale_tlb_entries_never_reach_a_decommitted_frame_after_reuse() {
    for mode in TLB_MODES {
        stale_tlb_entries_never_reach_a_decommitted_frame_after_reuse_in(mode);
    }
}

fn stale_tlb_entries_never_reach_a_decommitted_frame_after_reuse_in(mode: Mode) {
    let (machine, m) = rig_in(mode, 1024);
    let mut a = allocator(mode, &m);
    let mut w = a.allocate(PAGE).unwrap();
    w.as_mut_slice().fill(0x90);
    let old = a.publish(w).unwrap();
    let old_start = old.start();
    let frame = m.query(old_start).unwrap().unwrap().frame;
    for cpu in 1..4 {
        let mut seen = [0; 16];
        machine.exec_as(cpu, old_start, &mut seen).unwrap();
        assert_eq!(seen, [0x90; 16]);
    }
    free_published(&mut a, old).unwrap();
    // A new allocation elsewhere gets the same frame back.
    let mut b = allocator(mode, &m);
    let mut w = b.allocate(PAGE).unwrap();
    w.as_mut_slice().fill(0xCC);
    let new = b.publish(w).unwrap();
    assert_ne!(new.start(), old_start);
    assert_eq!(
        m.query(new.start()).unwrap().unwrap().frame,
        frame,
        "frame reused"
    );
    for cpu in 0..4 {
        let mut seen = [0; 16];
        assert_eq!(
            machine.exec_as(cpu, old_start, &mut seen),
            Err(Fault::NotPresent { addr: old_start }),
            "CPU {cpu} still reaches the frame through the old page"
        );
    }
    free_published(&mut b, new).unwrap();
    assert_sound_no_leak(&machine, &m);
    mode.assert_claimed(&m);
}

/// A CPU that wrote code while it was being staged (RW+NX) must not keep a writable
/// translation once the code is published: its writes fault, the code stays as published.
#[test]
fn stale_writable_translations_are_gone_when_code_is_published() {
    for mode in TLB_MODES {
        stale_writable_translations_are_gone_when_code_is_published_in(mode);
    }
}

/// In the ROX mode the pages are never writable, not even before the publish.
fn stale_writable_translations_are_gone_when_code_is_published_in(mode: Mode) {
    let (machine, m) = rig_in(mode, 1024);
    let mut a = allocator(mode, &m);
    let mut w = a.allocate(2 * PAGE).unwrap();
    let start = w.start();
    // CPUs 1-3 write the staging pages (JIT threads on other CPUs): they cache RW translations.
    for cpu in 1..4 {
        for at in [start + cpu * 8, start + PAGE] {
            let wrote = machine.write_as(cpu, at, &[0xAB; 8]);
            if mode.rox {
                assert_eq!(wrote, Err(Fault::Protection { addr: at }), "CPU {cpu}");
            } else {
                wrote.unwrap();
            }
        }
    }
    w.as_mut_slice().fill(0xC3);
    let code = a.publish(w).unwrap();
    for cpu in 0..4 {
        for at in [start, start + PAGE + 8] {
            assert_eq!(
                machine.write_as(cpu, at, &[0x0F, 0x0B]),
                Err(Fault::Protection { addr: at }),
                "CPU {cpu} could still write published code"
            );
        }
    }
    assert_eq!(read(&m, start, 2 * PAGE), vec![0xC3; 2 * PAGE]);
    free_published(&mut a, code).unwrap();
    assert_sound_no_leak(&machine, &m);
    mode.assert_claimed(&m);
}

/// The direct map's alias of a code frame is sealed read-only when the code is published; a
/// CPU that wrote through the alias before must not keep writing through a stale translation.
#[test]
fn stale_direct_map_translations_cannot_write_published_code() {
    for mode in TLB_MODES {
        stale_direct_map_translations_cannot_write_published_code_in(mode);
    }
}

/// In the ROX mode the alias is sealed from the start, before the publish.
fn stale_direct_map_translations_cannot_write_published_code_in(mode: Mode) {
    let (machine, m) = rig_in(mode, 1024);
    let mut a = allocator(mode, &m);
    let mut w = a.allocate(64).unwrap();
    let start = w.start();
    let frame = m.query(start).unwrap().unwrap().frame;
    let alias = DIRECT_MAP + (frame - PHYS_BASE) as usize;
    for cpu in 0..4 {
        let wrote = machine.write_as(cpu, alias + 512, &[0xAA; 8]);
        if mode.rox {
            assert_eq!(wrote, Err(Fault::Protection { addr: alias + 512 }));
        } else {
            wrote.unwrap();
        }
    }
    w.as_mut_slice().fill(0xC3);
    let code = a.publish(w).unwrap();
    for cpu in 0..4 {
        assert_eq!(
            machine.write_as(cpu, alias, &[0x0F, 0x0B]),
            Err(Fault::Protection { addr: alias }),
            "CPU {cpu} writes published code through the direct map"
        );
    }
    assert_eq!(read(&m, start, 64), vec![0xC3; 64]);
    // Freed and decommitted, the frame is writable through the direct map again (its split
    // table merged back into the 2 MiB page).
    free_published(&mut a, code).unwrap();
    let mapping = codespace::mmu::Mmu::query(&machine, alias).expect("direct-mapped");
    assert!(mapping.writable);
    assert_sound_no_leak(&machine, &m);
    mode.assert_claimed(&m);
}

/// When `patch_slot` returns, every CPU executes the new slot, not the bytes it fetched before
/// (cross-modifying code needs every CPU to serialize).
#[test]
fn no_cpu_executes_a_stale_slot_after_patch_slot_returns() {
    for mode in TLB_MODES {
        no_cpu_executes_a_stale_slot_after_patch_slot_returns_in(mode);
    }
}

fn no_cpu_executes_a_stale_slot_after_patch_slot_returns_in(mode: Mode) {
    let (machine, m) = rig_in(mode, 1 << 12);
    let regs = registries();
    let module = module(&m, regs, mode.module(functions(4)));
    let t = first_table(&module);
    let f = module
        .add_code(&NewCode::function(1, &body(64, 0x90)))
        .unwrap();
    let g = module
        .add_code(&NewCode::new(
            codespace::code_object::CodeKind::Wrapper,
            &[0xC3],
        ))
        .unwrap();
    for target in [
        g.instruction_start(),
        f.instruction_start(),
        g.instruction_start(),
    ] {
        // Every CPU runs through the slot (and may keep those bytes).
        for cpu in 0..4 {
            executed_slot_target(&machine, cpu, &t, 1);
        }
        module.patch_slot(1, target).unwrap();
        for cpu in 0..4 {
            assert_eq!(
                executed_slot_target(&machine, cpu, &t, 1),
                Some(target),
                "CPU {cpu} runs a stale slot"
            );
        }
    }
    assert_sound(&machine, &m);
    mode.assert_claimed(&m);
}

/// Replacing a function is a slot patch too: once `add_code` returns, no CPU runs the old
/// version through the slot, so the grace period that frees it is about CPUs inside it only.
#[test]
fn no_cpu_executes_a_stale_slot_into_replaced_code() {
    for mode in TLB_MODES {
        no_cpu_executes_a_stale_slot_into_replaced_code_in(mode);
    }
}

fn no_cpu_executes_a_stale_slot_into_replaced_code_in(mode: Mode) {
    let (machine, m) = rig_in(mode, 1 << 12);
    let regs = registries();
    let module = module(&m, regs, mode.module(functions(2)));
    let t = first_table(&module);
    let mut current = module
        .add_code(&NewCode::function(0, &body(64, 0x90)))
        .unwrap();
    for round in 0..4u8 {
        for cpu in 0..4 {
            assert_eq!(
                executed_slot_target(&machine, cpu, &t, 0),
                Some(current.instruction_start())
            );
        }
        current = module
            .add_code(&NewCode::function(0, &body(64, 0x91 + round)))
            .unwrap();
        pass_grace(regs);
        module.reclaim().unwrap();
        for cpu in 0..4 {
            assert_eq!(
                executed_slot_target(&machine, cpu, &t, 0),
                Some(current.instruction_start()),
                "round {round}: CPU {cpu} runs into freed code"
            );
        }
    }
    assert_sound(&machine, &m);
    mode.assert_claimed(&m);
}

/// Flip mode makes a live page non-executable for a moment: with a second CPU online (that
/// could be executing the page, or hold its translation) it refuses, changing nothing.
#[test]
fn flip_mode_refuses_live_pages_once_another_cpu_could_hold_their_tlb_entries() {
    let (machine, m) = rig(1024, config(ProtectionMode::Flip));
    let mut a = allocator(Mode::FLIP, &m);
    let mut w = a.allocate(64).unwrap();
    w.as_mut_slice().fill(0x90);
    let first = a.publish(w).unwrap();
    machine.set_online(2);
    let mut w = a.allocate(64).unwrap();
    w.as_mut_slice().fill(0xC3);
    let before = machine.snapshot();
    let rejected = a.publish(w).unwrap_err();
    assert_eq!(rejected.error, CodeError::FlipNeedsOneCpu);
    assert_eq!(machine.snapshot(), before);
    // Back to one CPU, the same publish works.
    machine.set_online(1);
    let second = a.publish(rejected.code).unwrap();
    free_published(&mut a, second).unwrap();
    free_published(&mut a, first).unwrap();
    assert_sound_no_leak(&machine, &m);
}

/// Freed code's bytes that other CPUs may still have fetched (their instruction view of the
/// frame) must never be what they execute once the frame holds new code: a frame freed and
/// reused for other code is executed as newly published on every CPU.
#[test]
fn stale_instruction_bytes_of_a_reused_frame_are_never_executed() {
    for mode in TLB_MODES {
        stale_instruction_bytes_of_a_reused_frame_are_never_executed_in(mode);
    }
}

fn stale_instruction_bytes_of_a_reused_frame_are_never_executed_in(mode: Mode) {
    let (machine, m) = rig_in(mode, 1024);
    let mut a = allocator(mode, &m);
    let mut x = a.allocate(64).unwrap();
    x.as_mut_slice().fill(0x90);
    let x = a.publish(x).unwrap();
    let mut y = a.allocate(64).unwrap();
    y.as_mut_slice().fill(0x91);
    let y = a.publish(y).unwrap();
    let frame = m.query(x.start()).unwrap().unwrap().frame;
    for cpu in 0..4 {
        let mut seen = [0; 64];
        machine.exec_as(cpu, x.start(), &mut seen).unwrap();
    }
    // X's bytes become INT3 while Y runs on; then Y goes and the page with it.
    free_published(&mut a, x).unwrap();
    free_published(&mut a, y).unwrap();
    assert_eq!(m.committed(), 0);
    let mut b = allocator(mode, &m);
    let mut z = b.allocate(PAGE).unwrap();
    z.as_mut_slice().fill(0xC3);
    let z = b.publish(z).unwrap();
    assert_eq!(
        m.query(z.start()).unwrap().unwrap().frame,
        frame,
        "frame reused"
    );
    for cpu in 0..4 {
        let mut seen = [0; 64];
        machine.exec_as(cpu, z.start(), &mut seen).unwrap();
        assert_eq!(
            seen, [0xC3; 64],
            "CPU {cpu} executes stale bytes of the frame"
        );
    }
    free_published(&mut b, z).unwrap();
    assert_sound_no_leak(&machine, &m);
    mode.assert_claimed(&m);
}
