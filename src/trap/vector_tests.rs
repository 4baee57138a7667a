//! Issue 17: several accepted fault ranges per registration, and trap sites of other vectors
//! than #PF (#UD, #DE) found only by their own vector's lookup.

use super::test_register::TestRegister;
use super::tests::{r, reg, table};
use super::*;
use std::vec::Vec;

/// Issue 17: a registration accepts faults in each of several ranges (wasm: every linear
/// memory's reservation and the null page range), and nowhere between or around them; the
/// ranges may come in any order and overlap. Entries of 1, 2, 3 and 40 ranges, for narrow and
/// wide offsets, read back exactly.
#[test]
fn lookup_fault_accepts_any_of_several_fault_ranges() {
    let t = table();
    let null = r(0, 0x1_0000);
    let memory_a = r(0x7000_0000, 0x7100_0000);
    let memory_b = r(0x9000_0000, 0x9000_2000);
    let overlapping = r(0x7080_0000, 0x7200_0000);
    let sets: [&[AddressRange]; 3] = [
        &[memory_b, null, memory_a],
        &[memory_a, overlapping],
        &[null],
    ];
    for (i, set) in sets.iter().enumerate() {
        for size in [0x40usize, 0x2_0000] {
            let start = 0x100_0000 + i * 0x10_0000;
            let registration = TrapRegistration {
                fault_ranges: set,
                ..reg(r(start, start + size), &[0x10, 0x30], start + 0x38)
            };
            let h = t.test_register_with(&registration).unwrap();
            let pc = start + 0x30;
            let probes = [
                0,
                0xFFFF,
                0x1_0000,
                0x6FFF_FFFF,
                0x7000_0000,
                0x70FF_FFFF,
                0x7100_0000,
                0x71FF_FFFF,
                0x7200_0000,
                0x8FFF_FFFF,
                0x9000_1FFF,
                0x9000_2000,
                usize::MAX,
            ];
            for addr in probes {
                let expected = set.iter().any(|f| f.contains(addr));
                assert_eq!(
                    t.lookup_fault(pc, addr).is_some(),
                    expected,
                    "set {i}, size {size:#x}, fault at {addr:#x}"
                );
            }
            assert_eq!(t.lookup_fault(start + 0x31, 0x7000_0000), None);
            t.release(h).unwrap();
        }
    }
    // Many ranges: every one accepted, every gap refused.
    let many: Vec<AddressRange> = (0..40usize)
        .map(|i| {
            r(
                0x1000_0000 + i * 0x10_0000,
                0x1000_0000 + i * 0x10_0000 + 0x1000,
            )
        })
        .collect();
    let registration = TrapRegistration {
        fault_ranges: &many,
        ..reg(r(0x4000, 0x4040), &[0x8], 0x4020)
    };
    t.test_register_with(&registration).unwrap();
    for f in &many {
        assert!(t.lookup_fault(0x4008, f.start()).is_some());
        assert!(t.lookup_fault(0x4008, f.end() - 1).is_some());
        assert!(t.lookup_fault(0x4008, f.end()).is_none());
    }
    assert_eq!(t.memory().headers, 16 + 8 + 40 * 16);
}

