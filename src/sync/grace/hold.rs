//! [`GraceHold`]: a preempted task's claim on grace periods (RCU-Tasks style); the protocol is
//! in the parent module's docs ("Preemptive kernels").

use super::{GraceDomain, OFFLINE};
use crate::sync::atomic::{fence, Ordering};

/// Keeps grace periods open for a task that was switched out while it may hold something
/// (preempted inside generated code, or between a lookup and its last use).
///
/// Taken by the scheduler with [`GraceDomain::hold`] on the CPU the task ran on, *before* that
/// CPU reports its next quiescent state, and kept in the task (or by a task itself, with
/// preemption off, before a lookup whose result it keeps across possible preemption). No grace period that was open
/// when it was taken ends while it exists; dropping it releases it. Drop it once the task holds
/// nothing again: at its next voluntary switch outside generated code, when it is next switched
/// out outside generated code, or when it exits. A hold that is never dropped (leaked with
/// `mem::forget`, or kept by a task that never runs again) stops every later grace period: the
/// safe direction (memory stays allocated), never a use-after-free.
///
/// Not `Clone`: one hold, one release. `Send`: a task may resume, and drop its hold, on another
/// CPU.
#[must_use = "dropping a hold releases it at once; keep it in the task until it is quiescent"]
pub struct GraceHold<'d> {
    domain: &'d GraceDomain,
    /// The epoch held: the last one the task's CPU announced before the task picked anything up.
    epoch: u64,
}

impl core::fmt::Debug for GraceHold<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GraceHold")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl GraceDomain {
    /// Takes a hold for the task that CPU `cpu` is switching away from; see [`GraceHold`].
    ///
    /// Call it on `cpu`, after the task stopped running there and before `cpu` reports its next
    /// quiescent state (typically: in the scheduler, with interrupts off, right before the
    /// switch's [`quiescent`](Self::quiescent)). Taking a hold is always safe — it only delays
    /// grace periods; *omitting* it before reporting the CPU quiescent is what the `unsafe`
    /// contract of [`quiescent`](Self::quiescent) forbids. On a CPU that is offline or out of
    /// range (which must not have run anything this domain protects) the hold acts as if the
    /// CPU had announced the current epoch `g` just now: it keeps open every grace period of a
    /// ticket of `g` or later (a ticket of `g - 1` may end: an advancer that already checked
    /// the holds may be moving the epoch to `g + 1`, and no count can stop it).
    ///
    /// # Ordering
    /// The hold reads `a = announced[cpu]` and counts it in `holds[a % 2]` (`SeqCst`
    /// read-modify-write). Everything the task picked up on `cpu` it picked up after `cpu`'s
    /// announcement of `a` (every switch to it announces first). The CPU's next announcement
    /// follows the count in program order, so in the single `SeqCst` order an advancer that
    /// reads that announcement then reads the count: it cannot move the epoch past `a + 1` while
    /// the hold stands, exactly as if the CPU had not announced. One that read the older
    /// announcement `a` could move the epoch only to `a + 1`, which the hold allows. The drop's
    /// `SeqCst` decrement follows the task's last use in program order (on whichever CPU the
    /// task ran last), and the advancer that reads the count it left synchronizes with it, so
    /// that use happens-before any free the next advance allows.
    ///
    /// Without an announcement (offline or out of range) nothing stops the epoch between the
    /// read of `g = epoch` and the count in `holds[g % 2]`: had it moved on to `g + 1`, an
    /// advancer that checked before the count may move it to `g + 2`; had it reached `g + 2`,
    /// the count blocks only the step from `g + 3`. Either way grace periods open at the count
    /// could end. So the count is followed by a `SeqCst`
    /// re-read of the epoch: still `g` means the count precedes, in the single `SeqCst` order,
    /// the exchange that moves the epoch to `g + 1`, hence every advancer's load of `g + 1` and
    /// its (later, same thread) load of `holds[g % 2]`: the epoch stops at `g + 1`. Moved: the
    /// count is undone and the hold taken again (each retry needs another advance, which needs
    /// every online CPU to announce: it ends).
    pub fn hold(&self, cpu: usize) -> GraceHold<'_> {
        if let Some(a) = self.announced.get(cpu).map(|a| a.load(Ordering::SeqCst)) {
            if a != OFFLINE {
                self.holds[(a & 1) as usize].fetch_add(1, Ordering::SeqCst);
                return GraceHold {
                    domain: self,
                    epoch: a,
                };
            }
        }
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let count = &self.holds[(epoch & 1) as usize];
            count.fetch_add(1, Ordering::SeqCst);
            // Pairs with the fence in `try_advance` between its epoch and holds loads: the
            // store-then-load on both sides is ordered by fences, not left to the `SeqCst`
            // accesses alone (which the loom model treats as acquire/release).
            fence(Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return GraceHold {
                    domain: self,
                    epoch,
                };
            }
            count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Outstanding [`GraceHold`]s (diagnostics: a grace period that does not end may be waiting
    /// for a preempted task).
    #[must_use]
    pub fn holds(&self) -> u64 {
        self.holds[0].load(Ordering::SeqCst) + self.holds[1].load(Ordering::SeqCst)
    }
}

