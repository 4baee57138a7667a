//! The ROX mode: code spaces on 2 MiB pages mapped R+X once, INT3-filled before they became
//! executable, their direct-map aliases sealed read-only in the same flush, and written only
//! through the private alias. A publish changes no page-table entry and costs no shootdown
//! round (one serialization round instead); a 2 MiB page goes back only wholly free, with one
//! shootdown; without a 2 MiB frame a space falls back to 4 KiB pages, counted.

use codespace::mmu::soft::{CallKind, Fault, SoftMmu};
use codespace::mmu::{Mmu, MmuError, HUGE_PAGE_SIZE};
use codespace::{
    AddressRange, AllocatorConfig, CodeAllocator, CodeError, CodeManager, ManagerConfig,
    ProtectionMode, PublishedCode,
};

use crate::common::*;
use crate::{publish_filled, state};

const HUGE: usize = HUGE_PAGE_SIZE;

pub fn rox_config() -> ManagerConfig {
    ManagerConfig {
        rox_code: true,
        ..ManagerConfig::default()
    }
}

/// A 4-CPU machine of `frames` frames with a direct map, a ROX manager over the slot, and a
/// ROX allocator.
fn rox_rig(frames: usize) -> (SoftMmu, CodeManager<SoftMmu>, CodeAllocator<SoftMmu>) {
    rox_rig_reserving(frames, 0)
}

/// As [`rox_rig`], the allocator's first space (`reservation` bytes) reserved up front.
fn rox_rig_reserving(
    frames: usize,
    reservation: usize,
) -> (SoftMmu, CodeManager<SoftMmu>, CodeAllocator<SoftMmu>) {
    let (machine, m) = rig(frames, rox_config());
    let config = AllocatorConfig {
        rox: true,
        initial_reservation: reservation,
        ..AllocatorConfig::default()
    };
    let a = CodeAllocator::new(&m, config).expect("allocator");
    (machine, m, a)
}

/// Every translation of the frames of the 2 MiB page at `base`, on every CPU (the TLB model's
/// stale entries included, through `write_as`): none lets a write through, and the page's own
/// leaf is one present R+X 2 MiB leaf.
fn assert_never_writable(machine: &SoftMmu, base: usize) {
    let leaves: Vec<_> = {
        let mut v = Vec::new();
        machine.for_each_leaf(&mut |l| v.push(*l));
        v
    };
    let own = leaves
        .iter()
        .find(|l| l.virt == base)
        .expect("the 2 MiB leaf");
    assert_eq!(own.size, HUGE);
    assert!(own.executable && !own.writable);
    let (lo, hi) = own.frames();
    for l in &leaves {
        let (s, e) = l.frames();
        if s < hi && lo < e {
            assert!(!l.writable, "a writable mapping of the code frames: {l:?}");
        }
    }
    for cpu in 0..machine.online_cpus() {
        for page in (base..base + HUGE).step_by(PAGE) {
            assert!(
                matches!(
                    machine.write_as(cpu, page, &[0]),
                    Err(Fault::Protection { .. })
                ),
                "CPU {cpu} could write {page:#x}"
            );
        }
        // The direct-map alias of every frame, through whatever this CPU holds.
        for frame in (lo..hi).step_by(PAGE) {
            let alias = DIRECT_MAP + (frame - codespace::mmu::soft::PHYS_BASE) as usize;
            assert!(
                machine.write_as(cpu, alias, &[0]).is_err(),
                "CPU {cpu} could write frame {frame:#x} through the direct map"
            );
        }
    }
}

