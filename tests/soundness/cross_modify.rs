//! Issue 18, "Cross-modifying code": the INT3 patch protocol (`PatchProtocol::Int3`) on the
//! software machine, whose CPUs keep executing the bytes they fetched until they serialize.
//!
//! The rule the protocol keeps (Intel SDM vol. 3, 8.1.3, as Linux's `text_poke_bp` reads it):
//! at every instant, for every CPU, the bytes of a slot that CPU may execute differ from the
//! bytes in memory only in the first byte, or both start with INT3 (the CPU traps before the
//! bytes that changed). A CPU that executes an INT3 asks the #BP hook
//! (`BreakpointSites::resume_at`, what a kernel's #BP handler calls) and resumes there.

use codespace::breakpoint::BreakpointSites;
use codespace::code_object::CodeKind;
use codespace::jump_table::{self, JumpTableLayout, NEAR_SLOT_SIZE};
use codespace::mmu::soft::{CallKind, SoftMmu};
use codespace::mmu::Mmu;
use codespace::module::{CodeModule, ModuleError, NewCode};
use codespace::{CodeError, CodeManager, ManagerConfig, PatchProtocol};

use crate::common::*;

fn sites() -> &'static BreakpointSites {
    Box::leak(Box::new(BreakpointSites::new()))
}

struct Rig {
    machine: SoftMmu,
    manager: CodeManager<SoftMmu>,
    module: CodeModule<SoftMmu>,
    regs: &'static codespace::module::Registries,
    sites: &'static BreakpointSites,
    layout: JumpTableLayout,
    /// Two implementations in rel32 reach of the table.
    targets: [usize; 2],
}

/// The rig in `mode`: in the ROX mode the table and the targets are on 2 MiB ROX pages, and
/// the protocols must behave exactly the same (they never change a page's protection).
fn rig(mode: Mode, protocol: impl FnOnce(&'static BreakpointSites) -> PatchProtocol) -> Rig {
    let sites = sites();
    let (machine, manager) = rig_with(mode.manager(ManagerConfig {
        patch_protocol: protocol(sites),
        ..ManagerConfig::default()
    }));
    let regs = registries();
    let module = module(&manager, regs, mode.module(functions(2)));
    let targets = [0xB8u8, 0xB9].map(|op| {
        module
            .add_code(&NewCode::new(CodeKind::Wrapper, &[op, 1, 0, 0, 0, 0xC3]))
            .unwrap()
            .instruction_start()
    });
    module.patch_slot(0, targets[0]).unwrap();
    mode.assert_in_use(&manager);
    let layout = first_table(&module);
    Rig {
        machine,
        manager,
        module,
        regs,
        sites,
        layout,
        targets,
    }
}

fn rig_with(config: ManagerConfig) -> (SoftMmu, CodeManager<SoftMmu>) {
    crate::common::rig(4096, config)
}

fn int3(sites: &'static BreakpointSites) -> PatchProtocol {
    PatchProtocol::Int3(sites)
}

impl Rig {
    fn slot(&self) -> usize {
        self.layout.near_slot_addr(0).unwrap()
    }

    /// The slot's bytes as CPU `cpu` executes them.
    fn fetched(&self, cpu: usize) -> [u8; 8] {
        let mut b = [0; NEAR_SLOT_SIZE];
        self.machine.exec_as(cpu, self.slot(), &mut b).unwrap();
        b
    }

    /// The slot's bytes in memory (read as data by a CPU: reading through the manager would
    /// finish a pending patch first).
    fn memory(&self) -> [u8; 8] {
        let mut b = [0; NEAR_SLOT_SIZE];
        self.machine.read_as(0, self.slot(), &mut b).unwrap();
        b
    }

    /// Where CPU `cpu` goes when it calls the slot: the `jmp` it fetches, or through the #BP
    /// hook when it fetches INT3 (`None`: a stray breakpoint).
    fn call(&self, cpu: usize) -> Option<usize> {
        let bytes = self.fetched(cpu);
        if bytes[0] == INT3 {
            return self.sites.resume_at(self.slot() + 1);
        }
        decode_near_slot(&bytes, self.slot())
    }

    /// The SDM rule (module docs) for every CPU; the first CPU that breaks it.
    fn sdm_rule_broken_by(&self) -> Option<usize> {
        let mem = self.memory();
        (0..self.machine.online_cpus()).find(|&cpu| {
            let seen = self.fetched(cpu);
            seen[1..] != mem[1..] && !(seen[0] == INT3 && mem[0] == INT3)
        })
    }

    fn syncs(&self) -> u64 {
        self.machine.calls(CallKind::Sync)
    }

    fn pokes(&self) -> u64 {
        self.machine.calls(CallKind::Poke)
    }

    /// Every CPU executes the slot once (the bytes it keeps until it serializes).
    fn warm(&self) {
        for cpu in 0..self.machine.online_cpus() {
            assert_eq!(self.call(cpu), Some(self.targets[0]));
        }
    }
}

fn encoding(slot: usize, target: usize) -> [u8; 8] {
    jump_table::near_slot(slot, target).unwrap().to_le_bytes()
}

/// One patch under the INT3 protocol: three alias sessions and three sync rounds, the slot's
/// bytes at each stage are INT3 + old tail, INT3 + new tail, the new slot; every CPU calling at
/// any stage reaches the old or the new target (through the #BP hook while the INT3 is there),
/// and the sites are gone afterwards.
#[test]
fn xmc_int3_patch_is_three_rounds_and_every_stage_is_sdm_defined() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        xmc_int3_patch_is_three_rounds_and_every_stage_is_sdm_defined_in(mode);
    }
}

