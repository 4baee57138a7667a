//! SMP smoke tests: every CPU online with its own index, work on other CPUs and its failure
//! reports, TLB shootdown against a real stale translation, core serialization, and concurrent
//! shootdowns with interrupts off.
//!
//! With one CPU the tests that need a second one check what they can (work runs in place) and
//! say so; `cargo test` runs this file with 1 and with 4 CPUs.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use codespace_kernel::cpu::percpu::MAX_CPUS;
use codespace_kernel::cpu::time::Deadline;
use codespace_kernel::memory::layout::{self, TrampolineStep};
use codespace_kernel::memory::{self, phys_to_virt, SCRATCH_BASE};
use codespace_kernel::println;
use codespace_kernel::smp::apic;
use codespace_kernel::smp::{self, WorkFailure};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Mapper, Page, PageTableFlags as F, PhysFrame, Size4KiB,
};
use x86_64::VirtAddr;

codespace_kernel::kernel_tests![
    every_cpu_is_online_with_a_distinct_index,
    run_on_runs_on_the_named_cpu,
    on_each_cpu_passes_each_cpu_its_index,
    panicking_work_is_reported_by_cpu_and_the_cpu_recovers,
    faulting_work_is_reported_by_cpu_and_the_cpu_recovers,
    one_failing_share_of_on_each_cpu_is_reported_alone,
    work_on_one_cpu_can_hand_work_to_another,
    hung_work_times_out_by_cpu_and_the_cpu_recovers,
    shootdown_removes_a_stale_translation_on_another_cpu,
    sync_cores_is_acknowledged_by_every_other_cpu,
    call_on_others_runs_once_on_each_other_cpu,
    large_shootdown_is_one_full_flush_per_cpu,
    concurrent_shootdowns_with_interrupts_off_do_not_deadlock,
    idle_hook_runs_on_every_idle_cpu,
    item_06_trampoline_is_never_writable_while_executable_on_another_cpu,
];

/// The highest CPU index: another CPU when there are several, the caller itself otherwise.
fn last_cpu() -> usize {
    smp::online_cpus() - 1
}

fn every_cpu_is_online_with_a_distinct_index() {
    assert_eq!(smp::current_cpu(), 0, "tests run on the boot CPU");
    assert_eq!(
        smp::online_cpus(),
        smp::max_cpus(),
        "a listed CPU did not come online"
    );
    static SEEN: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
    static APIC: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_CPUS];
    smp::on_each_cpu(|cpu| {
        assert_eq!(smp::current_cpu(), cpu);
        SEEN[smp::current_cpu()].fetch_add(1, Ordering::SeqCst);
        APIC[cpu].store(apic::id(), Ordering::SeqCst);
    })
    .unwrap();
    let n = smp::online_cpus();
    for (cpu, seen) in SEEN.iter().enumerate() {
        let expected = u32::from(cpu < n);
        assert_eq!(
            seen.load(Ordering::SeqCst),
            expected,
            "cpu {cpu} ran its share"
        );
    }
    let ids: alloc::vec::Vec<u32> = APIC[..n].iter().map(|a| a.load(Ordering::SeqCst)).collect();
    for (a, &id) in ids.iter().enumerate() {
        assert_eq!(id, smp::apic_id(a), "cpu {a}'s APIC ID");
        if let Some(b) = ids[..a].iter().position(|&other| other == id) {
            panic!("cpus {a} and {b} share APIC ID {id}");
        }
    }
    println!(
        "    {n} cpus, APIC IDs {:?}",
        (0..n).map(smp::apic_id).collect::<alloc::vec::Vec<_>>()
    );
}

