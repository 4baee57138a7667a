//! Host tests of the code pointer table: allocation, freeing after grace periods, errors,
//! interrupt control, concurrent readers and writers.

use super::*;
use alloc::format;
use alloc::string::ToString;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// A grace domain of one CPU (this thread), leaked: tables hold `&'static` domains.
fn grace() -> &'static GraceDomain {
    grace_of(1)
}

/// A grace domain of `cpus` CPUs (test threads reporting for indices `0..cpus`), leaked.
fn grace_of(cpus: usize) -> &'static GraceDomain {
    let d = Box::leak(Box::new(GraceDomain::new()));
    // SAFETY: the tests' "CPUs" are the threads reporting for these indices.
    unsafe { d.set_possible_cpus(cpus) };
    d
}

/// Ends every grace period begun so far on `d` (CPU 0 holds nothing between operations).
fn pass_grace(d: &GraceDomain) {
    for _ in 0..2 {
        // SAFETY: the test thread holds no handle it read across this point.
        unsafe { d.quiescent(0) };
        d.try_advance();
    }
}

/// The table under test: every entry it is given is a made-up address nothing calls.
fn table(capacity: usize) -> CodePointerTable {
    CodePointerTable::with_capacity(capacity, grace())
}

/// `allocate` for made-up entries (nothing calls through these tables).
fn alloc(t: &CodePointerTable, entry: usize) -> Result<CodePointer, CodePointerError> {
    // SAFETY: no code calls through the test tables; the entries are only read back.
    unsafe { t.allocate(entry) }
}

/// `update` for made-up entries (nothing calls through these tables).
fn set(t: &CodePointerTable, h: CodePointer, entry: usize) -> Result<(), CodePointerError> {
    // SAFETY: as `alloc`.
    unsafe { t.update(h, entry) }
}

/// `free` of the tests' own handles.
fn release(t: &CodePointerTable, h: CodePointer) -> Result<(), CodePointerError> {
    // SAFETY: the test owns every handle it frees and never calls through one.
    unsafe { t.free(h) }
}

#[test]
fn allocate_free_reuse_fifo_after_a_grace_period() {
    let t = table(4);
    assert_eq!(t.capacity(), 4);
    assert!(t.is_empty());
    let a = alloc(&t, 0xA000).unwrap();
    let b = alloc(&t, 0xB000).unwrap();
    let c = alloc(&t, 0xC000).unwrap();
    assert_eq!([a.index(), b.index(), c.index()], [0, 1, 2]);
    assert_eq!([t.get(a), t.get(b), t.get(c)], [0xA000, 0xB000, 0xC000]);
    assert_eq!(t.len(), 3);

    release(&t, b).unwrap();
    release(&t, a).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t.freed(), 2);
    assert!(!t.is_allocated(a) && !t.is_allocated(b) && t.is_allocated(c));
    assert_eq!(t.get(a), 0);
    assert_eq!(t.get(b), 0);
    // Within the grace period the never-used index 3 comes first, then nothing is left.
    let d = alloc(&t, 0xD1).unwrap();
    assert_eq!(d.index(), 3);
    assert_eq!(
        alloc(&t, 0xE1),
        Err(CodePointerError::AwaitingGracePeriod { waiting: 2 })
    );
    // After it, FIFO: b (freed first), then a.
    pass_grace(t.grace());
    assert_eq!(alloc(&t, 0xB1).unwrap(), b);
    assert_eq!(alloc(&t, 0xA1).unwrap(), a);
    assert_eq!([t.get(a), t.get(b), t.get(c)], [0xA1, 0xB1, 0xC000]);
    assert_eq!(t.len(), 4);
    assert_eq!(t.freed(), 0);
}

