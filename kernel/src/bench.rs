//! In-kernel benchmarks (`cargo run -- bench`): what codespace operations cost on real page
//! tables, measured with the TSC.
//!
//! The TSC is calibrated against PIT channel 2. Each figure is `REPS` timed repetitions after
//! `WARMUP` untimed ones; the median and the 99th percentile are printed in cycles and ns. Each
//! repetition is bracketed by `lfence; rdtsc` and `lfence; rdtsc; lfence`, so the timed work can
//! neither start before the first read nor finish after the second.

use alloc::vec::Vec;
use core::arch::x86_64::{__cpuid, _mm_lfence, _rdtsc};

use codespace::code_object::{CodeDesc, CodeKind, CodeObject};
use codespace::mmu::Mmu;
use codespace::module::{CodeModule, ModuleConfig, NewCode};
use codespace::{AddressRange, AllocatorConfig, CodeAllocator, ManagerConfig, ProtectionMode};
use x86_64::instructions::port::Port;
use x86_64::structures::paging::PageTableFlags as F;

use crate::code::{self, test_window, REGISTRIES};
use crate::qemu::ExitCode;
use crate::{memory, println};

const WARMUP: usize = 100;
const REPS: usize = 1000;

/// Time stamp, ordered after everything before it.
fn start() -> u64 {
    // SAFETY: lfence and rdtsc have no preconditions on x86-64.
    unsafe {
        _mm_lfence();
        _rdtsc()
    }
}

/// Time stamp, ordered after the timed work and before everything after it.
fn stop() -> u64 {
    // rdtscp is missing from QEMU's qemu64 model: lfence before and after rdtsc orders it the
    // same way (the timed work retires before the read, later work starts after it).
    // SAFETY: lfence and rdtsc have no preconditions on x86-64.
    unsafe {
        _mm_lfence();
        let t = _rdtsc();
        _mm_lfence();
        t
    }
}

/// TSC ticks per microsecond, measured over 20 ms of PIT channel 2.
fn calibrate() -> f64 {
    const PIT_HZ: u64 = 1_193_182;
    const LATCH: u16 = (PIT_HZ / 50) as u16; // 20 ms
                                             // SAFETY: ports 0x61 and 0x42/0x43 drive PIT channel 2, which nothing else uses.
    unsafe {
        let mut gate = Port::<u8>::new(0x61);
        let mut cmd = Port::<u8>::new(0x43);
        let mut ch2 = Port::<u8>::new(0x42);
        let g = gate.read();
        gate.write((g & !0x02) | 0x01);
        cmd.write(0xB0); // channel 2, lobyte/hibyte, mode 0
        ch2.write(LATCH as u8);
        ch2.write((LATCH >> 8) as u8);
        let t0 = start();
        while gate.read() & 0x20 == 0 {}
        let t1 = stop();
        gate.write(g);
        (t1 - t0) as f64 / 20_000.0
    }
}

/// "KVM", "TCG" or another hypervisor signature from CPUID 0x4000_0000; "bare metal" without.
fn hypervisor() -> &'static str {
    let leaf1 = __cpuid(1);
    if leaf1.ecx & (1 << 31) == 0 {
        return "bare metal";
    }
    let hv = __cpuid(0x4000_0000);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&hv.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
    sig[8..].copy_from_slice(&hv.edx.to_le_bytes());
    match &sig {
        b"KVMKVMKVM\0\0\0" => "KVM",
        b"TCGTCGTCGTCG" => "TCG",
        _ => "other hypervisor",
    }
}

struct Report {
    ticks_per_us: f64,
}

impl Report {
    /// Runs `rep` `WARMUP + REPS` times; each run returns the cycles of its timed part.
    fn measure(&self, name: &str, per: usize, mut rep: impl FnMut() -> u64) {
        let mut samples = Vec::with_capacity(REPS);
        for i in 0..WARMUP + REPS {
            let cycles = rep();
            if i >= WARMUP {
                samples.push(cycles);
            }
        }
        samples.sort_unstable();
        let median = samples[samples.len() / 2];
        let p99 = samples[samples.len() * 99 / 100];
        let ns = |c: u64| c as f64 * 1000.0 / self.ticks_per_us;
        let per_item = if per > 1 {
            alloc::format!("{:>9.0} ns/page", ns(median) / per as f64)
        } else {
            alloc::string::String::new()
        };
        println!(
            "  {name:<58} {median:>10} {p99:>10} {:>11.0} {:>11.0} {per_item}",
            ns(median),
            ns(p99)
        );
    }
}

