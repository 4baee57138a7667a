//! Handles and allocators coming and going in the allocator run: handles tried on allocators
//! that do not own them, leaked handles, drains (all of an allocator's code freed), and
//! allocators dropped and made again.

use codespace::{AddressRange, CodeAllocator, CodeError, FreeError, WritableCode};

use super::{Module, Run, Stale};
use crate::common::*;

impl Run<'_> {
    /// Hands a handle to an allocator that does not own it, then gives it back.
    pub(super) fn foreign(&mut self, mi: usize) {
        let other = (mi + 1 + self.rng.below(self.modules.len() - 1)) % self.modules.len();
        if let Some(stale) = self.stale.pop() {
            let target = &mut self.modules[other].alloc;
            let error = match stale {
                Stale::Writable(w) => target.publish(w).map(drop).unwrap_err().error,
                Stale::Published(p) => free_published(target, p).unwrap_err().error(),
            };
            assert_eq!(error, CodeError::ForeignCode);
        } else if self.rng.below(2) == 0 && !self.modules[mi].writable.is_empty() {
            let w = self.modules[mi].writable.pop().unwrap();
            let (range, bytes) = (w.range(), w.as_slice().to_vec());
            let w = if self.rng.below(2) == 0 {
                let r = self.modules[other].alloc.publish(w).map(drop).unwrap_err();
                assert_eq!(r.error, CodeError::ForeignCode);
                r.code
            } else {
                match self.modules[other].alloc.discard(w) {
                    Err(FreeError::Foreign(w)) => w,
                    r => panic!("{r:?}"),
                }
            };
            assert_eq!((w.range(), w.as_slice()), (range, &bytes[..]));
            self.modules[mi].writable.push(w);
        } else if let Some((p, bytes)) = self.modules[mi].published.pop() {
            match free_published(&mut self.modules[other].alloc, p) {
                Err(FreeError::Foreign(p)) => self.modules[mi].published.push((p, bytes)),
                r => panic!("{r:?}"),
            }
        }
        self.check_counters_unchanged();
    }

    /// Frees module `mi`'s published code and discards its writable code, one handle at a
    /// time, each checked as a step of its own (a failure planned for this step may hit any).
    pub(super) fn drain(&mut self, mi: usize) {
        loop {
            let module = &self.modules[mi];
            if !module.published.is_empty() {
                self.free(mi);
            } else if !module.writable.is_empty() {
                self.discard(mi);
            } else {
                return;
            }
            self.settle();
            self.check();
        }
    }

    /// Drops a writable handle without discarding it: the range stays allocated.
    pub(super) fn leak(&mut self, mi: usize) {
        if let Some(w) = self.modules[mi].writable.pop() {
            self.modules[mi].leaked.push(w.range());
        }
    }

    /// Drops module `mi`'s allocator and makes a new one with the same configuration.
    pub(super) fn recreate(&mut self, mi: usize) {
        // Creating the fixed allocator reserves its space: only when no failure is planned.
        self.machine.clear_failures();
        self.injected = None;
        let config = self.modules[mi].config;
        let fresh = Module {
            config,
            alloc: CodeAllocator::new(&self.manager, config).unwrap(),
            writable: Vec::new(),
            published: Vec::new(),
            leaked: Vec::new(),
        };
        let old = std::mem::replace(&mut self.modules[mi], fresh);
        self.learn_spaces(mi);
        let spaces = old.alloc.code_spaces().to_vec();
        let mut ranges: Vec<AddressRange> = old.leaked.clone();
        ranges.extend(old.writable.iter().map(WritableCode::range));
        ranges.extend(old.published.iter().map(|(p, _)| p.range()));
        let Module {
            alloc,
            mut writable,
            mut published,
            ..
        } = old;
        let mut alloc = alloc;
        // SAFETY: the software machine never runs its code; published code goes with the rest.
        unsafe { alloc.release_all() };
        drop(alloc);
        if let Some(w) = writable.pop() {
            self.stale.push(Stale::Writable(w));
        }
        if let Some((p, _)) = published.pop() {
            self.stale.push(Stale::Published(p));
        }
        for r in &ranges {
            assert_eq!(self.live.remove(&r.start()), Some((r.end(), mi)));
            self.allocated[mi] -= r.size();
        }
        assert_eq!(self.allocated[mi], 0);
        for space in spaces {
            self.forget_space(space);
            self.touched.extend(space.pages());
            let dead: Vec<usize> = self
                .pages
                .range(space.start()..space.end())
                .map(|(&p, _)| p)
                .collect();
            for p in dead {
                self.pages.remove(&p);
            }
        }
    }

    /// The spaces module `mi`'s allocator reserved when it was made (ROX mode).
    pub(super) fn learn_spaces(&mut self, mi: usize) {
        for space in self.modules[mi].alloc.code_spaces().to_vec() {
            self.learn_space(space);
        }
    }
}
