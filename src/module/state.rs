//! What a module keeps, under its lock.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use alloc::vec::Vec;

use super::config::{ModuleConfig, ModuleError};
use super::registries::Registries;
use crate::code_events::CodeEventListener;
use crate::code_object::{CodeKind, CodeObject};
use crate::code_pointer_table::{CodePointer, CodePointerTable};
use crate::jump_table::JumpTableLayout;
use crate::manager::{CodeAllocator, PublishedCode, WritableCode};
use crate::mmu::Mmu;
use crate::sync::grace::GraceTicket;
use crate::trap::TrapHandle;

/// Published code the module owns.
pub(super) struct Live {
    pub object: Arc<CodeObject>,
    pub code: PublishedCode,
    pub trap: Option<TrapHandle>,
    /// The code pointer of anonymous code (functions use their index's shared pointer).
    pub pointer: Option<CodePointer>,
    /// Whether the module still holds its reference (dropped on replacement or `free_code`).
    pub module_ref: bool,
}

/// The jump tables of one code space: their layout and the table object's start (its key in
/// `live`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Table {
    pub layout: JumpTableLayout,
    pub start: usize,
}

/// Code no slot or pointer reaches any more, waiting for CPUs that may still run it (or return
/// into it) to pass a quiescent state. It stays registered for traps and PC lookup meanwhile.
pub(super) struct Retired {
    pub live: Live,
    pub ticket: GraceTicket,
}

/// Code whose free could not start (its INT3 fill failed), to free again at the next reclaim.
pub(super) enum Unfreed {
    Published(PublishedCode),
    Writable(WritableCode),
}

/// A module's books. Invariants, kept by every operation under the module lock:
/// - `slots[i]` is what slot `i` of every table jumps to (`None`: the lazy slot or INT3), and
///   `targeted[s]` counts the slots whose target is `s`; a targeted start is in `live` or is a
///   registered external entry;
/// - a function's code pointer holds `slots[i]` (or the table's trap address);
/// - code leaves `live` only when nothing targets it, no function is installed there, and the
///   module and every holder dropped their references; it then waits in `retired` for a grace
///   period before its trap entry, PC-lookup entry and memory go.
pub(super) struct ModuleState<M: Mmu> {
    pub allocator: CodeAllocator<M>,
    pub registries: &'static Registries,
    pub config: ModuleConfig,
    pub listener: Option<&'static dyn CodeEventListener>,
    pub pointers: Option<&'static CodePointerTable>,
    pub tables: Vec<Table>,
    pub live: BTreeMap<usize, Live>,
    /// The code installed for each function index.
    pub functions: Vec<Option<usize>>,
    /// What each slot targets.
    pub slots: Vec<Option<usize>>,
    pub targeted: BTreeMap<usize, u32>,
    pub function_pointers: Vec<Option<CodePointer>>,
    /// Entries outside the module that slots may target (runtime stubs, kernel functions).
    pub externals: BTreeSet<usize>,
    pub retired: Vec<Retired>,
    /// Unreachable code whose free failed before it started, retried by `reclaim`.
    pub unfreed: Vec<Unfreed>,
    /// A slot change was stored but not every CPU serialized (`SyncFailed`): some may still
    /// jump to old targets, so nothing retired is freed before a serialization round succeeds.
    pub needs_sync: bool,
    /// Loaded images by the address of their first byte.
    pub images: BTreeMap<usize, super::image::Image>,
    /// Unpublished images waiting for a grace period, still registered.
    pub retired_images: Vec<super::image::RetiredImage>,
}

/// A vector of `n` `None`s, or a typed error instead of an out-of-memory abort.
pub(super) fn nones<T: Clone>(n: u32) -> Result<Vec<Option<T>>, ModuleError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n as usize)
        .map_err(|_| ModuleError::TooManyFunctions { functions: n })?;
    v.resize(n as usize, None);
    Ok(v)
}

impl<M: Mmu> ModuleState<M> {
    pub fn check_index(&self, index: u32) -> Result<usize, ModuleError> {
        if index < self.config.functions {
            Ok(index as usize)
        } else {
            Err(ModuleError::BadIndex { index })
        }
    }

    /// Whether `start` is live code a slot may target (not a jump table), or an external entry
    /// outside the module's code spaces (one registered elsewhere may lie in a space reserved
    /// since, where only the module's own live code is a target).
    pub fn is_target(&self, start: usize) -> bool {
        (self.externals.contains(&start) && self.allocator.space_of(start).is_none())
            || self
                .live
                .get(&start)
                .is_some_and(|l| l.object.kind() != CodeKind::JumpTable)
    }

    /// Whether live code at `start` is its function's installed code. Only function `i`'s own
    /// code (built with index `i`) is ever installed at `functions[i]`, so one look at that
    /// entry answers, not a scan of every function (a tier-up of k functions would be O(k·n)).
    pub fn is_installed(&self, start: usize) -> bool {
        self.live
            .get(&start)
            .and_then(|l| l.object.index())
            .is_some_and(|i| self.functions.get(i as usize) == Some(&Some(start)))
    }

    pub fn is_targeted(&self, start: usize) -> bool {
        self.targeted.get(&start).is_some_and(|&n| n > 0)
    }

    /// Records that one slot moved from `old` to `new` target; returns `old` when no slot
    /// targets it any more (the caller then retires it if nothing else reaches it).
    #[must_use = "code no slot targets any more may have to be retired"]
    pub fn retarget(&mut self, old: Option<usize>, new: Option<usize>) -> Option<usize> {
        if let Some(n) = new {
            *self.targeted.entry(n).or_insert(0) += 1;
        }
        let o = old?;
        let n = self.targeted.get_mut(&o)?;
        *n -= 1;
        if *n > 0 {
            return None;
        }
        self.targeted.remove(&o);
        Some(o)
    }

    /// Whether the module holds any handle of its code-pointer table.
    pub fn holds_pointers(&self) -> bool {
        self.function_pointers.iter().any(Option::is_some)
            || self.live.values().any(|l| l.pointer.is_some())
    }

    /// The table objects' handles, for patching.
    pub fn table_handles(&self) -> Vec<&PublishedCode> {
        self.tables
            .iter()
            .filter_map(|t| self.live.get(&t.start).map(|l| &l.code))
            .collect()
    }
}
