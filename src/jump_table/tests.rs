use super::*;
use alloc::string::ToString;
use alloc::vec;
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

fn decode_all(bytes: &[u8], ip: usize) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, bytes, ip as u64, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let instr = decoder.decode();
        assert!(
            !instr.is_invalid(),
            "invalid instruction at {:#x}",
            instr.ip()
        );
        out.push(instr);
    }
    out
}

/// Checks the 8 bytes at `slot` are `jmp target; int3; int3; int3`.
fn check_near(bytes: &[u8], slot: usize, target: usize) {
    assert_eq!(bytes.len(), NEAR_SLOT_SIZE);
    let instrs = decode_all(bytes, slot);
    assert_eq!(instrs.len(), 4, "{instrs:?}");
    assert_eq!(instrs[0].mnemonic(), Mnemonic::Jmp);
    assert_eq!(instrs[0].code(), Code::Jmp_rel32_64);
    assert_eq!(instrs[0].len(), 5);
    assert_eq!(instrs[0].op0_kind(), OpKind::NearBranch64);
    assert_eq!(instrs[0].near_branch_target(), target as u64);
    for int3 in &instrs[1..] {
        assert_eq!(int3.code(), Code::Int3);
    }
}

/// Checks the 16 bytes at `slot` are `jmp [rip+2]; nop` followed by the qword `target`.
fn check_far(bytes: &[u8], slot: usize, target: usize) {
    assert_eq!(bytes.len(), FAR_SLOT_SIZE);
    let instrs = decode_all(&bytes[..FAR_SLOT_TARGET_OFFSET], slot);
    assert_eq!(instrs.len(), 2, "{instrs:?}");
    let jmp = &instrs[0];
    assert_eq!(jmp.mnemonic(), Mnemonic::Jmp);
    assert_eq!(jmp.code(), Code::Jmp_rm64);
    assert_eq!(jmp.len(), 6);
    assert_eq!(jmp.op0_kind(), OpKind::Memory);
    assert_eq!(jmp.memory_base(), Register::RIP);
    assert!(jmp.is_ip_rel_memory_operand());
    assert_eq!(
        jmp.ip_rel_memory_address(),
        (slot + FAR_SLOT_TARGET_OFFSET) as u64
    );
    assert_eq!(instrs[1].mnemonic(), Mnemonic::Nop);
    assert_eq!(instrs[1].code(), Code::Nopw);
    assert_eq!(instrs[1].len(), 2);
    let qword = u64::from_le_bytes(bytes[FAR_SLOT_TARGET_OFFSET..].try_into().unwrap());
    assert_eq!(qword, target as u64);
}

/// Checks the 10 bytes at `slot` are `push index; jmp entry`.
fn check_lazy(bytes: &[u8], slot: usize, index: u32, entry: usize) {
    assert_eq!(bytes.len(), LAZY_SLOT_SIZE);
    let instrs = decode_all(bytes, slot);
    assert_eq!(instrs.len(), 2, "{instrs:?}");
    assert_eq!(instrs[0].mnemonic(), Mnemonic::Push);
    assert_eq!(instrs[0].code(), Code::Pushq_imm32);
    assert_eq!(instrs[0].op0_kind(), OpKind::Immediate32to64);
    assert_eq!(instrs[0].immediate32(), index);
    assert_eq!(instrs[1].code(), Code::Jmp_rel32_64);
    assert_eq!(instrs[1].near_branch_target(), entry as u64);
}

#[test]
fn near_slot_decodes_to_jmp_and_int3() {
    for (slot, target) in [
        (0x1000usize, 0x2000usize),
        (0x2000, 0x1000),
        (0x1000, 0x1005), // displacement 0
        (0x1000, 0x1000), // jump to itself
        (0x7fff_0000_0000, 0x7fff_7fff_0000),
    ] {
        let value = near_slot(slot, target).unwrap();
        check_near(&value.to_le_bytes(), slot, target);
    }
    assert_eq!(
        near_slot(0x1000, 0x1005).unwrap().to_le_bytes(),
        [0xE9, 0, 0, 0, 0, 0xCC, 0xCC, 0xCC]
    );
}