/// A tiny xorshift generator: reproducible sizes and addresses without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs every benchmark and prints the table.
#[must_use]
pub fn run() -> ExitCode {
    let hv = hypervisor();
    let ticks = calibrate();
    println!("\ncodespace in-kernel benchmarks");
    println!("  running under: {hv}; TSC {ticks:.0} MHz (calibrated on PIT channel 2)");
    if hv == "TCG" {
        println!("  NOTE: TCG emulates the CPU: these figures are NOT representative of hardware.");
    }
    println!("  {REPS} repetitions after {WARMUP} warm-up runs each\n");
    println!(
        "  {:<58} {:>10} {:>10} {:>11} {:>11}",
        "operation", "median cyc", "p99 cyc", "median ns", "p99 ns"
    );
    let r = Report {
        ticks_per_us: ticks,
    };
    let manager = code::manager(
        test_window(100),
        ManagerConfig {
            protection: ProtectionMode::Alias,
            max_committed: 256 << 20,
            ..ManagerConfig::default()
        },
    )
    .expect("manager");
    let flushes_before = manager.with_mmu(|m| m.flush_stats());

    // Publish: copy-in, RW+NX -> R+X for every page, one TLB batch.
    let mut a = CodeAllocator::new(
        &manager,
        AllocatorConfig {
            initial_reservation: 8 << 20,
            ..AllocatorConfig::default()
        },
    )
    .expect("allocator");
    for pages in [1usize, 8, 32, 33, 64, 512] {
        r.measure(&alloc::format!("publish {pages} page(s)"), pages, || {
            let w = a.allocate(pages * 4096).expect("allocate");
            let t0 = start();
            let code = a.publish(w).expect("publish");
            let t1 = stop();
            a.free(code).expect("free");
            t1 - t0
        });
    }

    // Commit + decommit: frames from the allocator, mapped RW+NX, unmapped and returned.
    for pages in [1usize, 64] {
        r.measure(
            &alloc::format!("commit + decommit {pages} page(s)"),
            pages,
            || {
                let t0 = start();
                let w = a.allocate(pages * 4096).expect("allocate");
                a.discard(w).expect("discard");
                stop() - t0
            },
        );
    }
    drop(a);

    // Trap round trip and slot patch, through a module.
    let mut module = CodeModule::new(
        &manager,
        &REGISTRIES,
        ModuleConfig {
            functions: 2,
            ..ModuleConfig::default()
        },
    )
    .expect("module");
    let memory = crate::memory::SCRATCH_BASE + (3 << 30);
    // One RW+NX page; the page after it stays unmapped (the guard).
    crate::memory::map_fresh_page(memory, F::PRESENT | F::WRITABLE | F::NO_EXECUTE).expect("page");
    let mut load = [0xCCu8; 20];
    load[..2].copy_from_slice(&[0x48, 0xB8]);
    load[2..10].copy_from_slice(&memory.to_le_bytes());
    load[10..14].copy_from_slice(&[0x8B, 0x04, 0x38, 0xC3]); // mov eax, [rax + rdi]; ret
    load[14..18].copy_from_slice(&[0x4C, 0x89, 0xD0, 0xC3]); // landing: mov rax, r10; ret
    let load = module
        .add_code(&NewCode {
            protected: &[10],
            landing_pad: Some(14),
            ..NewCode::function(0, &load)
        })
        .expect("load");
    // SAFETY: published code with the C ABI: one u64 argument, u64 result.
    let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(load.instruction_start()) };
    r.measure("trap round trip (#PF -> landing pad -> caller)", 1, || {
        let t0 = start();
        let v = f(4096 + 8);
        let t1 = stop();
        assert_eq!(v, load.instruction_start() as u64 + 10);
        t1 - t0
    });
    r.measure("call of the same load, in bounds (baseline)", 1, || {
        let t0 = start();
        let v = f(8);
        let t1 = stop();
        core::hint::black_box(v);
        t1 - t0
    });
    let a_target = load.instruction_start();
    let b_target = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0x31, 0xC0, 0xC3]))
        .expect("b")
        .instruction_start();
    let mut flip = false;
    r.measure(
        "jump-slot patch, near (alias map+store+unmap+invlpg+cpuid)",
        1,
        || {
            flip = !flip;
            let target = if flip { b_target } else { a_target };
            let t0 = start();
            module.patch_slot(0, target).expect("patch");
            stop() - t0
        },
    );
    let slot = module
        .jump_tables()
        .next()
        .expect("table")
        .near_slot_addr(1)
        .expect("slot");
    let near = codespace::jump_table::near_slot(slot, a_target).expect("near");
    r.measure("one patch_u64 through the alias", 1, || {
        let t0 = start();
        manager.patch_u64(slot, near).expect("patch");
        stop() - t0
    });
    drop(module);

    // Allocate + free with 10^4 live objects of 64 B .. 4 KiB.
    let mut a = CodeAllocator::new(&manager, AllocatorConfig::default()).expect("allocator");
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let size = |rng: &mut XorShift| 64usize << (rng.next() % 7);
    let live: Vec<_> = (0..10_000)
        .map(|_| a.allocate(size(&mut rng)).expect("live"))
        .collect();
    r.measure("allocate + free, 64 B-4 KiB, 10^4 live objects", 1, || {
        let s = size(&mut rng);
        let t0 = start();
        let w = a.allocate(s).expect("allocate");
        a.discard(w).expect("discard");
        stop() - t0
    });
    for w in live {
        a.discard(w).expect("discard");
    }
    drop(a);

    // Lookups with 10^4 registered ranges.
    let base = 0xFFFF_D000_0000_0000usize;
    let offsets: Vec<u32> = (0..32).map(|k| k * 64).collect();
    let registrations: Vec<_> = (0..10_000usize)
        .map(|i| {
            let code = AddressRange::new(base + i * 4096, base + i * 4096 + 2048);
            codespace::trap::TrapRegistration {
                code,
                protected: &offsets,
                landing_pad: code.start(),
                fault_range: None,
            }
        })
        .collect();
    let handles = REGISTRIES
        .traps
        .register_batch(&registrations)
        .expect("register");
    r.measure("TrapTable::lookup, 10^4 ranges x 32 offsets", 1, || {
        let pc = base + (rng.next() as usize % 10_000) * 4096 + 64 * (rng.next() as usize % 32);
        let t0 = start();
        let hit = REGISTRIES.traps.lookup(pc);
        let t1 = stop();
        assert!(hit.is_some());
        t1 - t0
    });
    REGISTRIES.traps.release_batch(&handles).expect("release");
    // SAFETY: the benchmark holds nothing from a lookup and runs no generated code here.
    unsafe { code::quiescent() };
    let map = codespace::code_map::CodeMap::new(&code::GRACE);
    map.insert_batch((0..10_000usize).map(|i| {
        let code = AddressRange::new(base + i * 4096, base + i * 4096 + 2048);
        alloc::sync::Arc::new(
            CodeObject::new(&CodeDesc::new(CodeKind::Function, code)).expect("code"),
        )
    }))
    .expect("insert");
    r.measure(
        "lookup_code (CodeMap::lookup_with), 10^4 objects",
        1,
        || {
            let pc = base + (rng.next() as usize % 10_000) * 4096 + 100;
            let t0 = start();
            let hit = map.lookup_with(pc, CodeObject::instruction_start);
            let t1 = stop();
            assert!(hit.is_some());
            t1 - t0
        },
    );

    let flushes = manager.with_mmu(|m| m.flush_stats());
    println!(
        "\n  TLB invalidations issued: {} invlpg, {} full flushes; audit clean: {}",
        flushes.single_pages - flushes_before.single_pages,
        flushes.full - flushes_before.full,
        manager.audit().is_clean()
    );
    println!("  free frames: {}", memory::frames().free_frames());
    ExitCode::Success
}