fn xmc_int3_patch_is_three_rounds_and_every_stage_is_sdm_defined_in(mode: Mode) {
    let r = rig(mode, int3);
    r.warm();
    let (slot, [old, new]) = (r.slot(), r.targets);
    let (old_bytes, new_bytes) = (encoding(slot, old), encoding(slot, new));
    assert_ne!(old_bytes[1..], new_bytes[1..], "the tail changes");
    let mut expected = [old_bytes, old_bytes, new_bytes];
    expected[0][0] = INT3;
    expected[1] = new_bytes;
    expected[1][0] = INT3;

    // Stop the patch right after store session `stage` (its sync round fails), look, finish.
    for stage in 0..3u64 {
        let r = rig(mode, int3);
        r.warm();
        let syncs = r.syncs();
        r.machine.fail_nth(CallKind::Sync, stage);
        let err = r.module.patch_slot(0, new).unwrap_err();
        assert!(
            matches!(err, ModuleError::Code(CodeError::SyncFailed(_))),
            "{err:?}"
        );
        assert_eq!(
            r.sdm_rule_broken_by(),
            None,
            "stage {stage}: a CPU executes bytes that changed since it serialized"
        );
        assert_eq!(
            r.memory(),
            expected[stage as usize],
            "bytes after store session {stage}"
        );
        assert_eq!(r.syncs() - syncs, stage + 1);
        for cpu in 0..4 {
            let to = r.call(cpu);
            assert!(
                to == Some(old) || to == Some(new),
                "stage {stage}: cpu {cpu} goes to {to:x?}"
            );
        }
        // Until the last round succeeds a CPU may still fetch the INT3: the hook answers.
        assert_eq!(r.sites.resume_at(slot + 1), Some(new));
        // The manager's next patch finishes this one first.
        r.module.patch_slot(1, old).unwrap();
        assert_eq!(r.memory(), new_bytes);
        assert_eq!(r.sites.resume_at(slot + 1), None, "sites unregistered");
        for cpu in 0..4 {
            assert_eq!(r.call(cpu), Some(new));
        }
        assert_sound(&r.machine, &r.manager);
    }

    // Uninterrupted: 3 sessions, 3 rounds per patch, either direction.
    for (i, to) in [new, old, new].into_iter().enumerate() {
        let (syncs, pokes) = (r.syncs(), r.pokes());
        r.module.patch_slot(0, to).unwrap();
        assert_eq!(r.syncs() - syncs, 3, "patch {i}");
        assert_eq!(r.pokes() - pokes, 3, "patch {i}");
        assert_eq!(r.memory(), encoding(slot, to));
        assert_eq!(r.sdm_rule_broken_by(), None);
        for cpu in 0..4 {
            assert_eq!(r.call(cpu), Some(to));
        }
    }
    // The same target again: nothing changes, one plain store and one round.
    let (syncs, pokes) = (r.syncs(), r.pokes());
    r.module.patch_slot(0, new).unwrap();
    assert_eq!((r.syncs() - syncs, r.pokes() - pokes), (1, 1));
    assert_sound(&r.machine, &r.manager);
}

/// The default protocol, for contrast: one store and one round, and between them a CPU that
/// has not serialized executes a slot whose tail changed under it — what the SDM leaves
/// undefined (and V8 relies on in practice).
#[test]
fn xmc_atomic_store_is_one_round_outside_the_sdm_rule() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        xmc_atomic_store_is_one_round_outside_the_sdm_rule_in(mode);
    }
}