fn run_on_runs_on_the_named_cpu() {
    for cpu in 0..smp::online_cpus() {
        let ran_on = AtomicUsize::new(usize::MAX);
        smp::run_on(cpu, || ran_on.store(smp::current_cpu(), Ordering::SeqCst)).unwrap();
        assert_eq!(ran_on.load(Ordering::SeqCst), cpu);
    }
    let err = smp::run_on(MAX_CPUS, || {}).expect_err("no such CPU");
    assert!(
        matches!(err.of(MAX_CPUS), Some(WorkFailure::Offline)),
        "{err}"
    );
}

fn on_each_cpu_passes_each_cpu_its_index() {
    let sum = AtomicUsize::new(0);
    smp::on_each_cpu(|cpu| {
        // Different work per CPU: each adds 1 << its index.
        sum.fetch_add(1 << cpu, Ordering::SeqCst);
    })
    .unwrap();
    assert_eq!(sum.load(Ordering::SeqCst), (1 << smp::online_cpus()) - 1);
}

fn panicking_work_is_reported_by_cpu_and_the_cpu_recovers() {
    let target = last_cpu();
    let err = smp::run_on(target, || panic!("deliberate panic in cross-CPU work"))
        .expect_err("the panic is reported");
    let text = format!("{err}");
    assert!(
        text.starts_with(&format!("cpu {target}: panicked at ")),
        "{text}"
    );
    assert!(
        text.contains("deliberate panic in cross-CPU work"),
        "{text}"
    );
    assert_eq!(err.failures.len(), 1);
    let ran = AtomicUsize::new(0);
    smp::run_on(target, || {
        ran.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "cpu {target} runs work again"
    );
}

fn faulting_work_is_reported_by_cpu_and_the_cpu_recovers() {
    let target = last_cpu();
    let addr = SCRATCH_BASE + 0x0777_0000;
    let err = smp::run_on(target, || {
        // SAFETY: deliberately reads an unmapped address; the work framework catches the fault.
        let _ = unsafe { core::ptr::read_volatile(addr as *const u64) };
    })
    .expect_err("the fault is reported");
    let text = format!("{err}");
    assert!(
        text.starts_with(&format!("cpu {target}: unexpected fault: #PF")),
        "{text}"
    );
    match err.of(target) {
        Some(WorkFailure::Faulted(info)) => assert_eq!(info.cr2, addr),
        _ => panic!("not a fault: {text}"),
    }
    smp::run_on(target, || {}).unwrap();
}

fn one_failing_share_of_on_each_cpu_is_reported_alone() {
    let target = last_cpu();
    let done = AtomicUsize::new(0);
    let err = smp::on_each_cpu(|cpu| {
        if cpu == target {
            panic!("share of cpu {cpu} fails");
        }
        done.fetch_add(1, Ordering::SeqCst);
    })
    .expect_err("one share failed");
    assert_eq!(err.failures.len(), 1, "{err}");
    assert_eq!(err.failures[0].cpu, target);
    assert!(format!("{err}").contains(&format!("share of cpu {target} fails")));
    assert_eq!(done.load(Ordering::SeqCst), smp::online_cpus() - 1);
}

fn work_on_one_cpu_can_hand_work_to_another() {
    let n = smp::online_cpus();
    if n < 2 {
        println!("    one CPU: no other CPU to hand work to");
        return;
    }
    // The boot CPU runs the tests, not an idle loop: work posted to it is refused, not lost.
    let refused = AtomicUsize::new(0);
    smp::run_on(1, || {
        let err = smp::run_on(0, || {}).expect_err("the boot CPU takes no posted work");
        assert!(matches!(err.of(0), Some(WorkFailure::Busy)), "{err}");
        refused.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    assert_eq!(refused.load(Ordering::SeqCst), 1);
    if n < 3 {
        return;
    }
    // CPU 1 owns work on CPU 2, whose failure comes back to CPU 1 by name.
    let ran_on = AtomicUsize::new(usize::MAX);
    smp::run_on(1, || {
        smp::run_on(2, || ran_on.store(smp::current_cpu(), Ordering::SeqCst)).unwrap();
        let err = smp::run_on(2, || panic!("nested failure")).expect_err("reported to cpu 1");
        assert!(format!("{err}").starts_with("cpu 2: panicked at "), "{err}");
    })
    .unwrap();
    assert_eq!(ran_on.load(Ordering::SeqCst), 2);
}

fn hung_work_times_out_by_cpu_and_the_cpu_recovers() {
    if smp::online_cpus() < 2 {
        println!("    one CPU: the caller cannot time itself out; nothing to check");
        return;
    }
    let target = last_cpu();
    // Interrupts off on the hung CPU for a while too: only the NMI reaches it, and it stops
    // the work only once interrupts are back on (interrupts-off code may hold codespace's locks
    // or run on the private poke address space; see `smp::work::stoppable`, issue 18 item 10).
    for interrupts_off in [false, true] {
        let err = smp::run_on_timeout(target, Duration::from_secs(1), || {
            if interrupts_off {
                x86_64::instructions::interrupts::without_interrupts(|| {
                    codespace_kernel::cpu::time::spin_for(Duration::from_millis(1500));
                });
            }
            loop {
                core::hint::spin_loop();
            }
        })
        .expect_err("the hung work times out");
        assert_eq!(
            format!("{err}"),
            format!("cpu {target}: timed out after 1 s")
        );
        let ran_on = AtomicUsize::new(usize::MAX);
        smp::run_on(target, || {
            ran_on.store(smp::current_cpu(), Ordering::SeqCst)
        })
        .unwrap();
        assert_eq!(
            ran_on.load(Ordering::SeqCst),
            target,
            "cpu {target} is usable again"
        );
    }
}

/// A scratch page of this file, mapped and remapped by the shootdown tests. Its page number's
/// low bits (0xc7) differ from those of the kernel image, boot stack and APIC pages, so QEMU's
/// direct-mapped software TLB does not evict its entry while the test runs.
const STALE_PAGE: u64 = SCRATCH_BASE + 0x010c_7000;

fn page(va: u64) -> Page<Size4KiB> {
    Page::containing_address(VirtAddr::new(va))
}

/// A fresh frame whose first word is `value`.
fn frame_holding(value: u64) -> PhysFrame {
    let frame = memory::frames().allocate_frame().expect("a frame");
    // SAFETY: the frame was just allocated; it is written through the direct map.
    unsafe {
        phys_to_virt(frame.start_address())
            .as_mut_ptr::<u64>()
            .write_volatile(value)
    };
    frame
}

/// Points `va` at `frame`, flushing only this CPU's TLB (no shootdown).
fn map_locally(va: u64, frame: PhysFrame) {
    let mut frames = memory::frames();
    let mut tables = memory::page_table();
    let _ = tables.unmap(page(va)).map(|(_, flush)| flush.flush());
    // SAFETY: `frame` is owned by the test and mapped nowhere else but the direct map.
    unsafe {
        tables
            .map_to(
                page(va),
                frame,
                F::PRESENT | F::WRITABLE | F::NO_EXECUTE,
                &mut *frames,
            )
            .expect("map the scratch page")
            .flush();
    }
}

fn read(va: u64) -> u64 {
    // SAFETY: the tests read only the mapped scratch page.
    unsafe { core::ptr::read_volatile(va as *const u64) }
}

/// Whether we run under KVM, where a vCPU's TLB may be flushed behind our back (VM exits).
fn under_kvm() -> bool {
    let leaf = core::arch::x86_64::__cpuid(0x4000_0000);
    leaf.ebx.to_le_bytes() == *b"KVMK"
}

/// Steps of the two-CPU protocol below; each side waits for the other's step.
struct Steps(AtomicU32);

impl Steps {
    fn set(&self, step: u32) {
        self.0.store(step, Ordering::SeqCst);
    }

    /// Waits (answering IPIs: interrupts stay on) until the other side reached `step`.
    fn wait(&self, step: u32) {
        let deadline = Deadline::after(Duration::from_secs(20));
        while self.0.load(Ordering::SeqCst) < step {
            assert!(
                !deadline.expired(),
                "the other CPU never reached step {step}"
            );
            core::hint::spin_loop();
        }
    }
}

/// CPU B caches a translation of the scratch page; CPU A (this one) remaps the page to another
/// frame flushing only its own TLB: B still reads the old frame (TCG keeps a TLB per vCPU, so
/// this shows the test can fail). After `shootdown` of the page B reads the new frame; after a
/// full shootdown following another remap, the third. B keeps running one work item throughout,
/// so nothing but the shootdown touches its TLB.
fn shootdown_removes_a_stale_translation_on_another_cpu() {
    if smp::online_cpus() < 2 {
        println!("    one CPU: no other TLB to shoot down");
        return;
    }
    let (a, b) = (smp::current_cpu(), last_cpu());
    let (old, new, third) = (frame_holding(1), frame_holding(2), frame_holding(3));
    map_locally(STALE_PAGE, old);
    let steps = Steps(AtomicU32::new(0));
    let seen: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
    smp::on_each_cpu(|cpu| {
        if cpu == b {
            seen[0].store(read(STALE_PAGE), Ordering::SeqCst); // caches the translation
            steps.set(1);
            steps.wait(2);
            seen[1].store(read(STALE_PAGE), Ordering::SeqCst); // before any shootdown
            steps.set(3);
            steps.wait(4);
            seen[2].store(read(STALE_PAGE), Ordering::SeqCst); // after the page shootdown
            steps.set(5);
            steps.wait(6);
            seen[3].store(read(STALE_PAGE), Ordering::SeqCst); // after the full shootdown
        } else if cpu == a {
            steps.wait(1);
            map_locally(STALE_PAGE, new);
            assert_eq!(read(STALE_PAGE), 2, "this CPU flushed its own entry");
            steps.set(2);
            steps.wait(3);
            smp::shootdown(&[STALE_PAGE as usize], false);
            steps.set(4);
            steps.wait(5);
            map_locally(STALE_PAGE, third);
            smp::shootdown(&[], true);
            steps.set(6);
        }
    })
    .unwrap();
    let seen = seen.map(|s| s.load(Ordering::SeqCst));
    println!("    cpu {b} read {seen:?} (cached, no shootdown, page shootdown, full shootdown)");
    assert_eq!(seen[0], 1, "cpu {b} read the first frame");
    if !under_kvm() {
        assert_eq!(
            seen[1], 1,
            "without a shootdown cpu {b} still sees the old frame (TCG)"
        );
    }
    assert_eq!(
        seen[2], 2,
        "after the page shootdown cpu {b} sees the new frame"
    );
    assert_eq!(
        seen[3], 3,
        "after the full shootdown cpu {b} sees the third frame"
    );

    let (frame, flush) = memory::page_table()
        .unmap(page(STALE_PAGE))
        .expect("mapped");
    flush.flush();
    smp::shootdown(&[STALE_PAGE as usize], false);
    assert_eq!(frame, third);
    for f in [old, new, third] {
        // SAFETY: none of the frames is mapped any more, on any CPU.
        unsafe { memory::frames().deallocate_frame(f) };
    }
}

fn sync_cores_is_acknowledged_by_every_other_cpu() {
    let before = smp::ipi_stats();
    smp::sync_cores();
    let delta = smp::ipi_stats() - before;
    for cpu in 0..smp::online_cpus() {
        let expected = u64::from(cpu != smp::current_cpu());
        assert_eq!(
            delta.cpu(cpu).serializations,
            expected,
            "cpu {cpu} serialized"
        );
    }
    assert_eq!(
        delta.cpu(0).sent,
        (smp::online_cpus() - 1) as u64,
        "one IPI per other CPU"
    );
}

fn call_on_others_runs_once_on_each_other_cpu() {
    static RAN: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
    smp::call_on_others(&|cpu| {
        assert_eq!(cpu, smp::current_cpu());
        RAN[cpu].fetch_add(1, Ordering::SeqCst);
    });
    for (cpu, ran) in RAN.iter().enumerate() {
        let expected = u32::from(cpu != 0 && cpu < smp::online_cpus());
        assert_eq!(ran.load(Ordering::SeqCst), expected, "cpu {cpu}");
    }
}

fn large_shootdown_is_one_full_flush_per_cpu() {
    let pages: alloc::vec::Vec<usize> = (0..33).map(|i| (STALE_PAGE + i * 4096) as usize).collect();
    let before = smp::ipi_stats();
    smp::shootdown(&pages, false);
    smp::shootdown(&pages[..32], false);
    let delta = smp::ipi_stats() - before;
    for cpu in 1..smp::online_cpus() {
        assert_eq!(
            delta.cpu(cpu).full_flushes,
            1,
            "cpu {cpu}: 33 pages become one full flush"
        );
        assert_eq!(
            delta.cpu(cpu).pages,
            32,
            "cpu {cpu}: 32 pages are invalidated one by one"
        );
    }
}

fn concurrent_shootdowns_with_interrupts_off_do_not_deadlock() {
    const ROUNDS: u64 = 500;
    let n = smp::online_cpus();
    // The APs shoot at each other while this CPU only waits: a deadlock among them is then
    // reported as a timeout instead of hanging the kernel. With two CPUs both must shoot.
    let shooters: u64 = if n >= 3 {
        ((1 << n) - 1) & !1
    } else {
        (1 << n) - 1
    };
    let before = smp::ipi_stats();
    smp::on_each_cpu_timeout(Duration::from_secs(30), |cpu| {
        if shooters & (1 << cpu) == 0 {
            return;
        }
        x86_64::instructions::interrupts::without_interrupts(|| {
            for _ in 0..ROUNDS {
                smp::shootdown(&[STALE_PAGE as usize], false);
            }
        });
    })
    .unwrap();
    let delta = smp::ipi_stats() - before;
    for cpu in 0..n {
        let others = u64::from((shooters & !(1 << cpu)).count_ones());
        assert_eq!(
            delta.cpu(cpu).pages,
            others * ROUNDS,
            "cpu {cpu} served every request"
        );
    }
}

fn idle_hook_runs_on_every_idle_cpu() {
    static CALLS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
    fn hook(cpu: usize) {
        CALLS[cpu].fetch_add(1, Ordering::SeqCst);
    }
    smp::set_idle_hook(Some(hook));
    let deadline = Deadline::after(Duration::from_secs(10));
    let all_called = || (1..smp::online_cpus()).all(|c| CALLS[c].load(Ordering::SeqCst) > 0);
    while !all_called() && !deadline.expired() {
        smp::sync_cores(); // wakes the idle CPUs, which then go round their loop
    }
    smp::set_idle_hook(None);
    for (cpu, calls) in CALLS.iter().enumerate().take(smp::online_cpus()).skip(1) {
        assert!(
            calls.load(Ordering::SeqCst) > 0,
            "cpu {cpu} never called the idle hook"
        );
    }
    let settled: [u64; MAX_CPUS] = core::array::from_fn(|c| CALLS[c].load(Ordering::SeqCst));
    smp::sync_cores();
    let n = smp::online_cpus();
    for (cpu, (calls, before)) in CALLS.iter().zip(settled).enumerate().take(n).skip(1) {
        // Removed: a wake-up no longer calls it (allow one call already under way).
        assert!(calls.load(Ordering::SeqCst) <= before + 1, "cpu {cpu}");
    }
}

/// Replays the trampoline's flip-back `steps`, starting from the executable state (identity R+X,
/// direct map read-only), and tracks every entry any CPU may still hold a translation of: the
/// boot CPU flushes its own at each write, the others keep what they had until a shootdown. The
/// first step at which some CPU may hold a writable translation of the frame while some CPU
/// holds an executable one is an error.
fn replay_flip_back(steps: &[TrampolineStep]) -> Result<(), alloc::string::String> {
    const P: u64 = F::PRESENT.bits();
    const W: u64 = F::WRITABLE.bits();
    const NX: u64 = F::NO_EXECUTE.bits();
    // Index 0: identity page, 1: direct-map page; the entries some CPU may hold.
    let mut held: [alloc::vec::Vec<u64>; 2] = [alloc::vec![P], alloc::vec![P | NX]];
    let mut current = [P, P | NX];
    for (i, step) in steps.iter().enumerate() {
        match *step {
            TrampolineStep::Entry { va, entry } => {
                let which = usize::from(va >= memory::PHYS_OFFSET);
                current[which] = entry;
                held[which].push(entry);
            }
            TrampolineStep::Shootdown => {
                for (h, &c) in held.iter_mut().zip(&current) {
                    *h = alloc::vec![c];
                }
            }
        }
        let all = || held.iter().flatten().copied().filter(|e| e & P != 0);
        let executable = all().any(|e| e & NX == 0);
        let writable = all().any(|e| e & W != 0);
        if executable && writable {
            return Err(format!(
                "after step {i} ({step:?}) one CPU may write the trampoline frame while another \
                 executes it: held {held:x?}"
            ));
        }
    }
    if current != [P | W | NX; 2] {
        return Err(format!("ends as {current:x?}, not RW+NX in both maps"));
    }
    Ok(())
}

/// Item 6 of issue 18: the trampoline page goes back to RW+NX not present → shootdown → final
/// entry, so no CPU ever holds its executable translation while another may write the frame. The
/// recorded flips of this boot are replayed; the old order (present entries changed in place,
/// then a shootdown) is rejected by the same replay.
fn item_06_trampoline_is_never_writable_while_executable_on_another_cpu() {
    const P: u64 = F::PRESENT.bits();
    const W: u64 = F::WRITABLE.bits();
    const NX: u64 = F::NO_EXECUTE.bits();
    let steps = layout::trampoline_steps();
    if smp::online_cpus() == 1 {
        assert!(steps.is_empty(), "no AP started, no flip: {steps:?}");
        println!("    one CPU: no trampoline flips; checking the replay on the old order only");
    } else {
        let (flip, back) = steps.split_at(2);
        let flip_entries: alloc::vec::Vec<(u64, u64)> = flip
            .iter()
            .map(|s| match s {
                TrampolineStep::Entry { va, entry } => (*va, *entry),
                TrampolineStep::Shootdown => panic!("no shootdown before APs run"),
            })
            .collect();
        // The alias is sealed (read-only) before the identity page becomes executable: the
        // frame is never writable through one page while executable through the other.
        // The identity page: the lower of the two addresses (the alias is `PHYS_OFFSET` above).
        let page = flip_entries.iter().map(|&(va, _)| va).min().unwrap_or(0);
        assert_eq!(
            flip_entries,
            [(memory::PHYS_OFFSET + page, P | NX), (page, P)],
            "executable flip, alias sealed first: {steps:?}"
        );
        replay_flip_back(back).unwrap_or_else(|e| panic!("{e}; steps {steps:?}"));
        println!("    flip-back of {} steps replayed", back.len());
    }
    let (identity, direct) = (0x8000, memory::PHYS_OFFSET + 0x8000);
    let old_order = [
        TrampolineStep::Entry {
            va: identity,
            entry: P | W | NX,
        },
        TrampolineStep::Entry {
            va: direct,
            entry: P | W | NX,
        },
        TrampolineStep::Shootdown,
    ];
    assert!(
        replay_flip_back(&old_order).is_err(),
        "the in-place flip-back is caught"
    );
}
