//! One module used from every CPU at once through its `&self` API: each CPU owns four function
//! indices and, in a loop, replaces its functions (`add_code`, `add_code_batch`), points a slot
//! at a fresh wrapper (`patch_slot`), checks `free_code` refuses targeted and installed code,
//! points the slot back and frees the wrapper — and calls the other CPUs' slots meanwhile.
//! Wrappers loop for a while before they return, so other CPUs are often inside a wrapper its
//! owner is freeing: it must stay until they passed a quiescent state.
//!
//! Afterwards the books must add up: audit clean, every function callable through its slot and
//! returning what its owner installed last, one live object per function (plus the tables),
//! nothing retired, allocated bytes and PC-lookup entries to match.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use codespace::code_object::CodeKind;
use codespace::module::{CodeModule, ModuleConfig, ModuleError, NewCode};

use super::common::{self, call0, quiescent, ret_const, settle};
use super::replace::long_running;
use crate::code::{self, REGISTRIES};
use crate::smp;

/// Functions each CPU owns.
const PER_CPU: u32 = 4;

/// The value CPU `cpu` installs in iteration `k` (`wrapper`: for a wrapper).
fn tag(cpu: usize, k: u32, wrapper: bool) -> u32 {
    0x4000_0000 | (u32::from(wrapper) << 29) | ((cpu as u32) << 20) | (k & 0xF_FFFF)
}

/// The CPU that installed `value`.
fn owner(value: u64) -> usize {
    ((value >> 20) & 0x1FF) as usize
}

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApiStats {
    /// Objects added (functions and wrappers, all CPUs).
    pub added: u64,
    /// `patch_slot` calls.
    pub patches: u64,
    /// `free_code` calls that freed.
    pub freed: u64,
    /// Calls of other CPUs' slots.
    pub cross_calls: u64,
}

