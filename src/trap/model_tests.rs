//! Random model test of the trap table: register, batch, release and lookup sequences against
//! a brute-force scan of a `Vec`.

use super::prepare::prepare;
use super::test_register::TestRegister;
use super::tests::grace;
use super::*;
use proptest::prelude::*;
use std::vec::Vec;

fn r(start: usize, end: usize) -> AddressRange {
    AddressRange::new(start, end)
}

fn table() -> TrapTable {
    TrapTable::new(grace())
}

/// `(start, size, offsets, landing offset, fault ranges)`.
type Reg = (usize, usize, Vec<u32>, usize, Vec<(usize, usize)>);

#[derive(Clone, Debug)]
enum Op {
    /// Registrations as `(start, size, offsets, landing offset, fault ranges)`; more than one is
    /// a batch.
    Register(Vec<Reg>),
    /// Release the n-th handles ever issued (possibly stale), or never-issued ones.
    Release(Vec<usize>),
    Lookup(usize, usize),
}

const SPACE: usize = 512;

fn one_registration() -> impl Strategy<Value = Reg> {
    (0..SPACE, 0..48usize).prop_flat_map(|(start, size)| {
        let max = size as u32 + 2;
        let offsets = prop_oneof![
            4 => prop::collection::btree_set(0..max, 0..(max as usize).min(8))
                .prop_map(|s| s.into_iter().collect::<Vec<_>>())
                .prop_shuffle(),
            1 => prop::collection::vec(0..max, 0..8),
        ];
        let fault = prop::collection::vec((0..64usize, 0..64usize), 0..4);
        (Just(start), Just(size), offsets, 0..size + 2, fault)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop::collection::vec(one_registration(), 1..2).prop_map(Op::Register),
        1 => prop::collection::vec(one_registration(), 2..12).prop_map(Op::Register),
        2 => prop::collection::vec(0..40usize, 1..4).prop_map(Op::Release),
        3 => (0..SPACE + 64, 0..64usize).prop_map(|(pc, addr)| Op::Lookup(pc, addr)),
    ]
}

struct ModelEntry {
    handle: TrapHandle,
    reg: (AddressRange, Vec<u32>, usize, Vec<AddressRange>),
}

fn model_lookup(model: &[ModelEntry], pc: usize, addr: Option<usize>) -> Option<TrapHit> {
    let e = model.iter().find(|e| e.reg.0.contains(pc))?;
    let (code, offsets, landing_pad, fault) = &e.reg;
    let offset = (pc - code.start()) as u32;
    let accepted = match addr {
        Some(a) => fault.is_empty() || fault.iter().any(|f| f.contains(a)),
        None => true,
    };
    (offsets.contains(&offset) && accepted).then_some(TrapHit {
        code: *code,
        landing_pad: *landing_pad,
        offset,
        vector: TrapVector::PageFault,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn model_register_release_lookup(ops in prop::collection::vec(op(), 1..80)) {
        let t = table();
        let mut model: Vec<ModelEntry> = Vec::new();
        let mut issued: Vec<TrapHandle> = Vec::new();
        for op in ops {
            match op {
                Op::Register(batch) => {
                    let ranges: Vec<Vec<AddressRange>> = batch
                        .iter()
                        .map(|g| g.4.iter().map(|&(a, b)| r(a, b)).collect())
                        .collect();
                    let regs: Vec<_> = batch.iter().zip(&ranges).map(|((start, size, offs, land, _), fault)| TrapRegistration {
                        code: r(*start, start + size),
                        protected: offs,
                        sites: &[],
                        landing_pad: start + land,
                        fault_ranges: fault,
                    }).collect();
                    // The expected outcome: the first invalid registration, else any overlap.
                    let expected = regs
                        .iter()
                        .map(|g| prepare(g).map(|_| ()))
                        .find(Result::is_err)
                        .unwrap_or(Ok(()));
                    let got = t.test_register_batch(&regs);
                    if expected.is_err() {
                        prop_assert_eq!(got.map(|_| ()), expected);
                    } else {
                        let clash = regs.iter().enumerate().any(|(i, a)| {
                            model.iter().any(|e| !e.reg.0.overlap(&a.code).is_empty())
                                || regs[..i].iter().any(|b| !b.code.overlap(&a.code).is_empty())
                        });
                        prop_assert_eq!(got.is_err(), clash, "{:?}", got);
                        if let Ok(handles) = got {
                            for (h, g) in handles.into_iter().zip(&regs) {
                                prop_assert!(!issued.contains(&h), "handle reused");
                                issued.push(h);
                                let mut offs = g.protected.to_vec();
                                offs.sort_unstable();
                                model.push(ModelEntry { handle: h, reg: (g.code, offs, g.landing_pad, g.fault_ranges.to_vec()) });
                            }
                        }
                    }
                }
                Op::Release(ns) => {
                    let never = TrapHandle { start: 0, serial: u64::MAX };
                    let handles: Vec<_> = ns.iter().map(|&n| issued.get(n).copied().unwrap_or(never)).collect();
                    let all_live = handles.iter().enumerate().all(|(i, h)| {
                        model.iter().any(|e| e.handle == *h) && !handles[..i].contains(h)
                    });
                    let got = t.release_batch(&handles);
                    prop_assert_eq!(got, if all_live { Ok(()) } else { Err(TrapError::UnknownHandle) });
                    if all_live {
                        model.retain(|e| !handles.contains(&e.handle));
                    }
                }
                Op::Lookup(pc, addr) => {
                    prop_assert_eq!(t.lookup(pc), model_lookup(&model, pc, None), "pc {}", pc);
                    prop_assert_eq!(t.lookup_fault(pc, addr), model_lookup(&model, pc, Some(addr)));
                }
            }
            prop_assert_eq!(t.len(), model.len());
        }
        for pc in 0..SPACE + 64 {
            prop_assert_eq!(t.lookup(pc), model_lookup(&model, pc, None), "pc {}", pc);
        }
    }
}
