//! The kernel-wide code mode: 4 KiB code pages (the default) or 2 MiB ROX code pages (issue
//! 20, Linux's execmem ROX cache).
//!
//! Every manager, module and allocator this kernel makes takes its settings through
//! [`manager_config`], [`module_config`] and [`allocator_config`], so one switch — the kernel
//! command-line word `rox`, read by the test framework, or [`set_rox`] from a test — runs the
//! whole kernel suite on ROX code pages without a copy of any test.

use core::sync::atomic::{AtomicBool, Ordering};

use codespace::mmu::Mmu;
use codespace::module::ModuleConfig;
use codespace::{AllocatorConfig, CodeManager, ManagerConfig, ProtectionMode};

/// Whether new managers enable the ROX mode and new modules and allocators ask for it.
static ROX: AtomicBool = AtomicBool::new(false);

/// Puts the code that follows on 2 MiB ROX pages (`true`) or 4 KiB pages (`false`). Managers,
/// modules and allocators made before keep the mode they were made in.
pub fn set_rox(on: bool) {
    ROX.store(on, Ordering::SeqCst);
}

/// Whether the kernel runs in the ROX mode now.
#[must_use]
pub fn rox() -> bool {
    ROX.load(Ordering::SeqCst)
}

/// `config` in the kernel's code mode: in the ROX mode `rox_code` is set — unless `config`
/// asks for [`ProtectionMode::Flip`], which the crate refuses with ROX (a ROX page is never
/// made writable): such a manager stays on 4 KiB pages, and so do its modules and allocators
/// ([`module_config`], [`allocator_config`] look at the manager). Outside the ROX mode
/// `config` is returned as it is (a test that enables `rox_code` itself keeps it).
#[must_use]
pub fn manager_config(config: ManagerConfig) -> ManagerConfig {
    if rox() && config.protection != ProtectionMode::Flip {
        ManagerConfig {
            rox_code: true,
            ..config
        }
    } else {
        config
    }
}

/// `config` for a module on `manager`, in the kernel's code mode: asks for ROX code spaces
/// when the mode is on and `manager` allows them (`rox_code`; a flip-mode manager does not).
#[must_use]
pub fn module_config<M: Mmu>(manager: &CodeManager<M>, config: ModuleConfig) -> ModuleConfig {
    ModuleConfig {
        rox: config.rox || wants_rox(manager),
        ..config
    }
}

/// `config` for an allocator on `manager`, in the kernel's code mode (as [`module_config`]).
#[must_use]
pub fn allocator_config<M: Mmu>(
    manager: &CodeManager<M>,
    config: AllocatorConfig,
) -> AllocatorConfig {
    AllocatorConfig {
        rox: config.rox || wants_rox(manager),
        ..config
    }
}

/// In the ROX mode, checks that `manager`'s code really is on 2 MiB ROX pages: a live ROX
/// space, a 2 MiB page, no fallback to 4 KiB pages (a test that silently ran on 4 KiB pages
/// would prove nothing about the mode). Call it while the code is live.
///
/// # Panics
/// When the kernel runs in the ROX mode and `manager` has no live ROX space, or one fell back.
pub fn assert_rox_in_use<M: Mmu>(manager: &CodeManager<M>) {
    if rox() {
        let stats = manager.stats();
        assert!(
            stats.rox_spaces > 0 && stats.huge_pages > 0 && stats.rox_fallbacks == 0,
            "the test claims the ROX mode but its code is not on ROX pages: {stats:?}"
        );
    }
}

/// Whether code on `manager` goes on ROX pages: the mode is on and `manager` can give ROX
/// spaces (for settings that are not a [`ModuleConfig`], e.g. a Cranelift module builder's).
#[must_use]
pub fn wants_rox<M: Mmu>(manager: &CodeManager<M>) -> bool {
    rox() && manager.config().rox_code
}
