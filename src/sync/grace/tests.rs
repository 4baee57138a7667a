use super::*;

/// A domain of `cpus` CPUs (also for the tests of `hold`).
pub(super) fn domain(cpus: usize) -> GraceDomain {
    let d = GraceDomain::new();
    // SAFETY: the test's "CPUs" are the indices it reports for, nothing else reads.
    unsafe { d.set_possible_cpus(cpus) };
    d
}

/// Reports for `cpus` then polls, `rounds` times (also for the tests of `hold`).
pub(super) fn rounds(d: &GraceDomain, cpus: &[usize], rounds: usize) {
    for _ in 0..rounds {
        for &cpu in cpus {
            // SAFETY: test CPUs hold nothing.
            unsafe { d.quiescent(cpu) };
        }
        d.try_advance();
    }
}

#[test]
fn a_grace_period_needs_every_online_cpu_to_report_after_the_defer() {
    let d = domain(3);
    // Reports made before the defer do not count.
    rounds(&d, &[0, 1, 2], 3);
    let t = d.defer();
    assert!(!d.is_over(t), "nobody reported since");
    rounds(&d, &[0, 1], 5);
    assert!(!d.is_over(t), "CPU 2 has not reported since the defer");
    assert_eq!(d.waiting_for(), Some(2));
    rounds(&d, &[0, 1, 2], 2);
    assert!(d.is_over(t));
    assert!(d.is_over(t), "stays over");
}

#[test]
fn offline_cpus_do_not_hold_grace_periods_and_online_ones_rejoin() {
    let d = domain(2);
    let t = d.defer();
    // SAFETY: CPU 1 holds nothing and stays quiet until it comes back.
    unsafe { d.cpu_offline(1) };
    rounds(&d, &[0], 2);
    assert!(d.is_over(t));
    // SAFETY: the test's CPUs hold nothing of the domain's.
    unsafe {
        d.cpu_online(1);
        d.cpu_online(5);
    }
    let t2 = d.defer();
    rounds(&d, &[0], 4);
    assert!(!d.is_over(t2), "CPUs 1 and 5 are back and must report");
    rounds(&d, &[0, 1, 5], 2);
    assert!(d.is_over(t2));
    assert_eq!(
        d.waiting_for(),
        Some(0),
        "the next epoch waits for everyone again"
    );
}

#[test]
fn tickets_from_later_epochs_wait_longer() {
    let d = domain(1);
    let a = d.defer();
    rounds(&d, &[0], 1);
    let b = d.defer();
    assert!(b > a);
    rounds(&d, &[0], 1);
    assert!(d.is_over(a));
    assert!(!d.is_over(b));
    rounds(&d, &[0], 1);
    assert!(d.is_over(b));
}

#[test]
fn deferred_values_drop_only_after_their_grace_period() {
    use std::sync::Arc;
    let d = domain(2);
    let value = Arc::new(7);
    d.defer_drop(d.defer(), Box::new(Arc::clone(&value)));
    assert_eq!(d.deferred(), 1);
    rounds(&d, &[0], 3);
    assert_eq!(d.reclaim(), 0, "CPU 1 has not reported");
    assert_eq!(Arc::strong_count(&value), 2);
    rounds(&d, &[0, 1], 2);
    assert_eq!(d.reclaim(), 1);
    assert_eq!(Arc::strong_count(&value), 1, "dropped");
    assert_eq!(d.deferred(), 0);
}

/// Issue 18 item 9: the deferred list's lock is held with interrupts off, so a module
/// dropped from an interrupt handler (which defers its teardown here) can never find it
/// held by the code it interrupted on its own CPU. Every acquisition by `defer_drop` and
/// `reclaim` is counted while the lock is held, with the simulated interrupt flag.
#[test]
fn item_09_deferred_list_lock_is_held_with_interrupts_off() {
    use crate::sync::irq_lock::test_hook;
    let d = domain(1).with_interrupt_control(test_hook::SIM);
    test_hook::watch();
    for value in 0..3u32 {
        d.defer_drop(d.defer(), Box::new(value));
    }
    rounds(&d, &[0], 2);
    assert_eq!(d.reclaim(), 3);
    let (off, on) = test_hook::unwatch();
    assert_eq!(
        (off, on),
        (4, 0),
        "three pushes and one reclaim, none with interrupts on"
    );
    assert!(test_hook::enabled(), "interrupts are back on");
}

#[test]
fn out_of_range_cpus_are_ignored() {
    let d = domain(1);
    // SAFETY: an out-of-range index is ignored; nothing is announced.
    unsafe { d.cpu_online(MAX_CPUS) };
    // SAFETY: as above: out-of-range reports are ignored.
    unsafe {
        d.quiescent(MAX_CPUS + 7);
        d.cpu_offline(usize::MAX);
    }
    let t = d.defer();
    rounds(&d, &[0], 2);
    assert!(d.is_over(t));
}