fn xmc_atomic_store_is_one_round_outside_the_sdm_rule_in(mode: Mode) {
    let r = rig(mode, |_| PatchProtocol::AtomicStore);
    r.warm();
    let (syncs, pokes) = (r.syncs(), r.pokes());
    r.module.patch_slot(0, r.targets[1]).unwrap();
    assert_eq!((r.syncs() - syncs, r.pokes() - pokes), (1, 1));

    r.machine.fail_nth(CallKind::Sync, 0);
    r.module.patch_slot(0, r.targets[0]).unwrap_err();
    assert_eq!(r.memory(), encoding(r.slot(), r.targets[0]));
    assert!(
        r.sdm_rule_broken_by().is_some(),
        "a CPU executes a slot whose rel32 changed since it serialized"
    );
    assert_eq!(r.sites.resume_at(r.slot() + 1), None, "no hook involved");
}

/// A target beyond rel32 reach: the far slot's target is data (one store, in the INT3's
/// session), the near slot jumps to the far slot, and a CPU that hits the INT3 resumes there.
#[test]
fn xmc_int3_far_target_goes_through_the_far_slot() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        xmc_int3_far_target_goes_through_the_far_slot_in(mode);
    }
}

fn xmc_int3_far_target_goes_through_the_far_slot_in(mode: Mode) {
    const EXTERNAL: usize = 0xFFFF_FFFF_8020_0000;
    let r = rig(mode, int3);
    r.warm();
    // SAFETY: nothing executes on the software machine; EXTERNAL stands for kernel text
    // outside the window.
    unsafe { r.module.register_external(EXTERNAL) }.unwrap();
    let far = r.layout.far_slot_addr(0).unwrap();
    r.machine.fail_nth(CallKind::Sync, 1);
    r.module.patch_slot(0, EXTERNAL).unwrap_err();
    assert_eq!(r.memory()[0], INT3);
    assert_eq!(r.sites.resume_at(r.slot() + 1), Some(far));
    assert_eq!(r.sdm_rule_broken_by(), None);
    let mut target = [0; 8];
    r.machine.read_as(1, far + 8, &mut target).unwrap();
    assert_eq!(
        u64::from_le_bytes(target) as usize,
        EXTERNAL,
        "far target stored first"
    );
    r.module.patch_slot(1, r.targets[0]).unwrap();
    for cpu in 0..4 {
        assert_eq!(
            executed_destination(&r.machine, cpu, &r.layout, 0),
            Some(EXTERNAL)
        );
    }
    assert_sound(&r.machine, &r.manager);
}

/// The raw API: `patch_slots` takes data and jump stores; a jump value the #BP hook could not
/// emulate (neither `jmp rel32` nor INT3) is refused before anything is stored.
#[test]
fn xmc_int3_raw_patch_slots_checks_jump_values() {
    let sites = sites();
    let (machine, m) = rig_with(ManagerConfig {
        patch_protocol: PatchProtocol::Int3(sites),
        ..ManagerConfig::default()
    });
    let mut a = codespace::CodeAllocator::new(&m, codespace::AllocatorConfig::default()).unwrap();
    let mut table = a.allocate_table(PAGE, None).unwrap();
    table.as_mut_slice().fill(INT3);
    let table = a.publish(table).unwrap();
    let (slot, data) = (table.start(), table.start() + 8);
    let before = machine.snapshot();
    let call = u64::from_le_bytes([0xE8, 0, 0, 0, 0, INT3, INT3, INT3]);
    // SAFETY: nothing executes this table; the values are never run.
    let refused = unsafe {
        a.patch_slots(
            &[&table],
            &[
                codespace::SlotStore::Data {
                    addr: data,
                    value: 7,
                },
                codespace::SlotStore::Jump {
                    addr: slot,
                    value: call,
                },
            ],
        )
    };
    assert_eq!(refused, Err(CodeError::NotPatchable { addr: slot }));
    assert_eq!(machine.snapshot(), before, "nothing stored");
    let jmp = jump_table::near_slot(slot, slot + 0x100).unwrap();
    let syncs = machine.calls(CallKind::Sync);
    // SAFETY: as above.
    unsafe {
        a.patch_slots(
            &[&table],
            &[
                codespace::SlotStore::Data {
                    addr: data,
                    value: 7,
                },
                codespace::SlotStore::Jump {
                    addr: slot,
                    value: jmp,
                },
            ],
        )
    }
    .unwrap();
    assert_eq!(machine.calls(CallKind::Sync) - syncs, 3);
    assert_eq!(read_u64(&m, slot), jmp);
    assert_eq!(read_u64(&m, data), 7);
    // Out of the table (the last 8 bytes of the address space included): refused.
    for addr in [table.range().end(), usize::MAX - 7] {
        // SAFETY: refused before anything is stored.
        let r =
            unsafe { a.patch_slots(&[&table], &[codespace::SlotStore::Data { addr, value: 0 }]) };
        assert_eq!(r, Err(CodeError::NotPatchable { addr }));
    }
    assert_sound(&machine, &m);
}

