use super::*;
use std::string::{String, ToString};
use std::sync::Arc;
use std::vec::Vec;

/// `dec_ref` of a reference the test holds (the tests count references to made-up code
/// nothing runs).
fn release(c: &CodeObject) -> DecRef {
    // SAFETY: no code runs behind the tests' objects: an unbalanced release only shows in
    // the count, which is what the tests check.
    unsafe { c.dec_ref() }
}

fn r(start: usize, end: usize) -> AddressRange {
    AddressRange::new(start, end)
}

const RELOCS: [Relocation; 2] = [
    Relocation {
        offset: 0x9,
        kind: RelocKind::CallSlot { slot: 3 },
    },
    Relocation {
        offset: 0x18,
        kind: RelocKind::InternalReference {
            target_offset: 0x3c,
        },
    },
];
const POSITIONS: [(u32, u32); 4] = [(0x0, 10), (0x8, 12), (0x8, 13), (0x20, 40)];

fn full() -> CodeObject {
    CodeObject::new(&CodeDesc {
        kind: CodeKind::Function,
        index: Some(3),
        instructions: r(0x1000, 0x1040),
        protected_instructions: &[0x20, 0x4, 0x10],
        relocations: &RELOCS,
        source_positions: &POSITIONS,
        name: Some("add_one"),
    })
    .unwrap()
}

#[test]
fn header_fits_and_metadata_is_one_allocation() {
    assert!(core::mem::size_of::<CodeObject>() <= 96);
    assert_eq!(core::mem::size_of::<CodeObject>(), 64);
    let c = full();
    // 3 protected + 4 positions × 2 words + 2 relocations × 9 bytes + 7 name bytes.
    let meta = 3 * 4 + 4 * 8 + 2 * 9 + 7;
    assert_eq!(c.metadata.len(), meta);
    assert_eq!(c.memory_usage(), 64 + meta);
    let bare = CodeObject::new(&CodeDesc::new(CodeKind::JumpTable, r(0, 8))).unwrap();
    assert_eq!(bare.memory_usage(), 64);
}

#[test]
fn accessors_round_trip() {
    let c = full();
    assert_eq!(c.kind(), CodeKind::Function);
    assert_eq!(c.index(), Some(3));
    assert_eq!(c.instructions(), r(0x1000, 0x1040));
    assert_eq!(c.instruction_start(), 0x1000);
    assert_eq!(
        c.protected_instructions().collect::<Vec<_>>(),
        [0x4, 0x10, 0x20]
    );
    assert_eq!(c.protected_instructions().len(), 3);
    assert!(c.is_protected(0x10));
    assert!(!c.is_protected(0x11));
    assert!(!c.is_protected(0x40));
    assert_eq!(c.relocations().collect::<Vec<_>>(), RELOCS);
    assert_eq!(c.source_positions().collect::<Vec<_>>(), POSITIONS);
    assert_eq!(c.name(), Some("add_one"));
    assert!(c.contains(0x1000) && c.contains(0x103f));
    assert!(!c.contains(0x1040) && !c.contains(0xfff));
    assert_eq!(c.ref_count(), 1);
    assert!(!c.is_dying());
}

#[test]
fn source_position_before_is_last_at_or_below() {
    let c = full();
    assert_eq!(c.source_position_before(0), Some(10));
    assert_eq!(c.source_position_before(7), Some(10));
    // Equal pc offsets: the last one wins.
    assert_eq!(c.source_position_before(8), Some(13));
    assert_eq!(c.source_position_before(0x1f), Some(13));
    assert_eq!(c.source_position_before(0x20), Some(40));
    assert_eq!(c.source_position_before(u32::MAX), Some(40));
    let late = CodeObject::new(&CodeDesc {
        source_positions: &[(4, 1)],
        ..CodeDesc::new(CodeKind::Function, r(0, 8))
    })
    .unwrap();
    assert_eq!(late.source_position_before(3), None);
    assert_eq!(late.source_position_before(4), Some(1));
    let none = CodeObject::new(&CodeDesc::new(CodeKind::Function, r(0, 8))).unwrap();
    assert_eq!(none.source_position_before(4), None);
}