impl GraceHold<'_> {
    /// The epoch this hold keeps open (diagnostics).
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// One hold covering both: a task preempted again while it still has a hold (it went on
    /// running generated code, perhaps on another CPU) keeps the older one, which keeps at
    /// least as many grace periods open; the other is released.
    ///
    /// # Panics
    /// When the holds belong to different domains.
    pub fn merge(self, other: Self) -> Self {
        assert!(
            core::ptr::eq(self.domain, other.domain),
            "GraceHold::merge: holds of different grace domains"
        );
        if other.epoch < self.epoch {
            other
        } else {
            self
        }
    }
}

impl Drop for GraceHold<'_> {
    fn drop(&mut self) {
        // Release: the task's last use precedes this in program order (see `hold`).
        self.domain.holds[(self.epoch & 1) as usize].fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::grace::tests::{domain, rounds};

    #[test]
    fn item_03_a_hold_keeps_open_every_grace_period_that_was_open_when_it_was_taken() {
        let d = domain(2);
        rounds(&d, &[0, 1], 3);
        // A task on CPU 1 picks something up, the writer unlinks it, then the task is preempted.
        let t = d.defer();
        let hold = d.hold(1);
        rounds(&d, &[0, 1], 10);
        assert!(
            !d.is_over(t),
            "the preempted task still holds what was unlinked"
        );
        assert_eq!(d.holds(), 1);
        // A ticket taken after the hold: the task may hold that object too (it was picked up
        // before the hold, and unlinked after).
        let later = d.defer();
        rounds(&d, &[0, 1], 10);
        assert!(!d.is_over(later));
        drop(hold);
        assert_eq!(d.holds(), 0);
        rounds(&d, &[0, 1], 2);
        assert!(d.is_over(t));
        assert!(d.is_over(later));
    }

    #[test]
    fn without_the_hold_the_switch_report_ends_the_grace_period() {
        // The hazard a hold prevents: "today's rule" reports at every switch and nothing else.
        let d = domain(2);
        let t = d.defer();
        rounds(&d, &[0, 1], 2);
        assert!(
            d.is_over(t),
            "freed while the preempted task may still be inside"
        );
    }

    #[test]
    fn merging_keeps_the_older_hold_and_releases_the_other() {
        let d = domain(1);
        let old = d.hold(0);
        rounds(&d, &[0], 1);
        let newer = d.hold(0);
        assert!(newer.epoch() >= old.epoch());
        assert_eq!(d.holds(), 2);
        let kept = newer.merge(old);
        assert_eq!(d.holds(), 1);
        assert_eq!(kept.epoch(), 0);
        let t = d.defer();
        rounds(&d, &[0], 5);
        assert!(!d.is_over(t));
        drop(kept);
        rounds(&d, &[0], 2);
        assert!(d.is_over(t));
    }

    #[test]
    fn holds_of_both_parities_block_only_their_own_epochs() {
        let d = domain(1);
        // Epoch 4, CPU 0 announced 3.
        rounds(&d, &[0], 4);
        // SAFETY: CPU 0 holds nothing.
        unsafe { d.quiescent(0) };
        let h4 = d.hold(0);
        assert_eq!(h4.epoch(), 4);
        rounds(&d, &[0], 3);
        assert_eq!(
            d.epoch(),
            5,
            "a hold of 4 lets the epoch reach 5 and no further"
        );
        let h5 = d.hold(0);
        assert_eq!(h5.epoch(), 5);
        drop(h4);
        rounds(&d, &[0], 3);
        assert_eq!(d.epoch(), 6, "the hold of 5 stops at 6");
        drop(h5);
        rounds(&d, &[0], 3);
        assert_eq!(d.epoch(), 9);
    }

    #[test]
    fn holds_on_offline_or_unknown_cpus_keep_the_open_grace_periods() {
        let d = domain(1);
        rounds(&d, &[0], 2);
        let t = d.defer();
        let h = d.hold(7);
        let h2 = d.hold(usize::MAX);
        rounds(&d, &[0], 6);
        assert!(!d.is_over(t));
        drop((h, h2));
        rounds(&d, &[0], 2);
        assert!(d.is_over(t));
    }

    #[test]
    fn item_02_a_failing_context_check_refuses_the_report() {
        use core::sync::atomic::{AtomicBool, Ordering as O};
        static IN_HANDLER: AtomicBool = AtomicBool::new(false);
        fn task_context() -> bool {
            !IN_HANDLER.load(O::SeqCst)
        }
        let d = GraceDomain::new().with_context_check(task_context);
        // SAFETY: index 0 is the only CPU; it holds nothing.
        unsafe { d.set_possible_cpus(1) };
        let t = d.defer();
        IN_HANDLER.store(true, O::SeqCst);
        rounds(&d, &[0], 4);
        assert!(!d.is_over(t), "reports from a handler are not taken");
        assert_eq!(d.refused_reports(), 4);
        IN_HANDLER.store(false, O::SeqCst);
        rounds(&d, &[0], 2);
        assert!(d.is_over(t));
    }
}

