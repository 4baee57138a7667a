//! Trap-table lookup: `codespace::trap::TrapTable` against a V8-style linear scan.
//!
//! Each table holds `n` code ranges with 32 protected offsets each; lookups cycle through a
//! precomputed list of random (but fixed) protected PCs, so every lookup is a hit.
//!
//! PC → code lookup (`lookup_code`): a `CodeMap` of 10^5 code objects built with one
//! `insert_batch`, against a linear scan over `(start, end)` pairs (the worst case of a lookup
//! without an ordered map).

use std::hint::black_box;
use std::time::{Duration, Instant};

use std::sync::Arc;

use codespace::code_map::CodeMap;
use codespace::code_object::{CodeDesc, CodeKind, CodeObject};
use codespace::trap::TrapTable;
use codespace::AddressRange;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const OFFSETS_PER_RANGE: usize = 32;
const CODE_SIZE: usize = 0x1000;
/// Code ranges are `CODE_SIZE` bytes every `CODE_STRIDE` bytes from here.
const BASE: usize = 0x4000_0000;
const CODE_STRIDE: usize = 0x2000;
const PCS: usize = 1024;
const SIZES: [usize; 3] = [100, 1_000, 10_000];

/// Small deterministic generator so every run benchmarks the same table.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Spec {
    code: AddressRange,
    /// Distinct, unsorted.
    offsets: Vec<u32>,
    landing_pad: usize,
}

/// `n` code ranges in shuffled registration order, and `PCS` protected PCs to look up.
fn workload(n: usize) -> (Vec<Spec>, Vec<usize>) {
    let mut rng = Lcg(0x5eed ^ n as u64);
    let mut specs: Vec<Spec> = (0..n)
        .map(|i| {
            let start = BASE + i * CODE_STRIDE;
            let mut offsets = Vec::with_capacity(OFFSETS_PER_RANGE);
            while offsets.len() < OFFSETS_PER_RANGE {
                let o = rng.below(CODE_SIZE) as u32;
                if !offsets.contains(&o) {
                    offsets.push(o);
                }
            }
            Spec {
                code: AddressRange::from_start_size(start, CODE_SIZE).unwrap(),
                offsets,
                landing_pad: start + CODE_SIZE - 16,
            }
        })
        .collect();
    for i in (1..specs.len()).rev() {
        specs.swap(i, rng.below(i + 1));
    }
    let pcs = (0..PCS)
        .map(|_| {
            let s = &specs[rng.below(n)];
            s.code.start() + s.offsets[rng.below(OFFSETS_PER_RANGE)] as usize
        })
        .collect();
    (specs, pcs)
}

/// V8's trap handler baseline: scan every code object, then its protected instructions.
struct V8Entry {
    base: usize,
    size: usize,
    landing_pad: usize,
    offsets: Vec<u32>,
}

struct V8Table {
    entries: Vec<V8Entry>,
}

impl V8Table {
    fn lookup(&self, pc: usize) -> Option<usize> {
        for e in &self.entries {
            if pc >= e.base && pc < e.base + e.size {
                let offset = (pc - e.base) as u32;
                for &o in &e.offsets {
                    if o == offset {
                        return Some(e.landing_pad);
                    }
                }
            }
        }
        None
    }
}

fn build_codespace(specs: &[Spec]) -> TrapTable {
    let table = TrapTable::new();
    for s in specs {
        table.register(s.code, &s.offsets, s.landing_pad).unwrap();
    }
    table
}

fn build_v8(specs: &[Spec]) -> V8Table {
    V8Table {
        entries: specs
            .iter()
            .map(|s| V8Entry {
                base: s.code.start(),
                size: s.code.size(),
                landing_pad: s.landing_pad,
                offsets: s.offsets.clone(),
            })
            .collect(),
    }
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("trap_lookup");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for n in SIZES {
        let (specs, pcs) = workload(n);
        let t0 = Instant::now();
        let table = build_codespace(&specs);
        eprintln!(
            "built TrapTable of {n} ranges by repeated register in {:?}",
            t0.elapsed()
        );
        let v8 = build_v8(&specs);
        for &pc in &pcs {
            assert_eq!(table.lookup(pc).map(|h| h.landing_pad()), v8.lookup(pc));
            assert!(v8.lookup(pc).is_some());
        }

        group.bench_with_input(BenchmarkId::new("codespace", n), &pcs, |b, pcs| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % PCS;
                black_box(table.lookup(black_box(pcs[i])))
            });
        });
        group.bench_with_input(BenchmarkId::new("v8_linear_scan", n), &pcs, |b, pcs| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % PCS;
                black_box(v8.lookup(black_box(pcs[i])))
            });
        });
    }
    group.finish();
}