#[test]
fn rel32_boundaries() {
    let slot = 0x4000_0000_0000usize;
    let end = slot + 5;
    let max = end + i32::MAX as usize;
    let min = end - (i32::MIN as i64).unsigned_abs() as usize;
    assert!(fits_rel32(end, max));
    assert!(fits_rel32(end, min));
    assert!(!fits_rel32(end, max + 1));
    assert!(!fits_rel32(end, min - 1));
    assert_eq!(rel32(end, max), Some(i32::MAX));
    assert_eq!(rel32(end, min), Some(i32::MIN));
    check_near(&near_slot(slot, max).unwrap().to_le_bytes(), slot, max);
    check_near(&near_slot(slot, min).unwrap().to_le_bytes(), slot, min);
    assert_eq!(near_slot(slot, max + 1), None);
    assert_eq!(near_slot(slot, min - 1), None);

    let lazy_end = slot + LAZY_SLOT_SIZE;
    let lmax = lazy_end + i32::MAX as usize;
    let lmin = lazy_end - (1usize << 31);
    check_lazy(&lazy_slot(slot, 7, lmax).unwrap(), slot, 7, lmax);
    check_lazy(&lazy_slot(slot, 7, lmin).unwrap(), slot, 7, lmin);
    assert_eq!(lazy_slot(slot, 7, lmax + 1), None);
    assert_eq!(lazy_slot(slot, 7, lmin - 1), None);
}

#[test]
fn extreme_addresses_do_not_panic() {
    assert!(!fits_rel32(0, usize::MAX));
    assert!(!fits_rel32(usize::MAX, 0));
    assert!(fits_rel32(usize::MAX, usize::MAX));
    // No wrap-around across the top of the address space.
    assert_eq!(near_slot(usize::MAX - 7, 3), None);
    assert_eq!(near_slot(usize::MAX - 4, usize::MAX), None); // slot + 5 overflows
    assert_eq!(
        near_slot(usize::MAX - 7, usize::MAX),
        Some(u64::from_le_bytes([0xE9, 2, 0, 0, 0, 0xCC, 0xCC, 0xCC]))
    );
    assert_eq!(lazy_slot(usize::MAX - 5, 0, 0), None);
    assert_eq!(lazy_slot(usize::MAX - 9, 0, usize::MAX), None); // slot + 10 overflows
    assert_eq!(
        lazy_slot(usize::MAX - 10, 0, usize::MAX - 10),
        Some([0x68, 0, 0, 0, 0, 0xE9, 0xF6, 0xFF, 0xFF, 0xFF])
    );
    assert!(JumpTableLayout::new(usize::MAX - 15, 4, false).is_none());
    assert!(JumpTableLayout::new(usize::MAX - 15, 0, true).is_some());
    assert!(JumpTableLayout::new(0x1008, 1, true).is_none()); // misaligned base
    assert_eq!(near_table_size(usize::MAX), None);
    assert_eq!(far_table_size(usize::MAX / 8), None);
    assert_eq!(lazy_table_size(usize::MAX / 5), None);
    assert_eq!(lazy_table_size(3), Some(30));
}

#[test]
fn high_canonical_addresses() {
    let slot = 0xFFFF_C000_0000_1000usize;
    for target in [
        0xFFFF_C000_0000_0000usize,
        0xFFFF_C000_7FFF_F000,
        0xFFFF_BFFF_8000_2000,
    ] {
        check_near(
            &near_slot(slot, target).unwrap().to_le_bytes(),
            slot,
            target,
        );
        check_lazy(&lazy_slot(slot, 42, target).unwrap(), slot, 42, target);
    }
    // Kernel text at the top of the address space is out of reach: use the far slot.
    let far_target = 0xFFFF_FFFF_8000_0000usize;
    assert_eq!(near_slot(slot, far_target), None);
    check_far(&far_slot(far_target), slot, far_target);
    check_far(&far_slot(0x1234), 0xFFFF_C000_0000_0010, 0x1234);
}