#[test]
fn a_rox_publish_changes_no_entry_and_costs_one_alias_session_and_one_sync() {
    let (machine, m, mut a) = rox_rig(2048);
    // The first allocation maps the 2 MiB page: one flush (sealing the aliases).
    let first = publish_filled(&mut a, 100, 0x90);
    let space = a.code_spaces()[0];
    assert!(space.start().is_multiple_of(HUGE) && space.size() == HUGE);
    let stats = m.stats();
    assert_eq!((stats.rox_spaces, stats.rox_fallbacks), (1, 0));
    assert_eq!((stats.huge_pages, m.committed()), (1, HUGE));
    let codes: Vec<_> = (0..40u8)
        .map(|i| {
            let mut w = a.allocate(200).unwrap();
            w.as_mut_slice().fill(i);
            w
        })
        .collect();
    let (stores, before) = (machine.leaf_stores(), m.flush_stats().unwrap());
    let published = a.publish_batch(codes).unwrap();
    let after = m.flush_stats().unwrap();
    assert_eq!(machine.leaf_stores(), stores, "no page-table entry changed");
    assert_eq!(after.shootdowns, before.shootdowns, "no shootdown round");
    assert_eq!(
        (after.single_pages, after.full),
        (before.single_pages, before.full)
    );
    assert_eq!(
        after.pokes - before.pokes,
        1,
        "one alias session for the batch"
    );
    assert_eq!(after.syncs - before.syncs, 1, "one serialization round");
    for (i, code) in published.iter().enumerate() {
        assert_eq!(read(&m, code.start(), 200), vec![i as u8; 200]);
        // Every CPU executes the new bytes (it serialized), and the padding is INT3.
        for cpu in 0..4 {
            let mut buf = [0; 201];
            machine.exec_as(cpu, code.start(), &mut buf).unwrap();
            assert_eq!(buf[..200], [i as u8; 200]);
            assert_eq!(buf[200], INT3);
        }
    }
    let audit = m.audit().unwrap();
    assert_eq!((audit.huge_leaves, audit.small_leaves), (1, 0));
    assert_never_writable(&machine, space.start());
    for code in published.into_iter().chain([first]) {
        // SAFETY: no simulated CPU runs it, nothing leads into it.
        unsafe { a.free(code) }.unwrap();
    }
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn no_byte_of_a_rox_page_is_ever_writable_and_freed_bytes_are_int3_before_reuse() {
    let (machine, m, mut a) = rox_rig(2048);
    let code = publish_filled(&mut a, 3 * PAGE, 0x90);
    // Keeps the 2 MiB page in use when `code` is freed.
    let keep = publish_filled(&mut a, 64, 0x90);
    let base = code.start() & !(HUGE - 1);
    assert_never_writable(&machine, base);
    let range = code.range();
    // SAFETY: no simulated CPU runs it, nothing leads into it.
    unsafe { a.free(code) }.unwrap();
    // Freed, not decommitted (the 2 MiB page still holds `keep`), and INT3 in memory. (CPUs
    // may still hold bytes they prefetched: the publish that reuses the range serializes.)
    assert_eq!(m.stats().huge_pages, 1);
    assert_eq!(
        read(&m, range.start(), range.size()),
        vec![INT3; range.size()]
    );
    assert_never_writable(&machine, base);
    // Reused: the same bytes, INT3 until the new code is published over them.
    let w = a.allocate(PAGE).unwrap();
    assert_eq!(w.start(), range.start());
    assert_eq!(read(&m, w.start(), PAGE), vec![INT3; PAGE]);
    let mut w = w;
    w.as_mut_slice().fill(0x55);
    let syncs = m.flush_stats().unwrap().syncs;
    let code = a.publish(w).unwrap();
    assert_eq!(m.flush_stats().unwrap().syncs - syncs, 1);
    assert_eq!(read(&m, code.start(), PAGE), vec![0x55; PAGE]);
    // Every CPU executes the new bytes, none the freed code it may have prefetched.
    for cpu in 0..4 {
        let mut buf = vec![0; PAGE];
        machine.exec_as(cpu, code.start(), &mut buf).unwrap();
        assert_eq!(buf, vec![0x55; PAGE], "CPU {cpu}");
    }
    assert_never_writable(&machine, base);
    assert!(
        machine
            .ever_executable(AddressRange::new(base, base + HUGE))
            .len()
            == HUGE / PAGE
    );
    // SAFETY: as above.
    unsafe { a.free(code) }.unwrap();
    // SAFETY: as above.
    unsafe { a.free(keep) }.unwrap();
    assert_eq!(m.stats().huge_pages, 0, "wholly free: decommitted");
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn a_wholly_free_2mib_page_goes_back_with_one_shootdown_and_only_then() {
    let (machine, m, mut a) = rox_rig_reserving(4096, 2 * HUGE);
    // Two 2 MiB pages: code straddling the boundary, then more code in the second.
    let a1 = publish_filled(&mut a, HUGE - PAGE, 0x90);
    let a2 = publish_filled(&mut a, 2 * PAGE, 0x91);
    let space = a.space_of(a1.start()).unwrap();
    assert_eq!(space.size(), 2 * HUGE);
    assert_eq!(m.stats().huge_pages, 2);
    let free_before = machine.free_frames().unwrap();
    // Freeing the first allocation frees no 2 MiB page: the second allocation touches both.
    let before = m.flush_stats().unwrap();
    // SAFETY: no simulated CPU runs it, nothing leads into it.
    unsafe { a.free(a1) }.unwrap();
    assert_eq!(m.stats().huge_pages, 2);
    assert_eq!(m.flush_stats().unwrap().shootdowns, before.shootdowns);
    // Freeing the straddling one leaves both wholly free: both go, in one round.
    let before = m.flush_stats().unwrap();
    // SAFETY: as above.
    unsafe { a.free(a2) }.unwrap();
    assert_eq!(m.stats().huge_pages, 0);
    assert_eq!(m.committed(), 0);
    assert_eq!(m.flush_stats().unwrap().shootdowns - before.shootdowns, 1);
    assert!(machine.free_frames().unwrap() >= free_before + 2 * (HUGE / PAGE));
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn without_a_2mib_frame_a_space_falls_back_to_4k_pages_and_says_so() {
    // 400 frames: no run of 512.
    let (machine, m, mut a) = rox_rig(400);
    // The 4 KiB commit of the fallback fails too (the second map call): nothing changed, the
    // fallback not even counted.
    let before = state(&machine, &m, &[&a]);
    machine.fail_nth(CallKind::Map, 1);
    assert_eq!(
        a.allocate(100).unwrap_err(),
        CodeError::Mmu(MmuError::Injected)
    );
    assert_eq!(state(&machine, &m, &[&a]), before);
    assert_eq!(m.stats().rox_fallbacks, 0);
    let code = publish_filled(&mut a, 100, 0x90);
    let stats = m.stats();
    assert_eq!(
        (stats.rox_spaces, stats.rox_fallbacks, stats.huge_pages),
        (0, 1, 0)
    );
    assert_eq!(m.committed(), PAGE);
    let audit = m.audit().unwrap();
    assert_eq!((audit.huge_leaves, audit.small_leaves), (0, 1));
    assert_eq!(leaf_flags(&machine, code.start()), R_X);
    // SAFETY: no simulated CPU runs it, nothing leads into it.
    unsafe { a.free(code) }.unwrap();
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn flip_mode_and_rox_without_the_manager_mode_are_refused() {
    let machine = machine_for(2048, ProtectionMode::Flip);
    let flip = ManagerConfig {
        protection: ProtectionMode::Flip,
        ..rox_config()
    };
    assert_eq!(
        CodeManager::new(machine.clone(), slot(), flip).err(),
        Some(CodeError::InvalidConfig {
            setting: "rox_code"
        })
    );
    let (_, plain) = rig(2048, ManagerConfig::default());
    let rox = AllocatorConfig {
        rox: true,
        ..AllocatorConfig::default()
    };
    assert_eq!(
        CodeAllocator::new(&plain, rox).err(),
        Some(CodeError::InvalidConfig { setting: "rox" })
    );
}

#[test]
fn failures_while_mapping_a_2mib_page_change_nothing() {
    let (machine, m, mut a) = rox_rig(2048);
    // Tables the window keeps once made (its PDPT) exist before the baseline.
    let warm = publish_filled(&mut a, 100, 0x90);
    // SAFETY: no simulated CPU runs it, nothing leads into it.
    unsafe { a.free(warm) }.unwrap();
    // SAFETY: nothing of `a` runs.
    unsafe { a.release_all() };
    for kind in [CallKind::Map, CallKind::Flush] {
        let before = state(&machine, &m, &[&a]);
        machine.fail_nth(kind, 0);
        let e = a.allocate(100).unwrap_err();
        match kind {
            CallKind::Map => assert_eq!(e, CodeError::Mmu(MmuError::Injected)),
            _ => assert!(matches!(e, CodeError::FlushFailed(_)), "{e:?}"),
        }
        // The manager's next operation finishes what a failed flush left pending.
        m.release_pending().unwrap();
        assert_eq!(state(&machine, &m, &[&a]), before, "{kind:?}");
        assert!(
            machine.violations().is_empty(),
            "{:?}",
            machine.violations()
        );
    }
    let code = publish_filled(&mut a, 100, 0x90);
    assert_eq!(m.stats().rox_fallbacks, 0);
    // A failed alias session or serialization at publish hands the code back, and no CPU can
    // execute its bytes before a publish succeeds.
    for kind in [CallKind::Poke, CallKind::Sync] {
        let mut w = a.allocate(64).unwrap();
        w.as_mut_slice().fill(0x77);
        let start = w.start();
        machine.fail_nth(kind, 0);
        let rejected = a.publish(w).unwrap_err();
        let w = rejected.code;
        assert_eq!(w.start(), start);
        a.discard(w).unwrap();
        assert_eq!(read(&m, start, 64), vec![INT3; 64], "{kind:?}");
    }
    // A failed unmap of the 2 MiB page leaves it mapped (and counted) for a later trim.
    machine.fail_nth(CallKind::Unmap, 0);
    // SAFETY: no simulated CPU runs it, nothing leads into it.
    let e = unsafe { a.free(code) }.unwrap_err();
    assert!(matches!(e.error(), CodeError::PartialDecommit(_)), "{e:?}");
    assert_eq!((m.stats().huge_pages, m.committed()), (1, HUGE));
    a.trim().unwrap();
    assert_eq!((m.stats().huge_pages, m.committed()), (0, 0));
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn a_jump_table_on_rox_pages_is_patched_through_the_alias() {
    let (machine, m, mut a) = rox_rig(2048);
    let mut t = a.allocate_table(PAGE, None).unwrap();
    t.as_mut_slice().fill(INT3);
    let table: PublishedCode = a.publish(t).unwrap();
    let stores = machine.leaf_stores();
    // SAFETY: no simulated CPU runs through the slot.
    unsafe { a.patch(&[&table], &[(table.start(), 0x1122_3344_5566_7788)]) }.unwrap();
    assert_eq!(read_u64(&m, table.start()), 0x1122_3344_5566_7788);
    assert_eq!(machine.leaf_stores(), stores);
    assert_never_writable(&machine, table.start() & !(HUGE - 1));
    // SAFETY: as above.
    unsafe { a.free(table) }.unwrap();
    assert_sound_no_leak(&machine, &m);
}

/// Images go to 4 KiB spaces of their own, which a fixed ROX module cannot add: its one space
/// holds code, so an image is refused (`NotGrowable`) and nothing changes; a growable one takes
/// it beside its code.
#[test]
fn an_image_needs_a_space_of_its_own_in_a_rox_module() {
    use codespace::module::{CodeModule, ModuleConfig, ModuleError, NewCode};
    for growable in [false, true] {
        let (machine, m) = rig(2048, rox_config());
        let module = CodeModule::new(
            &m,
            registries(),
            ModuleConfig {
                functions: 1,
                rox: true,
                growable,
                ..ModuleConfig::default()
            },
        )
        .unwrap();
        let code = module.add_code(&NewCode::function(0, &[0xC3; 64])).unwrap();
        let before = state(&machine, &m, &[]);
        let spaces = module.code_spaces().unwrap();
        match module.load_image(&[0x90; 100]) {
            Err(e) => {
                assert!(!growable);
                assert_eq!(e, ModuleError::Code(CodeError::NotGrowable));
                assert_eq!(state(&machine, &m, &[]), before);
                assert_eq!(module.code_spaces().unwrap(), spaces);
            }
            Ok(image) => {
                assert!(growable);
                let space = module.code_spaces().unwrap()[1];
                assert!(space.contains(image.range().start()));
                assert!(!space.contains(code.instruction_start()));
                let stats = m.stats();
                assert_eq!((stats.rox_spaces, stats.rox_fallbacks), (1, 0), "{stats:?}");
                module.unpublish_image(image).unwrap();
            }
        }
        assert_sound(&machine, &m);
    }
}

/// A commit that fails part way takes back what it mapped; when taking a page back fails as
/// well, the page stays mapped, counted and reported (`PartialDecommit`), and a trim gives it
/// back. Found by the random allocator run in the ROX mode (a 4 KiB commit of a space that
/// fell back, out of frames, whose rollback unmap failed); the 2 MiB commit had the same hole
/// and left its page mapped but not counted (the audit then disagreed with the counter, and
/// decommitting it later would have underflowed it).
#[test]
fn a_commit_whose_rollback_cannot_unmap_keeps_the_page_counted_for_a_trim() {
    // 2 MiB pages: the first of two maps, the second fails, the first cannot be unmapped.
    let (machine, m, mut a) = rox_rig_reserving(4096, 2 * HUGE);
    machine.fail_nth(CallKind::Map, 1);
    machine.fail_nth(CallKind::Unmap, 0);
    let e = a.allocate(HUGE + PAGE).unwrap_err();
    assert_eq!(e, CodeError::PartialDecommit(MmuError::Injected));
    let audit = m.audit().unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    assert_eq!((m.stats().huge_pages, m.committed()), (1, HUGE));
    a.trim().unwrap();
    assert_eq!((m.stats().huge_pages, m.committed()), (0, 0));
    assert_sound_no_leak(&machine, &m);

    // 4 KiB pages of a space that fell back (no 2 MiB run in 400 frames): the second page
    // fails, the first cannot be unmapped. The space has 4 KiB pages now: it fell back.
    let (machine, m, mut a) = rox_rig_reserving(400, HUGE);
    let space = a.code_spaces()[0];
    // map_rox (refused: no run), then the fallback's two 4 KiB pages.
    machine.fail_nth(CallKind::Map, 2);
    machine.fail_nth(CallKind::Unmap, 0);
    let e = a.allocate(2 * PAGE).unwrap_err();
    assert_eq!(e, CodeError::PartialDecommit(MmuError::Injected));
    let audit = m.audit().unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    let stats = m.stats();
    assert_eq!(
        (stats.rox_spaces, stats.rox_fallbacks, m.committed()),
        (0, 1, PAGE)
    );
    assert!(is_mapped(&m, space.start()));
    // The page left behind is reused; the same failure one page further on leaves another,
    // which the next free trims.
    let code = publish_filled(&mut a, PAGE, 0x90);
    assert_eq!(code.start(), space.start());
    machine.fail_nth(CallKind::Map, 1);
    machine.fail_nth(CallKind::Unmap, 0);
    let e = a.allocate(2 * PAGE).unwrap_err();
    assert_eq!(e, CodeError::PartialDecommit(MmuError::Injected));
    assert_eq!(m.committed(), 2 * PAGE);
    // SAFETY: no simulated CPU runs it, nothing leads into it.
    unsafe { a.free(code) }.unwrap();
    assert_eq!(m.committed(), 0, "the free trimmed the page left behind");
    assert_sound_no_leak(&machine, &m);
}