#[test]
fn debug_names() {
    let named = full();
    assert_eq!(named.debug_name().to_string(), "add_one");
    let desc = |kind, index, name| CodeDesc {
        index,
        name,
        ..CodeDesc::new(kind, r(0x1000, 0x1010))
    };
    let name = |d: CodeDesc<'_>| CodeObject::new(&d).unwrap().debug_name().to_string();
    assert_eq!(name(desc(CodeKind::Function, Some(3), None)), "func[3]");
    assert_eq!(name(desc(CodeKind::Function, Some(3), Some(""))), "func[3]");
    assert_eq!(name(desc(CodeKind::Function, None, None)), "func[?]");
    assert_eq!(name(desc(CodeKind::Wrapper, Some(1), None)), "wrapper");
    assert_eq!(name(desc(CodeKind::JumpTable, None, None)), "jump-table");
    assert_eq!(
        name(desc(CodeKind::Wrapper, None, Some("js-to-wasm"))),
        "js-to-wasm"
    );
    assert_eq!(
        CodeObject::new(&desc(CodeKind::Function, Some(3), Some("")))
            .unwrap()
            .name(),
        None
    );
}

#[test]
fn display_header_and_sections() {
    let c = full();
    assert_eq!(c.to_string(), "add_one function [0x1000, 0x1040) 64");
    assert_eq!(
        std::format!("{c:#}"),
        "add_one function [0x1000, 0x1040) 64\n  protected instructions: 0x4 0x10 0x20\n  \
         relocations: 0x9 call-slot 3; 0x18 internal 0x3c;\n  \
         source positions: 0x0=10 0x8=12 0x8=13 0x20=40"
    );
    let jt = CodeObject::new(&CodeDesc::new(CodeKind::JumpTable, r(0x2000, 0x2100))).unwrap();
    assert_eq!(
        std::format!("{jt:#}"),
        "jump-table jump-table [0x2000, 0x2100) 256"
    );
    assert!(std::format!("{c:?}").contains("add_one"));
}

#[test]
fn validation_errors() {
    let base = CodeDesc::new(CodeKind::Function, r(0x1000, 0x1010));
    let err = |d: CodeDesc<'_>| CodeObject::new(&d).unwrap_err();
    assert_eq!(
        err(CodeDesc::new(CodeKind::Function, r(5, 5))),
        CodeObjectError::EmptyInstructions
    );
    assert_eq!(
        err(CodeDesc {
            protected_instructions: &[1, 0x10, 0x20],
            ..base
        }),
        CodeObjectError::ProtectedOffsetOutOfRange { offset: 0x10 }
    );
    assert_eq!(
        err(CodeDesc {
            protected_instructions: &[3, 1, 5, 3, 1],
            ..base
        }),
        CodeObjectError::DuplicateProtectedOffset { offset: 1 }
    );
    let call = |offset| Relocation {
        offset,
        kind: RelocKind::CallSlot { slot: 0 },
    };
    let internal = |offset, target_offset| Relocation {
        offset,
        kind: RelocKind::InternalReference { target_offset },
    };
    assert!(CodeObject::new(&CodeDesc {
        relocations: &[call(0xc), internal(0x8, 0xf)],
        ..base
    })
    .is_ok());
    assert_eq!(
        err(CodeDesc {
            relocations: &[call(0xd)],
            ..base
        }),
        CodeObjectError::RelocationOutOfRange { offset: 0xd }
    );
    assert_eq!(
        err(CodeDesc {
            relocations: &[internal(0x9, 0)],
            ..base
        }),
        CodeObjectError::RelocationOutOfRange { offset: 0x9 }
    );
    assert_eq!(
        err(CodeDesc {
            relocations: &[call(u32::MAX)],
            ..base
        }),
        CodeObjectError::RelocationOutOfRange { offset: u32::MAX }
    );
    assert_eq!(
        err(CodeDesc {
            relocations: &[internal(0, 0x10)],
            ..base
        }),
        CodeObjectError::RelocationTargetOutOfRange {
            offset: 0,
            target_offset: 0x10
        }
    );
    assert_eq!(
        err(CodeDesc {
            source_positions: &[(0, 0), (0x10, 1)],
            ..base
        }),
        CodeObjectError::SourcePositionOutOfRange { pc_offset: 0x10 }
    );
    assert_eq!(
        err(CodeDesc {
            source_positions: &[(0, 0), (4, 1), (4, 2), (3, 3)],
            ..base
        }),
        CodeObjectError::UnsortedSourcePositions { index: 3 }
    );
    assert!(CodeObjectError::DuplicateProtectedOffset { offset: 16 }
        .to_string()
        .contains("0x10"));
}