/// Issue 18 item 4: a freed handle is reset to the trap at once but handed out again only
/// after a grace period. A CPU that read the handle (from a function table) before the free
/// and calls through it afterwards finds the trap, never a new, unrelated function that took
/// the handle. Before the fix the next `allocate` returned the freed handle at once.
#[test]
fn item_04_a_freed_handle_is_reused_only_after_a_grace_period() {
    let d = grace_of(2);
    let t = CodePointerTable::with_capacity(2, d);
    let old = alloc(&t, 0xA000).unwrap();
    // CPU 1 reads the handle from a function table: it holds `old` until its next
    // quiescent state.
    let held = old;
    release(&t, old).unwrap();
    assert_eq!(t.get(held), 0, "reset to the trap at once");
    // A new, unrelated function (another signature) gets a handle: not the freed one.
    let other = alloc(&t, 0xB000).unwrap();
    assert_ne!(
        other, held,
        "a freed handle was handed out within its grace period"
    );
    assert_eq!(
        t.get(held),
        0,
        "CPU 1's call through its handle still traps"
    );
    assert_eq!(
        alloc(&t, 0xC000),
        Err(CodePointerError::AwaitingGracePeriod { waiting: 1 })
    );
    // CPU 0 alone passing quiescent states does not end the grace period.
    for _ in 0..3 {
        // SAFETY: CPU 0 (this thread) holds no handle.
        unsafe { d.quiescent(0) };
        d.try_advance();
    }
    assert!(alloc(&t, 0xC000).is_err(), "CPU 1 still holds the handle");
    // CPU 1 is done with the handle; after that grace period the handle is reused.
    for _ in 0..2 {
        for cpu in 0..2 {
            // SAFETY: neither CPU holds a handle read before the free any more.
            unsafe { d.quiescent(cpu) };
        }
        d.try_advance();
    }
    assert_eq!(alloc(&t, 0xC000).unwrap(), held);
    assert_eq!((t.get(held), t.get(other), t.len()), (0xC000, 0xB000, 2));
}

/// Issue 18 item 9: the table's lock is held with interrupts off, so a handler on this CPU
/// (a timer tick patching a module's slots, which updates its functions' entries) can never
/// find it held by the code it interrupted and spin forever. Every acquisition is counted
/// while the lock is held, with the simulated interrupt flag.
#[test]
fn item_09_code_pointer_table_lock_is_held_with_interrupts_off() {
    use crate::sync::irq_lock::test_hook;
    let t = table(4).with_interrupt_control(test_hook::SIM);
    test_hook::watch();
    let a = alloc(&t, 0xA000).unwrap();
    let b = t.allocate_trap().unwrap();
    set(&t, b, 0xB000).unwrap();
    release(&t, a).unwrap();
    assert!(t.is_allocated(b) && t.len() == 1 && t.freed() == 1);
    let (off, on) = test_hook::unwatch();
    assert_eq!(
        (off, on),
        (7, 0),
        "every acquisition with interrupts off, none with them on"
    );
    assert!(test_hook::enabled(), "interrupts are back on");
    assert_eq!(t.get(b), 0xB000);
}

#[test]
fn double_free_and_bad_handles() {
    let t = table(2);
    let a = alloc(&t, 0x1000).unwrap();
    release(&t, a).unwrap();
    assert_eq!(release(&t, a), Err(CodePointerError::NotAllocated(a)));
    assert_eq!(set(&t, a, 0x2000), Err(CodePointerError::NotAllocated(a)));
    assert_eq!(t.get(a), 0);
    let never = CodePointer::from_index(1);
    assert_eq!(
        release(&t, never),
        Err(CodePointerError::NotAllocated(never))
    );
    let out = CodePointer::from_index(2);
    assert_eq!(release(&t, out), Err(CodePointerError::OutOfRange(out)));
    assert_eq!(set(&t, out, 1), Err(CodePointerError::OutOfRange(out)));
    assert_eq!(t.get(out), 0);
    assert_eq!(t.get(CodePointer::from_index(u32::MAX)), 0);
    assert_eq!(t.entry_address(out), None);
    assert!(!t.is_allocated(out));
    assert_eq!(t.len(), 0);
    // The double free did not push `a` twice: two allocations give two distinct handles.
    pass_grace(t.grace());
    let x = alloc(&t, 1).unwrap();
    let y = alloc(&t, 2).unwrap();
    assert_ne!(x, y);
    assert!(alloc(&t, 3).is_err());
    assert!(!CodePointerError::NotAllocated(a).to_string().is_empty());
}

#[test]
fn capacity_exhausted_changes_nothing() {
    let t = table(3);
    let hs: Vec<_> = (0..3)
        .map(|i| alloc(&t, 0x100 * (i + 1)).unwrap())
        .collect();
    let err = alloc(&t, 0xDEAD);
    assert_eq!(
        err,
        Err(CodePointerError::CapacityExhausted { capacity: 3 })
    );
    assert_eq!(t.len(), 3);
    for (i, &h) in hs.iter().enumerate() {
        assert_eq!(t.get(h), 0x100 * (i + 1));
    }
    release(&t, hs[1]).unwrap();
    assert_eq!(
        alloc(&t, 0xEE),
        Err(CodePointerError::AwaitingGracePeriod { waiting: 1 })
    );
    assert_eq!(t.len(), 2);
    pass_grace(t.grace());
    assert_eq!(alloc(&t, 0xEE).unwrap(), hs[1]);

    let empty = table(0);
    assert_eq!(
        alloc(&empty, 1),
        Err(CodePointerError::CapacityExhausted { capacity: 0 })
    );
    assert_eq!(empty.len(), 0);
    assert_eq!(empty.get(CodePointer::from_index(0)), 0);
}