/// Issue 17: a site is found only by the lookup of the vector it was registered for. #UD and
/// #DE sites never answer a page fault (not even one in an accepted range), #PF sites never
/// answer `lookup_trap`, and a #UD site is no #DE site. Checked once against a table whose
/// `has_site` compared offsets only: `lookup_trap(DivideError, 0x1020)` hit the #UD site.
#[test]
fn sites_answer_only_the_lookup_of_their_vector() {
    use TrapVector::{DivideError as De, InvalidOpcode as Ud, PageFault as Pf};
    let t = table();
    let start = 0x1000;
    let memory = [r(0x7000_0000, 0x7001_0000)];
    let sites = [(0x20, Ud), (0x30, De), (0x40, Ud), (0x40, De), (0x50, Pf)];
    let registration = TrapRegistration {
        code: r(start, start + 0x100),
        protected: &[0x10],
        sites: &sites,
        landing_pad: start + 0xF0,
        fault_ranges: &memory,
    };
    t.test_register_with(&registration).unwrap();
    let inside = 0x7000_0010;
    let expect = |offset: usize, pf: bool, ud: bool, de: bool| {
        let pc = start + offset;
        assert_eq!(
            t.lookup_fault(pc, inside).is_some(),
            pf,
            "#PF at {offset:#x}"
        );
        assert_eq!(t.lookup(pc).is_some(), pf, "lookup at {offset:#x}");
        assert_eq!(t.lookup_trap(Ud, pc).is_some(), ud, "#UD at {offset:#x}");
        assert_eq!(t.lookup_trap(De, pc).is_some(), de, "#DE at {offset:#x}");
        assert_eq!(t.lookup_trap(Pf, pc), None, "#PF goes through lookup_fault");
    };
    expect(0x10, true, false, false);
    expect(0x20, false, true, false);
    expect(0x30, false, false, true);
    expect(0x40, false, true, true);
    expect(0x50, true, false, false);
    for offset in [0, 0x11, 0x21, 0x31, 0x41, 0xF0, 0xFF, 0x100, 0x200] {
        expect(offset, false, false, false);
    }
    let hit = t.lookup_trap(Ud, start + 0x40).unwrap();
    assert_eq!(
        (hit.vector(), hit.pc(), hit.landing_pad(), hit.code_start()),
        (Ud, start + 0x40, start + 0xF0, start)
    );
    assert_eq!(t.lookup_trap(De, start + 0x40).unwrap().vector(), De);
    assert_eq!(t.lookup_fault(start + 0x50, inside).unwrap().vector(), Pf);
    // The fault-address filter is #PF's only: outside the memory no page fault is resumed.
    assert_eq!(t.lookup_fault(start + 0x50, 0x10), None);
    assert_eq!(t.memory().protected, 6);
}

#[test]
fn vector_sites_are_validated_like_offsets() {
    use TrapVector::{DivideError as De, InvalidOpcode as Ud, PageFault as Pf};
    let t = table();
    let with = |protected: &'static [u32], sites: &'static [(u32, TrapVector)]| {
        t.test_register_with(&TrapRegistration {
            sites,
            ..reg(r(0x2000, 0x2010), protected, 0x2000)
        })
    };
    assert_eq!(
        with(&[], &[(3, Ud), (3, Ud)]),
        Err(TrapError::DuplicateOffset { offset: 3 })
    );
    assert_eq!(
        with(&[5], &[(5, Pf)]),
        Err(TrapError::DuplicateOffset { offset: 5 })
    );
    assert_eq!(
        with(&[], &[(1, De), (0x10, Ud)]),
        Err(TrapError::OffsetOutOfRange { offset: 0x10 })
    );
    assert!(t.is_empty());
    let h = with(&[5], &[(5, Ud), (5, De)]).unwrap();
    t.release(h).unwrap();
    // Many sites of each vector over large code: every one found, its neighbours not.
    let size = 0x2_0000usize;
    let sites: Vec<(u32, TrapVector)> = (0..600u32)
        .map(|i| (i * 211 + 7, if i % 3 == 0 { De } else { Ud }))
        .rev()
        .collect();
    let start = 0x40_0000;
    let h = t
        .test_register_with(&TrapRegistration {
            sites: &sites,
            ..reg(r(start, start + size), &[], start)
        })
        .unwrap();
    for &(o, v) in &sites {
        let pc = start + o as usize;
        assert_eq!(t.lookup_trap(v, pc).map(|h| h.vector()), Some(v));
        let other = if v == Ud { De } else { Ud };
        assert_eq!(t.lookup_trap(other, pc), None);
        assert_eq!(t.lookup_trap(v, pc + 1), None);
        assert_eq!(t.lookup_fault(pc, 0), None);
    }
    assert_eq!(t.memory().protected, 600);
    t.release(h).unwrap();
    assert_eq!(TrapVector::from_number(6), Some(Ud));
    assert_eq!(TrapVector::from_number(13), None);
    for v in TrapVector::ALL {
        assert_eq!(TrapVector::from_number(v.number()), Some(v));
    }
    assert_eq!(std::format!("{Ud}"), "#UD");
}