#[test]
fn ref_count_dies_once_and_is_not_resurrected() {
    let c = full();
    assert!(c.inc_ref());
    assert_eq!(c.ref_count(), 2);
    assert_eq!(release(&c), DecRef::Alive);
    assert!(!c.is_dying());
    assert_eq!(release(&c), DecRef::Dead);
    assert!(c.is_dying());
    assert_eq!(c.ref_count(), 0);
    assert!(!c.inc_ref(), "dying code must not be resurrected");
    assert!(c.is_dying());
    assert_eq!(c.ref_count(), 0);
}

#[test]
fn dec_ref_on_dying_is_refused_and_changes_nothing() {
    let c = full();
    assert_eq!(release(&c), DecRef::Dead);
    let count = c.ref_count();
    assert_eq!(release(&c), DecRef::AlreadyDying);
    assert_eq!(c.ref_count(), count);
    assert!(c.is_dying());
}

#[test]
fn ref_count_race_exactly_one_dead() {
    for _ in 0..20 {
        let c = Arc::new(full());
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let c = Arc::clone(&c);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let mut dead = 0;
                    let mut refs = 0;
                    barrier.wait();
                    for i in 0..2000 {
                        // Thread 0 drops the initial reference part-way through.
                        if t == 0 && i == 500 && release(&c) == DecRef::Dead {
                            dead += 1;
                        }
                        if c.inc_ref() {
                            refs += 1;
                            if release(&c) == DecRef::Dead {
                                dead += 1;
                            }
                        }
                    }
                    (dead, refs)
                })
            })
            .collect();
        let results: Vec<(u32, u32)> = threads.into_iter().map(|h| h.join().unwrap()).collect();
        let dead: u32 = results.iter().map(|r| r.0).sum();
        assert_eq!(dead, 1, "exactly one dec_ref observes Dead: {results:?}");
        assert!(c.is_dying());
        assert_eq!(c.ref_count(), 0);
        assert!(!c.inc_ref());
    }
}

#[test]
fn ref_count_many_holders_release_concurrently() {
    let c = Arc::new(full());
    for _ in 0..63 {
        assert!(c.inc_ref());
    }
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || (0..8).filter(|_| release(&c) == DecRef::Dead).count())
        })
        .collect();
    let dead: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(dead, 1);
    assert!(c.is_dying());
}

#[cfg(feature = "disasm")]
#[test]
fn disassembly_marks_protected_and_source_positions() {
    // mov eax,[rdi] (protected, source 12); add eax,1; ret
    let bytes = [0x8b, 0x07, 0x83, 0xc0, 0x01, 0xc3, 0xcc, 0xcc];
    let c = CodeObject::new(&CodeDesc {
        index: Some(3),
        protected_instructions: &[0],
        source_positions: &[(0, 12), (2, 14)],
        ..CodeDesc::new(CodeKind::Function, r(0x1000, 0x1006))
    })
    .unwrap();
    let mut out = String::new();
    c.disassemble(&bytes, &mut out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "func[3] function [0x1000, 0x1006) 6",
            "0000000000001000: 8b07                  mov eax,[rdi]  ; protected, source 12",
            "0000000000001002: 83c001                add eax,1  ; source 14",
            "0000000000001005: c3                    ret",
        ]
    );
}

#[test]
fn display_to_string_buffer() {
    let mut s = String::new();
    fmt::Write::write_fmt(&mut s, format_args!("{}", full())).unwrap();
    assert_eq!(s, "add_one function [0x1000, 0x1040) 64");
}