#[test]
fn freed_entries_hold_trap_address() {
    let trap = 0xFFFF_FFFF_8000_DEAD;
    // SAFETY: nothing calls through the table, so the trap address is never run.
    let t = unsafe { CodePointerTable::with_capacity_and_trap(8, grace(), trap) };
    assert_eq!(t.trap_address(), trap);
    assert_eq!(t.get(CodePointer::from_index(5)), trap); // never allocated
    let h = alloc(&t, 0x1234).unwrap();
    set(&t, h, 0x5678).unwrap();
    assert_eq!(t.get(h), 0x5678);
    release(&t, h).unwrap();
    assert_eq!(t.get(h), trap);
    assert_eq!(t.get(CodePointer::from_index(8)), trap); // out of range
}

#[test]
fn entry_addresses_match_generated_code_view() {
    let t = table(16);
    let hs: Vec<_> = (0..16).map(|i| alloc(&t, 0x4000 + i).unwrap()).collect();
    assert_eq!(t.base_address() % ENTRY_SIZE, 0);
    for &h in &hs {
        let addr = t.entry_address(h).unwrap();
        assert_eq!(addr, t.base_address() + h.index() as usize * 8);
        assert_eq!(addr, t.base_address() + h.offset());
        // SAFETY: `addr` is the address of an `AtomicUsize` entry owned by `t`, which is alive.
        let loaded = unsafe { (*(addr as *const AtomicUsize)).load(Ordering::Acquire) };
        assert_eq!(loaded, t.get(h));
    }
    let dbg = format!("{t:?}");
    assert!(
        dbg.contains("capacity: 16") && dbg.contains("len: 16"),
        "{dbg}"
    );
}

#[test]
fn concurrent_readers_see_old_or_new_entry() {
    const A: usize = 0xFFFF_C000_0000_1000;
    const B: usize = 0x0000_7FFF_FFFF_F000;
    let t = Arc::new(table(4));
    let _pad = alloc(&t, 1).unwrap();
    let h = alloc(&t, A).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let t = Arc::clone(&t);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let (mut reads, mut bad, mut seen_a, mut seen_b) = (0u64, 0u64, false, false);
                loop {
                    match t.get(h) {
                        A => seen_a = true,
                        B => seen_b = true,
                        _ => bad += 1,
                    }
                    reads += 1;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                (reads, bad, seen_a, seen_b)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_millis(200);
    let mut updates = 0u32;
    while updates < 100_000 && Instant::now() < deadline {
        set(&t, h, if updates.is_multiple_of(2) { B } else { A }).unwrap();
        updates += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for r in readers {
        let (reads, bad, seen_a, seen_b) = r.join().unwrap();
        assert_eq!(bad, 0, "a reader saw a value that was never stored");
        assert!(seen_a || seen_b);
        total += reads;
    }
    assert!(total > 0 && updates > 0);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn concurrent_allocate_free_gives_distinct_handles() {
    let t = Arc::new(CodePointerTable::with_capacity(64, grace_of(2)));
    let workers: Vec<_> = (0..2usize)
        .map(|w| {
            let t = Arc::clone(&t);
            thread::spawn(move || {
                // Worker `w` is CPU `w`: it reports a quiescent state whenever it waits, so
                // freed handles come back after both workers did.
                let quiescent = || {
                    // SAFETY: the worker never calls through a handle.
                    unsafe { t.grace().quiescent(w) };
                    t.grace().try_advance();
                };
                for round in 0..500usize {
                    let mine: Vec<_> = (0..16)
                        .map(|k| loop {
                            match alloc(&t, w << 32 | round << 8 | k) {
                                Ok(h) => break (h, k),
                                Err(CodePointerError::AwaitingGracePeriod { .. }) => {
                                    quiescent();
                                    thread::yield_now();
                                }
                                Err(e) => panic!("{e}"),
                            }
                        })
                        .collect();
                    for &(h, k) in &mine {
                        assert_eq!(t.get(h), w << 32 | round << 8 | k);
                    }
                    for (h, _) in mine {
                        release(&t, h).unwrap();
                    }
                    quiescent();
                }
                // The other worker may still wait for this CPU's reports.
                // SAFETY: this worker is done with the table.
                unsafe { t.grace().cpu_offline(w) };
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(t.len(), 0);
}