/// `(code, wrapper bytes)`: the bytes each rig target starts with while it is live.
fn live_bytes(r: &Rig, target: usize) -> Option<[u8; 6]> {
    let mut b = [0; 6];
    r.machine.exec_as(0, target, &mut b).ok()?;
    Some(b)
}

/// Review, item 1: when the pending patch's round fails again, a new patch stores nothing — and
/// must say so (not `SyncFailed`, which the module reads as "stored": it would move its books
/// to the new target and free the old one, which the slot still jumps to).
#[test]
fn xmc_int3_pending_patch_failing_again_is_not_reported_as_stored() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        xmc_int3_pending_patch_failing_again_is_not_reported_as_stored_in(mode);
    }
}

fn xmc_int3_pending_patch_failing_again_is_not_reported_as_stored_in(mode: Mode) {
    let r = rig(mode, int3);
    r.warm();
    let [old, new] = r.targets;
    // The first patch's first round, then both tries of the second call (the manager lock's
    // `finish_pending`, the patch's own finish) fail.
    r.machine.fail_next(CallKind::Sync, 3);
    let first = r.module.patch_slot(0, new).unwrap_err();
    assert!(
        matches!(first, ModuleError::Code(CodeError::SyncFailed(_))),
        "{first:?}"
    );
    let pokes = r.pokes();
    let second = r.module.patch_slot(0, old).unwrap_err();
    assert_eq!(r.pokes(), pokes, "nothing of the second call stored");
    // The slot goes to `new` once the pending patch finishes: freeing it must keep it.
    let freed = r.module.free_code(new);
    pass_grace(r.regs);
    r.module.reclaim().unwrap();
    r.module.patch_slot(1, old).unwrap(); // finishes the pending patch
    for cpu in 0..4 {
        assert_eq!(r.call(cpu), Some(new));
    }
    assert_eq!(
        live_bytes(&r, new),
        Some([0xB9, 1, 0, 0, 0, 0xC3]),
        "the slot leads to freed code"
    );
    assert!(
        matches!(second, ModuleError::Code(CodeError::PatchPending(_))),
        "{second:?}"
    );
    assert!(
        matches!(freed, Err(ModuleError::StillTargeted { start }) if start == new),
        "{freed:?}"
    );
    assert_sound(&r.machine, &r.manager);
}

/// Review, item 2: the tables a pending INT3 patch stores into go with their module. The patch
/// is finished before their space is released — else its sites stayed registered with resume
/// targets in freed code, and a later step poked old slot bytes into whatever reused the range.
/// While it cannot finish, the space stays (mapped, its sites meaningful) until it can.
#[test]
fn xmc_int3_pending_patch_finishes_before_its_tables_go() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        xmc_int3_pending_patch_finishes_before_its_tables_go_in(mode);
    }
}

fn xmc_int3_pending_patch_finishes_before_its_tables_go_in(mode: Mode) {
    for fail_again in [false, true] {
        let r = rig(mode, int3);
        r.warm();
        let (slot, new, sites, regs) = (r.slot(), r.targets[1], r.sites, r.regs);
        r.machine.fail_nth(CallKind::Sync, 0);
        r.module.patch_slot(0, new).unwrap_err();
        assert_eq!(sites.resume_at(slot + 1), Some(new), "pending");
        if fail_again {
            r.machine.fail_next(CallKind::Sync, u64::MAX);
        }
        drop(r.module);
        assert_eq!(settle(regs), 1, "the dropped module's state");
        if fail_again {
            assert!(
                is_mapped(&r.manager, slot),
                "tables released under a pending patch"
            );
            assert_eq!(sites.resume_at(slot + 1), Some(new));
            r.machine.clear_failures();
            // The manager's next operation finishes the patch, then releases the space.
            r.manager.code_spaces().unwrap();
        }
        assert_eq!(
            sites.resume_at(slot + 1),
            None,
            "fail_again {fail_again}: a site outlives its table"
        );
        assert!(!is_mapped(&r.manager, slot), "fail_again {fail_again}");
        // The range is reused: nothing of the old patch lands there.
        let reuse = module(&r.manager, registries(), functions(2));
        let table = first_table(&reuse);
        let before = read(&r.manager, table.near_slot_addr(0).unwrap(), 8);
        r.manager.code_spaces().unwrap();
        assert_eq!(
            read(&r.manager, table.near_slot_addr(0).unwrap(), 8),
            before
        );
        drop(reuse);
        assert_sound(&r.machine, &r.manager);
    }
}
