//! The reference model of one module's books: which code is live, installed, targeted,
//! referenced and retired, updated the way the module promises to update its own.

use std::collections::BTreeMap;
use std::sync::Arc;

use codespace::code_object::{CodeKind, CodeObject};
use codespace::code_pointer_table::CodePointerTable;
use codespace::mmu::soft::SoftMmu;
use codespace::module::{CodeModule, NewCode};

/// Code the model knows, with the references it expects.
pub(super) struct Obj {
    pub(super) object: Arc<CodeObject>,
    pub(super) bytes: Vec<u8>,
    pub(super) protected: Vec<u32>,
    pub(super) landing_pad: Option<u32>,
    pub(super) module_ref: bool,
    /// References the run took with `inc_ref`.
    pub(super) holders: u32,
    pub(super) dying: bool,
}

impl Obj {
    pub(super) fn start(&self) -> usize {
        self.object.instruction_start()
    }

    pub(super) fn allocated(&self) -> usize {
        self.bytes.len().next_multiple_of(64)
    }
}

/// One module and the model of its books.
pub(super) struct Model {
    pub(super) module: CodeModule<SoftMmu>,
    pub(super) pointers: &'static CodePointerTable,
    pub(super) live: BTreeMap<usize, Obj>,
    pub(super) functions: Vec<Option<usize>>,
    pub(super) slots: Vec<Option<usize>>,
    /// Retired objects, and whether a grace period passed since (then the next reclaim frees).
    pub(super) retired: Vec<(Obj, bool)>,
    /// Some CPU may run slot bytes older than the books (a serialization round failed).
    pub(super) stale: bool,
}

impl Model {
    pub(super) fn installed(&self, start: usize) -> bool {
        self.functions.contains(&Some(start))
    }

    pub(super) fn targeted(&self, start: usize) -> bool {
        self.slots.contains(&Some(start))
    }

    /// The module's `retire_if_unreachable`.
    pub(super) fn retire_if_unreachable(&mut self, start: usize) -> bool {
        let unreachable = self
            .live
            .get(&start)
            .is_some_and(|o| !o.module_ref && o.dying)
            && !self.installed(start)
            && !self.targeted(start);
        if unreachable {
            let obj = self.live.remove(&start).unwrap();
            self.retired.push((obj, false));
        }
        unreachable
    }

    /// The module's `release_ref`.
    pub(super) fn release_ref(&mut self, start: usize) {
        let Some(o) = self.live.get_mut(&start) else {
            return;
        };
        if !std::mem::replace(&mut o.module_ref, false) {
            return;
        }
        if o.holders == 0 {
            o.dying = true;
        }
        if o.dying {
            self.retire_if_unreachable(start);
        }
    }

    /// The module's `set_slots` books: the slots move, then code no slot targets any more is
    /// retired if nothing else reaches it.
    pub(super) fn set_slots(&mut self, changes: &[(u32, usize)]) {
        let old: Vec<usize> = changes
            .iter()
            .filter_map(|&(i, t)| self.slots[i as usize].replace(t))
            .collect();
        for o in old {
            if !self.targeted(o) {
                self.retire_if_unreachable(o);
            }
        }
    }

    /// An add that installed `functions` (index, start) and `anonymous` code: slots first, then
    /// the books, releasing what the functions replace (as `add_batch` does).
    pub(super) fn installed_batch(&mut self, functions: &[(u32, Obj)], anonymous: Vec<Obj>) {
        let changes: Vec<(u32, usize)> = functions.iter().map(|(i, o)| (*i, o.start())).collect();
        self.set_slots(&changes);
        let mut replaced = Vec::new();
        for (i, o) in functions {
            if let Some(old) = self.functions[*i as usize].replace(o.start()) {
                replaced.push(old);
            }
        }
        for (_, o) in functions {
            self.live.insert(o.start(), clone_obj(o));
        }
        for o in anonymous {
            self.live.insert(o.start(), o);
        }
        for old in replaced {
            self.release_ref(old);
        }
    }

    /// A reclaim after the grace periods marked: frees what is due; returns how many.
    pub(super) fn free_due(&mut self, freed: &mut Vec<Arc<CodeObject>>) -> usize {
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(_, due)| *due);
        self.retired = waiting;
        freed.extend(due.iter().map(|(o, _)| Arc::clone(&o.object)));
        due.len()
    }
}

pub(super) fn clone_obj(o: &Obj) -> Obj {
    Obj {
        object: Arc::clone(&o.object),
        bytes: o.bytes.clone(),
        protected: o.protected.clone(),
        landing_pad: o.landing_pad,
        module_ref: o.module_ref,
        holders: o.holders,
        dying: o.dying,
    }
}

/// New code to add, and the model's record of it once added.
pub(super) struct Draft {
    pub(super) index: Option<u32>,
    pub(super) bytes: Vec<u8>,
    pub(super) protected: Vec<u32>,
    pub(super) landing_pad: Option<u32>,
}

impl Draft {
    pub(super) fn code(&self) -> NewCode<'_> {
        let mut c = match self.index {
            Some(i) => NewCode::function(i, &self.bytes),
            None => NewCode::new(CodeKind::Wrapper, &self.bytes),
        };
        c.protected = &self.protected;
        c.landing_pad = self.landing_pad;
        c
    }

    pub(super) fn obj(&self, object: Arc<CodeObject>) -> Obj {
        Obj {
            object,
            bytes: self.bytes.clone(),
            protected: self.protected.clone(),
            landing_pad: self.landing_pad,
            module_ref: true,
            holders: 0,
            dying: false,
        }
    }
}