/// Register plus release of one more range in a full table: the O(n) snapshot rebuild.
fn register_release(c: &mut Criterion) {
    let mut group = c.benchmark_group("trap_register_release");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for n in SIZES {
        let (specs, _) = workload(n);
        let table = build_codespace(&specs);
        // In the middle of the address range, in a gap between two registered ranges.
        let code = AddressRange::from_start_size(BASE + n / 2 * CODE_STRIDE + CODE_SIZE, CODE_SIZE)
            .unwrap();
        let offsets = specs[0].offsets.clone();
        group.bench_function(BenchmarkId::new("codespace", n), |b| {
            b.iter(|| {
                let h = table.register(code, &offsets, 0).unwrap();
                table.release(h).unwrap();
            });
        });
    }
    group.finish();
}

const CODE_OBJECTS: usize = 100_000;
/// Instructions of each code object.
const OBJECT_SIZE: usize = 64;

/// `n` code objects of `OBJECT_SIZE` bytes, contiguous but for a random gap of 0 to 3 slots
/// before each, and `PCS` random (fixed) PCs inside them.
fn code_workload(n: usize) -> (Vec<AddressRange>, Vec<usize>) {
    let mut rng = Lcg(0xc0de ^ n as u64);
    let mut at = BASE;
    let ranges: Vec<AddressRange> = (0..n)
        .map(|_| {
            at += rng.below(4) * OBJECT_SIZE;
            let r = AddressRange::from_start_size(at, OBJECT_SIZE).unwrap();
            at += OBJECT_SIZE;
            r
        })
        .collect();
    let pcs = (0..PCS)
        .map(|_| ranges[rng.below(n)].start() + rng.below(OBJECT_SIZE))
        .collect();
    (ranges, pcs)
}

/// The baseline: first `(start, end)` pair holding `pc`, scanning from the front.
fn linear_lookup(ranges: &[(usize, usize)], pc: usize) -> Option<usize> {
    ranges.iter().position(|&(s, e)| pc >= s && pc < e)
}

fn lookup_code(c: &mut Criterion) {
    let n = CODE_OBJECTS;
    let (ranges, pcs) = code_workload(n);
    let objects: Vec<Arc<CodeObject>> = ranges
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let desc = CodeDesc {
                index: Some(i as u32),
                ..CodeDesc::new(CodeKind::Function, r)
            };
            Arc::new(CodeObject::new(&desc).unwrap())
        })
        .collect();
    // Batch order need not be address order.
    let mut rng = Lcg(0xba7c);
    let mut batch = objects.clone();
    for i in (1..batch.len()).rev() {
        batch.swap(i, rng.below(i + 1));
    }
    let t0 = Instant::now();
    let map = CodeMap::new();
    map.insert_batch(batch).unwrap();
    eprintln!(
        "built CodeMap of {n} objects with insert_batch in {:?}",
        t0.elapsed()
    );
    assert_eq!(map.len(), n);
    let pairs: Vec<(usize, usize)> = ranges.iter().map(|r| (r.start(), r.end())).collect();
    for &pc in &pcs {
        let found = map.lookup_with(pc, |c| c.index()).flatten();
        assert_eq!(found.map(|i| i as usize), linear_lookup(&pairs, pc));
        assert!(found.is_some());
    }

    let mut group = c.benchmark_group("lookup_code");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);
    group.bench_with_input(BenchmarkId::new("codespace", n), &pcs, |b, pcs| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % PCS;
            black_box(map.lookup_with(black_box(pcs[i]), |c| c.index()))
        });
    });
    group.bench_with_input(BenchmarkId::new("linear_scan", n), &pcs, |b, pcs| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % PCS;
            black_box(linear_lookup(&pairs, black_box(pcs[i])))
        });
    });
    group.finish();
}

criterion_group!(benches, lookup, register_release, lookup_code);
criterion_main!(benches);