#[test]
fn far_slot_encoding() {
    let bytes = far_slot(0x1122_3344_5566_7788);
    assert_eq!(
        bytes,
        [0xFF, 0x25, 2, 0, 0, 0, 0x66, 0x90, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
    );
    check_far(&bytes, 0x10_0000, 0x1122_3344_5566_7788);
}

#[test]
fn lazy_slot_encoding() {
    let slot = 0x20_0003usize;
    for index in [0u32, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX] {
        let bytes = lazy_slot(slot, index, 0x10_0000).unwrap();
        check_lazy(&bytes, slot, index, 0x10_0000);
    }
}

#[test]
fn layout_alignment_and_sizes() {
    for slots in [0u32, 1, 2, 3, 7, 100] {
        for with_lazy in [false, true] {
            let base = 0xFFFF_C000_0010_0000usize;
            let l = JumpTableLayout::new(base, slots, with_lazy).unwrap();
            let n = slots as usize;
            assert_eq!(l.base(), base);
            assert_eq!(l.slots(), slots);
            assert_eq!(
                l.near(),
                AddressRange::from_start_size(base, n * 8).unwrap()
            );
            assert_eq!(l.far().start() % FAR_SLOT_ALIGN, 0);
            assert!(l.far().start() >= l.near().end());
            assert!(l.far().start() - l.near().end() < FAR_SLOT_ALIGN);
            assert_eq!(l.far().size(), n * 16);
            match l.lazy() {
                Some(lazy) => {
                    assert!(with_lazy);
                    assert_eq!(lazy.start(), l.far().end());
                    assert_eq!(lazy.size(), n * 10);
                }
                None => assert!(!with_lazy),
            }
            let pad = (n % 2) * 8;
            let expected = n * 8 + pad + n * 16 + if with_lazy { n * 10 } else { 0 };
            assert_eq!(l.total_size(), expected);
            assert_eq!(l.range().start(), base);
            assert_eq!(l.range().size(), expected);
        }
    }
}

#[test]
fn slot_mapping_round_trips() {
    let l = JumpTableLayout::new(0x7000_0000_0000, 37, true).unwrap();
    for i in 0..37 {
        let near = l.near_slot_addr(i).unwrap();
        let far = l.far_slot_addr(i).unwrap();
        let lazy = l.lazy_slot_addr(i).unwrap();
        assert_eq!(near % NEAR_SLOT_ALIGN, 0);
        assert_eq!(far % FAR_SLOT_ALIGN, 0);
        assert_eq!(l.far_target_addr(i), Some(far + 8));
        assert_eq!(l.far_target_addr(i).unwrap() % 8, 0);
        assert_eq!(l.slot_for_near_addr(near), Some(i));
        assert_eq!(l.slot_for_far_addr(far), Some(i));
        assert_eq!(l.slot_for_lazy_addr(lazy), Some(i));
        // Not a slot start, or in a different table.
        assert_eq!(l.slot_for_near_addr(near + 1), None);
        assert_eq!(l.slot_for_far_addr(far + 8), None);
        assert_eq!(l.slot_for_lazy_addr(lazy + 5), None);
        assert_eq!(l.slot_for_near_addr(far), None);
        assert_eq!(l.slot_for_far_addr(near), None);
        assert_eq!(l.slot_for_lazy_addr(near), None);
    }
    assert_eq!(l.near_slot_addr(37), None);
    assert_eq!(l.far_slot_addr(37), None);
    assert_eq!(l.lazy_slot_addr(37), None);
    assert_eq!(l.far_target_addr(u32::MAX), None);
    assert_eq!(l.slot_for_near_addr(l.near().end()), None);
    assert_eq!(l.slot_for_far_addr(l.far().end()), None);
    assert_eq!(l.slot_for_lazy_addr(l.lazy().unwrap().end()), None);
    assert_eq!(l.slot_for_near_addr(0), None);
    assert_eq!(l.slot_for_near_addr(usize::MAX), None);

    let no_lazy = JumpTableLayout::new(0x1000, 4, false).unwrap();
    assert_eq!(no_lazy.lazy_slot_addr(0), None);
    assert_eq!(no_lazy.slot_for_lazy_addr(no_lazy.far().end()), None);
}

/// Decodes slot `i` of each table of `image` and checks it against the expectations.
fn check_image(l: &JumpTableLayout, image: &[u8], targets: &[usize], lazy_entry: Option<usize>) {
    assert_eq!(image.len(), l.total_size());
    let base = l.base();
    let at = |addr: usize, size: usize| &image[addr - base..addr - base + size];
    for (i, &target) in (0u32..).zip(targets) {
        let near = l.near_slot_addr(i).unwrap();
        let far = l.far_slot_addr(i).unwrap();
        let via = if fits_rel32(near + 5, target) {
            target
        } else {
            far
        };
        check_near(at(near, NEAR_SLOT_SIZE), near, via);
        check_far(at(far, FAR_SLOT_SIZE), far, target);
        if let Some(entry) = lazy_entry {
            let lazy = l.lazy_slot_addr(i).unwrap();
            check_lazy(at(lazy, LAZY_SLOT_SIZE), lazy, i, entry);
        }
    }
    // Padding between the near and far tables is int3.
    assert!(image[l.near().size()..l.far().start() - base]
        .iter()
        .all(|&b| b == INT3));
}

#[test]
fn whole_table_emission_mixed_near_and_far() {
    let base = 0xFFFF_C000_0000_0000usize;
    let l = JumpTableLayout::new(base, 5, true).unwrap();
    let entry = base + 0x10_0000;
    let targets = [
        base + 0x4000,                // near
        0xFFFF_FFFF_8000_1000,        // far (kernel text)
        base - 0x7000_0000,           // near, below the table
        0x0000_7fff_0000_0000,        // far (lower half)
        l.lazy_slot_addr(4).unwrap(), // lazily compiled: jump into its lazy slot
    ];
    let image = emit_tables(&l, &targets, Some(entry)).unwrap();
    check_image(&l, &image, &targets, Some(entry));
    // Decode the near table end to end: every jmp lands on the target or its far slot.
    let instrs = decode_all(&image[..l.near().size()], base);
    let jumps: Vec<u64> = instrs
        .iter()
        .filter(|i| i.mnemonic() == Mnemonic::Jmp)
        .map(|i| i.near_branch_target())
        .collect();
    assert_eq!(
        jumps,
        vec![
            targets[0] as u64,
            l.far_slot_addr(1).unwrap() as u64,
            targets[2] as u64,
            l.far_slot_addr(3).unwrap() as u64,
            targets[4] as u64,
        ]
    );
    // The lazy table decodes end to end as push/jmp pairs.
    let lazy = l.lazy().unwrap();
    let lazy_instrs = decode_all(&image[lazy.start() - base..], lazy.start());
    assert_eq!(lazy_instrs.len(), 10);

    let plain = JumpTableLayout::new(base, 5, false).unwrap();
    let image = emit_tables(&plain, &targets, None).unwrap();
    check_image(&plain, &image, &targets, None);
}

#[test]
fn emission_errors() {
    let l = JumpTableLayout::new(0x10_0000, 2, true).unwrap();
    let plain = JumpTableLayout::new(0x10_0000, 2, false).unwrap();
    assert_eq!(
        emit_tables(&l, &[1], Some(0)),
        Err(JumpTableError::TargetCount {
            expected: 2,
            got: 1
        })
    );
    assert_eq!(
        emit_tables(&l, &[1, 2], None),
        Err(JumpTableError::MissingLazyEntry)
    );
    assert_eq!(
        emit_tables(&plain, &[1, 2], Some(0)),
        Err(JumpTableError::NoLazyTable)
    );
    assert_eq!(
        emit_tables(&l, &[1, 2], Some(0x7fff_0000_0000)),
        Err(JumpTableError::LazyEntryOutOfReach { slot: 0 })
    );
    let mut small = [0u8; 31];
    assert_eq!(
        write_far_table(&[1, 2], &mut small),
        Err(JumpTableError::BufferTooSmall {
            needed: 32,
            got: 31
        })
    );
    assert_eq!(
        write_near_table(&l, &[1, 2], &mut small[..15]),
        Err(JumpTableError::BufferTooSmall {
            needed: 16,
            got: 15
        })
    );
    assert_eq!(
        write_lazy_table(&plain, 0, &mut small),
        Err(JumpTableError::NoLazyTable)
    );
    // A huge table whose last near slot cannot reach its own far slot.
    let huge = JumpTableLayout::new(0, u32::MAX, false).unwrap();
    let last = u32::MAX - 1;
    assert_eq!(huge.near_slot_value(last, usize::MAX / 2), None);
    assert_eq!(huge.patch(last, usize::MAX / 2), None);
    assert_eq!(huge.patch(0, usize::MAX / 2), None);
    assert!(huge.patch(0, 0x1000).unwrap().direct);
    assert!(!emit_tables(&l, &[1, 2], Some(0x10_0000))
        .unwrap()
        .is_empty());
    assert!(!JumpTableError::FarSlotOutOfReach { slot: 3 }
        .to_string()
        .is_empty());
}

#[test]
fn patch_in_image() {
    let base = 0xFFFF_C000_0020_0000usize;
    let l = JumpTableLayout::new(base, 3, false).unwrap();
    let mut targets = [base + 0x1000, base + 0x2000, base + 0x3000];
    let mut image = emit_tables(&l, &targets, None).unwrap();
    for (i, new) in [
        (1u32, 0xFFFF_FFFF_8123_4560usize),
        (1, base + 0x5000),
        (2, 0x1000),
    ] {
        let p = l.patch(i, new).unwrap();
        assert_eq!(p.near_addr % 8, 0);
        assert_eq!(p.far_target_addr % 8, 0);
        assert_eq!(p.target, new);
        assert_eq!(p.direct, fits_rel32(p.near_addr + 5, new));
        assert_eq!(Some(p.near_value), l.near_slot_value(i, new));
        let far = p.far_target_addr - base;
        image[far..far + 8].copy_from_slice(&(p.target as u64).to_le_bytes());
        let near = p.near_addr - base;
        image[near..near + 8].copy_from_slice(&p.near_value.to_le_bytes());
        targets[i as usize] = new;
        check_image(&l, &image, &targets, None);
    }
    assert_eq!(l.patch(3, 0), None);
}