/// `iterations` rounds per CPU on code-window slice `window`; wrappers loop `spin` times.
///
/// # Panics
/// On an API error, a wrong result or books that do not add up, naming the CPU.
pub fn run(window: usize, iterations: u32, spin: u32) -> ApiStats {
    let mgr = common::manager(window);
    let n = smp::online_cpus();
    let functions = PER_CPU * n as u32;
    let m = CodeModule::new(
        &mgr,
        &REGISTRIES,
        code::module_config(
            &mgr,
            ModuleConfig {
                functions,
                ..ModuleConfig::default()
            },
        ),
    )
    .expect("module");
    code::assert_rox_in_use(&mgr);
    let table = m.jump_tables().expect("tables")[0];
    let allocated_before = m.stats().expect("stats").allocated;
    let map_before = REGISTRIES.code.len();
    let expected: Vec<AtomicU32> = (0..functions).map(|_| AtomicU32::new(0)).collect();
    let wrapper_inside = AtomicU64::new(0);
    let added = AtomicU64::new(0);
    let patches = AtomicU64::new(0);
    let freed = AtomicU64::new(0);
    let cross = AtomicU64::new(0);
    let slot = |i: u32| table.near_slot_addr(i).expect("slot");
    let installed = common::Phase::new();

    common::on_each_cpu(|cpu| {
        let own = |k: u32| cpu as u32 * PER_CPU + k % PER_CPU;
        let install = |i: u32, value: u32| {
            m.add_code(&NewCode::function(i, &ret_const(value)))
                .unwrap_or_else(|e| panic!("cpu {cpu}: add_code for function {i}: {e}"));
            common::settle_slot(&m, i);
            expected[i as usize].store(value, Ordering::SeqCst);
            added.fetch_add(1, Ordering::Relaxed);
        };
        for k in 0..PER_CPU {
            install(own(k), tag(cpu, k, false));
        }
        // Every function exists before anyone calls another CPU's slot.
        installed.arrive();
        installed.wait(n as u32);
        for k in PER_CPU..PER_CPU + iterations {
            // SAFETY: between operations this CPU runs no generated code and holds no lookup.
            unsafe { quiescent() };
            let i = own(k);
            match k % 3 {
                0 => install(i, tag(cpu, k, false)),
                1 => {
                    let value = tag(cpu, k, true);
                    let code = long_running(&wrapper_inside, spin, value);
                    let w = m
                        .add_code(&NewCode::new(CodeKind::Wrapper, &code))
                        .unwrap_or_else(|e| panic!("cpu {cpu}: add wrapper: {e}"))
                        .instruction_start();
                    added.fetch_add(1, Ordering::Relaxed);
                    m.patch_slot(i, w).expect("patch to the wrapper");
                    common::settle_slot(&m, i);
                    assert_eq!(
                        call0(slot(i)) as u32,
                        value,
                        "cpu {cpu}: slot {i} -> wrapper"
                    );
                    assert_eq!(
                        m.free_code(w),
                        Err(ModuleError::StillTargeted { start: w }),
                        "cpu {cpu}: a targeted wrapper is not freed"
                    );
                    let f = m.function_code(i).expect("books").expect("installed");
                    assert_eq!(
                        m.free_code(f),
                        Err(ModuleError::StillInstalled { start: f }),
                        "cpu {cpu}: an installed function is not freed"
                    );
                    m.patch_slot(i, f).expect("patch back");
                    common::settle_slot(&m, i);
                    m.free_code(w)
                        .unwrap_or_else(|e| panic!("cpu {cpu}: free the wrapper: {e}"));
                    patches.fetch_add(2, Ordering::Relaxed);
                    freed.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    let (a, b) = (tag(cpu, k, false), tag(cpu, k + 1, false));
                    let (ba, bb) = (ret_const(a), ret_const(b));
                    let j = own(k + 1);
                    m.add_code_batch(&[NewCode::function(i, &ba), NewCode::function(j, &bb)])
                        .unwrap_or_else(|e| panic!("cpu {cpu}: add_code_batch: {e}"));
                    common::settle_slot(&m, i);
                    common::settle_slot(&m, j);
                    expected[i as usize].store(a, Ordering::SeqCst);
                    expected[j as usize].store(b, Ordering::SeqCst);
                    added.fetch_add(2, Ordering::Relaxed);
                }
            }
            assert_eq!(
                call0(slot(i)) as u32,
                expected[i as usize].load(Ordering::SeqCst),
                "cpu {cpu}: its slot {i} after iteration {k}"
            );
            // Other CPUs' slots: whatever their owners installed (a function or a wrapper).
            for step in 1..=2 {
                let other = (i + step * PER_CPU + k) % functions;
                let v = call0(slot(other));
                assert_eq!(
                    owner(v),
                    (other / PER_CPU) as usize,
                    "cpu {cpu}: slot {other} returned {v:#x}"
                );
                cross.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    // SAFETY: the driver runs no generated code and holds no lookup; the others are idle.
    unsafe { crate::code::synchronize() };
    m.reclaim().expect("reclaim");
    for i in 0..functions {
        let want = expected[i as usize].load(Ordering::SeqCst);
        assert_eq!(call0(slot(i)) as u32, want, "function {i} callable");
        let code = m.function_code(i).expect("books");
        assert_eq!(code, m.slot_target(i).expect("books"), "slot {i} books");
    }
    let tables = m.jump_tables().expect("tables").len();
    let (live, retired) = m.code_count().expect("counts");
    assert_eq!(
        (live, retired),
        (tables + functions as usize, 0),
        "one object per function plus the tables, nothing retired"
    );
    assert_eq!(
        m.stats().expect("stats").allocated,
        allocated_before + functions as usize * codespace::manager::CODE_ALIGNMENT,
        "allocated bytes: the tables and one function each"
    );
    assert_eq!(REGISTRIES.code.len(), map_before + functions as usize);
    let audit = mgr.audit().expect("audit");
    assert!(audit.is_clean(), "{audit:?}");
    assert_eq!(wrapper_inside.load(Ordering::SeqCst), 0);
    let stats = ApiStats {
        added: added.load(Ordering::SeqCst),
        patches: patches.load(Ordering::SeqCst),
        freed: freed.load(Ordering::SeqCst),
        cross_calls: cross.load(Ordering::SeqCst),
    };
    drop(m);
    settle(&mgr);
    stats
}