/// Model check of the hold protocol: a task reads an object, is preempted (its CPU takes a hold
/// and reports quiescent, as a scheduler's switch does) and keeps using the object afterwards,
/// while a writer unlinks it, waits for the grace period and frees it. Run with
/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::super::GraceDomain;
    use crate::sync::atomic::{AtomicPtr, Ordering};
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use std::boxed::Box;

    struct Obj(UnsafeCell<u64>);

    #[test]
    fn loom_grace_hold_covers_a_preempted_task() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound.get_or_insert(3);
        builder.check(|| {
            let d: &'static GraceDomain = Box::leak(Box::new(GraceDomain::new()));
            // SAFETY: CPUs 0 and 1 are the model's threads.
            unsafe { d.set_possible_cpus(2) };
            let old = Box::into_raw(Box::new(Obj(UnsafeCell::new(1))));
            let root = Arc::new(AtomicPtr::new(old));
            let task = {
                let root = Arc::clone(&root);
                loom::thread::spawn(move || {
                    let p = root.load(Ordering::Acquire);
                    // SAFETY: `p` is live or in its grace period (what is checked).
                    let v = unsafe { (*p).0.with(|v| *v) };
                    assert!(v == 1 || v == 2, "read a freed object");
                    // Preempted: the scheduler holds for the task, then reports the switch.
                    let hold = d.hold(1);
                    // SAFETY: the switched-out task is covered by `hold`.
                    unsafe { d.quiescent(1) };
                    // Resumed (on this CPU or another): still using what it picked up.
                    // SAFETY: as above.
                    let v = unsafe { (*p).0.with(|v| *v) };
                    assert!(v == 1 || v == 2, "read a freed object after the switch");
                    drop(hold);
                    // SAFETY: the task holds nothing any more.
                    unsafe { d.cpu_offline(1) };
                })
            };
            let new = Box::into_raw(Box::new(Obj(UnsafeCell::new(2))));
            let unlinked = root.swap(new, Ordering::SeqCst);
            let ticket = d.defer();
            while !d.is_over(ticket) {
                // SAFETY: the writer holds nothing.
                unsafe { d.quiescent(0) };
                loom::thread::yield_now();
            }
            // SAFETY: grace period over; the poison write races with any reader loom sees.
            unsafe { (*unlinked).0.with_mut(|v| *v = 0) };
            task.join().unwrap();
            // SAFETY: all readers are done; both came from `Box::into_raw`.
            unsafe { drop(Box::from_raw(unlinked)) };
            // SAFETY: as above.
            drop(unsafe { Box::from_raw(root.load(Ordering::SeqCst)) });
        });
    }

    /// A hold taken for an offline CPU while another CPU keeps advancing the epoch: once taken,
    /// it keeps the epoch at or below its own plus one, and its epoch is not older than the
    /// one read before taking it.
    #[test]
    fn loom_offline_hold_stops_the_epoch_while_it_advances() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound.get_or_insert(3);
        builder.check(|| {
            let d: &'static GraceDomain = Box::leak(Box::new(GraceDomain::new()));
            // SAFETY: CPU 0 is the advancing thread; CPU 5 is offline.
            unsafe { d.set_possible_cpus(1) };
            let advancer = loom::thread::spawn(move || {
                for _ in 0..3 {
                    // SAFETY: the advancing thread holds nothing.
                    unsafe { d.quiescent(0) };
                    d.try_advance();
                }
            });
            let before = d.epoch();
            let hold = d.hold(5);
            assert!(hold.epoch() >= before, "the hold is older than its call");
            advancer.join().unwrap();
            assert!(
                d.epoch() <= hold.epoch() + 1,
                "the epoch passed the hold: epoch {}, hold {}",
                d.epoch(),
                hold.epoch()
            );
        });
    }
}
