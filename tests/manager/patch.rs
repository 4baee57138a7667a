//! `CodeAllocator::patch`, the narrow replacement of the old `CodeManager::patch_u64`: aligned
//! 8-byte stores into the allocator's own published jump tables only, through the private alias,
//! then every CPU serializes.

use codespace::mmu::Mmu;
use codespace::{CodeError, ManagerConfig};

use super::{allocator, allocator_with_space, publish_filled, state};
use crate::common::*;

#[test]
fn patch_stores_whole_slots_that_every_cpu_then_executes() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator(&m);
    let mut table = a.allocate_table(PAGE + 64, None).unwrap();
    assert_eq!(table.start() % PAGE, 0, "tables start on a page");
    assert_eq!(table.range().size(), 2 * PAGE, "and own whole pages");
    table.as_mut_slice().fill(INT3);
    let table = a.publish(table).unwrap();
    assert!(table.is_patchable());
    // Code right after the table shares none of its pages.
    let code = publish_filled(&mut a, 64, 0x90);
    assert!(code.start() >= table.range().end());

    // Every CPU has executed the table once (its old bytes are what it may keep seeing).
    let slots = [table.start() + 8, table.start() + PAGE + 56];
    for cpu in 0..machine.online_cpus() {
        for &s in &slots {
            let mut old = [0; 8];
            machine.exec_as(cpu, s, &mut old).unwrap();
            assert_eq!(old, [INT3; 8]);
        }
    }
    let stores_before = machine.leaf_stores();
    let stats_before = m.flush_stats().unwrap();
    let mapped_before = machine.snapshot().leaves;
    let values = [0x1122_3344_5566_7788u64, 0x99AA_BBCC_DDEE_FF00];
    patch_tables(
        &a,
        &[&table],
        &[(slots[0], values[0]), (slots[1], values[1])],
    )
    .unwrap();

    for (&s, &v) in slots.iter().zip(&values) {
        assert_eq!(read_u64(&m, s), v);
        for cpu in 0..machine.online_cpus() {
            let mut seen = [0; 8];
            machine.exec_as(cpu, s, &mut seen).unwrap();
            assert_eq!(u64::from_le_bytes(seen), v, "CPU {cpu} runs the new slot");
        }
    }
    // Through the private alias: no shared leaf changed; one session, one serialization round.
    assert_eq!(machine.leaf_stores(), stores_before);
    assert_eq!(machine.snapshot().leaves, mapped_before);
    let stats = m.flush_stats().unwrap();
    assert_eq!(stats.pokes - stats_before.pokes, 1);
    assert_eq!(stats.syncs - stats_before.syncs, 1);
    assert_eq!(stats.shootdowns, stats_before.shootdowns, "no TLB work");
    assert_eq!(
        read(&m, table.start(), 8),
        [INT3; 8],
        "other bytes untouched"
    );
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn patch_refuses_anything_but_aligned_slots_of_own_tables() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator_with_space(&m, 16 * PAGE);
    let mut b = allocator(&m);
    let mut t = a.allocate_table(64, None).unwrap();
    t.as_mut_slice().fill(INT3);
    let table = a.publish(t).unwrap();
    let code = publish_filled(&mut a, 128, 0x90);
    let mut other = b.allocate_table(64, None).unwrap();
    other.as_mut_slice().fill(INT3);
    let other = b.publish(other).unwrap();
    let before = state(&machine, &m, &[&a, &b]);

    let not_patchable = |addr| Err(CodeError::NotPatchable { addr });
    // Ordinary code is never patchable, not even its aligned words.
    assert_eq!(
        patch_tables(&a, &[&code], &[(code.start(), 0)]),
        not_patchable(code.start())
    );
    assert_eq!(
        patch_tables(&a, &[&table], &[(code.start(), 0)]),
        not_patchable(code.start()),
        "an address outside the tables named"
    );
    // Misaligned, and straddling the end of the table's range.
    assert_eq!(
        patch_tables(&a, &[&table], &[(table.start() + 4, 0)]),
        not_patchable(table.start() + 4)
    );
    let last = table.range().end() - 4;
    assert_eq!(
        patch_tables(&a, &[&table], &[(last, 0)]),
        not_patchable(last)
    );
    assert_eq!(
        patch_tables(&a, &[&table], &[(table.range().end(), 0)]),
        not_patchable(table.range().end())
    );
    // All or nothing: one bad store refuses the good ones.
    assert_eq!(
        patch_tables(&a, &[&table], &[(table.start(), 1), (table.start() + 3, 2)]),
        not_patchable(table.start() + 3)
    );
    // Another allocator's table.
    assert_eq!(
        patch_tables(&a, &[&other], &[(other.start(), 0)]),
        Err(CodeError::ForeignCode)
    );
    assert_eq!(state(&machine, &m, &[&a, &b]), before);

    // No stores: nothing changes.
    patch_tables(&a, &[&table], &[]).unwrap();
    assert_eq!(read(&m, table.start(), 64), [INT3; 64]);
    assert_sound_no_leak(&machine, &m);
}
