//! When code may go, and how: references, retirement, grace periods, reclamation.
//!
//! Freeing runs in the only safe order:
//! 1. **Unreachable.** No slot targets the code, no function is installed there, no code
//!    pointer holds it (its own pointer is reset to the trap address first), and the module and
//!    every holder dropped their references.
//! 2. **Retired.** It waits for a grace period of the registries' domain, still registered: a CPU
//!    that was running it, or will return into it, finishes correctly, and a protected fault in
//!    it still lands.
//! 3. **Reclaimed.** Its trap entry and PC-lookup entry go first, then its memory (INT3 fill,
//!    decommit, reuse) — so a lookup never finds freed code whose memory was reused
//!    (wasmtime #12511).
//!
//! Code becomes unreachable when its module drops its reference (replacement, `free_code`), when
//! a holder's `dec_ref` ends it ([`free_dead_code`](ModuleState::free_dead_code)), or when the
//! last slot targeting it moves away (`set_slots`): each of these checks step 1 again.
//!
//! A dropped module goes the same way as a whole ([`unpublish`](ModuleState::unpublish)): under
//! its lock (exclusive access, in `drop`) every code pointer leading into it is reset to the trap
//! address, *then* the grace ticket is taken, and the code spaces are released when the grace
//! period is over ([`Orphan`]). A CPU that loads a pointer after reporting a quiescent state
//! past the ticket gets the trap address; one that loaded the module's code before is waited
//! for. The module's jump tables need no reset: they are its own memory, entered only by its own
//! code and by callers holding addresses the module handed out, which end with it (holding
//! one across a quiescent state breaks the grace domain's contract). Trap and PC-lookup entries
//! stay until the end: a CPU still running the code needs them.

use alloc::vec::Vec;

use super::config::ModuleError;
use super::state::{Live, ModuleState, Retired, Unfreed};
use super::CodeModule;
use crate::code_events::CodeEvent;
use crate::code_object::{CodeKind, DecRef};
use crate::code_pointer_table::{CodePointer, CodePointerTable};
use crate::manager::{FreeError, PublishedCode, WritableCode};
use crate::mmu::Mmu;
use crate::sync::grace::{GraceDomain, GraceTicket};

/// Step 1 then the ticket, for code leaving through `pointers` of `table`: every pointer is
/// reset to the trap address (one `Release` store each, under the table's lock) before
/// [`GraceDomain::defer`] (whose `SeqCst` fence orders those stores before the epoch it reads).
/// So a CPU that announces a quiescent state after the ticket's epoch and then loads one of the
/// pointers sees the trap address (its announcement's fence follows the defer's in the `SeqCst`
/// order); a CPU that loaded the old entry announced before, and the grace period waits for its
/// next announcement. Taking the ticket first would let a CPU announce, load the old entry and
/// run the code while the grace period ends (the loom model `loom_module_drop_*` checks both).
pub(super) fn unlink_then_defer(
    grace: &GraceDomain,
    table: Option<&CodePointerTable>,
    pointers: impl IntoIterator<Item = CodePointer>,
) -> GraceTicket {
    if let Some(table) = table {
        for p in pointers {
            // `NotAllocated` would be a handle the module does not hold: nothing to reset.
            // SAFETY: the module allocated `p` for code it is retiring and frees it once (the
            // caller took it out of the module's books); the table resets the entry to its
            // trap address now and reuses the handle only after a grace period.
            let _ = unsafe { table.free(p) };
        }
    }
    grace.defer()
}

impl<M: Mmu> ModuleState<M> {
    /// Drops the module's reference to the code at `start`; retires it if that was the last.
    pub fn release_ref(&mut self, start: usize) {
        let Some(live) = self.live.get_mut(&start) else {
            return;
        };
        if !core::mem::replace(&mut live.module_ref, false) {
            return;
        }
        // `AlreadyDying`: a holder broke `dec_ref`'s safety contract (it released more than it
        // held, in `unsafe` code); the code is dead all the same, and retiring it here is the
        // best this side can do.
        // SAFETY: the module gives up its creation reference, once (`module_ref` was true and
        // is false from now on).
        if matches!(
            unsafe { live.object.dec_ref() },
            DecRef::Dead | DecRef::AlreadyDying
        ) {
            self.retire_if_unreachable(start);
        }
    }

    /// Retires the code at `start` if nothing can reach it any more (step 1 of the module docs).
    pub fn retire_if_unreachable(&mut self, start: usize) -> bool {
        let Some(live) = self.live.get(&start) else {
            return false;
        };
        let unreachable = !live.module_ref
            && live.object.is_dying()
            && live.object.kind() != CodeKind::JumpTable
            && !self.is_installed(start)
            && !self.is_targeted(start);
        if !unreachable {
            return false;
        }
        let Some(live) = self.live.remove(&start) else {
            return false;
        };
        // From now on an indirect call through the pointer traps instead of arriving here.
        let ticket = unlink_then_defer(self.registries.grace(), self.pointers, live.pointer);
        self.retired.push(Retired {
            live: Live {
                pointer: None,
                ..live
            },
            ticket,
        });
        true
    }

    /// Drops the module's reference to `start` (anonymous code, or a function no longer
    /// installed).
    pub fn free_code(&mut self, start: usize) -> Result<(), ModuleError> {
        let releasable = self
            .live
            .get(&start)
            .is_some_and(|l| l.module_ref && l.object.kind() != CodeKind::JumpTable);
        if !releasable {
            return Err(ModuleError::UnknownCode { start });
        }
        if self.is_installed(start) {
            return Err(ModuleError::StillInstalled { start });
        }
        if self.is_targeted(start) {
            return Err(ModuleError::StillTargeted { start });
        }
        self.release_ref(start);
        Ok(())
    }

    /// Retires code whose count reached zero elsewhere and that nothing reaches; returns how
    /// many objects were retired.
    pub fn free_dead_code(&mut self) -> usize {
        let dead: Vec<usize> = self
            .live
            .iter()
            .filter(|(_, l)| l.object.is_dying() && !l.module_ref)
            .map(|(&s, _)| s)
            .collect();
        dead.into_iter()
            .filter(|&s| self.retire_if_unreachable(s))
            .count()
    }

    /// A dropped module's step 1 and ticket: every code pointer into it (its functions' and its
    /// anonymous code's) reset to the trap address, then the ticket its [`Orphan`] waits for.
    /// Only from `drop`, with the books exclusively ours.
    pub fn unpublish(&mut self) -> GraceTicket {
        let functions = self.function_pointers.iter_mut().filter_map(Option::take);
        let anonymous = self.live.values_mut().filter_map(|l| l.pointer.take());
        let pointers: Vec<CodePointer> = functions.chain(anonymous).collect();
        unlink_then_defer(self.registries.grace(), self.pointers, pointers)
    }

    /// Frees `code`, or keeps it to try again at the next [`reclaim`](Self::reclaim) when
    /// nothing could be freed (the INT3 fill failed): code never leaks out of the books.
    ///
    /// Only for code no CPU can run ([`CodeAllocator::free`](crate::CodeAllocator::free)'s
    /// contract): code that was never reachable (registration failed before anything led to
    /// it), or retired code whose grace period is over.
    pub fn free_or_retry(&mut self, code: PublishedCode) {
        // SAFETY: by this function's rule, checked at each caller: `reclaim`/`free_now` pass
        // retired code whose grace period is over (and that nothing targets, see step 1 of the
        // module docs), the install and table paths code that nothing ever led to.
        if let Err(FreeError::NotFreed(_, code)) = unsafe { self.allocator.free(code) } {
            self.unfreed.push(Unfreed::Published(code));
        }
    }

    /// As [`free_or_retry`](Self::free_or_retry), for code that was never published.
    pub fn discard_or_retry(&mut self, code: WritableCode) {
        if let Err(FreeError::NotFreed(_, code)) = self.allocator.discard(code) {
            self.unfreed.push(Unfreed::Writable(code));
        }
    }

    /// Frees retired code whose grace period is over (step 3), after retrying frees that could
    /// not start before; returns how many retired objects were freed.
    pub fn reclaim(&mut self) -> usize {
        for code in core::mem::take(&mut self.unfreed) {
            match code {
                Unfreed::Published(code) => self.free_or_retry(code),
                Unfreed::Writable(code) => self.discard_or_retry(code),
            }
        }
        // Images are reached through no slot: a failed slot serialization does not hold them.
        let images = self.reclaim_images();
        if self.needs_sync && !self.retired.is_empty() {
            // A failed slot patch may have left CPUs running old slot bytes into retired code:
            // they must serialize before it goes.
            if self.allocator.manager().sync_cores().is_err() {
                return images;
            }
            self.needs_sync = false;
        }
        let grace = self.registries.grace();
        let (over, waiting): (Vec<Retired>, Vec<Retired>) = core::mem::take(&mut self.retired)
            .into_iter()
            .partition(|r| grace.is_over(r.ticket));
        self.retired = waiting;
        let freed = over.len();
        self.free_now(over.into_iter().map(|r| r.live).collect());
        freed + images
    }

    /// Unregisters and frees `lives` now. Only for code no CPU can be running.
    pub fn free_now(&mut self, lives: Vec<Live>) {
        self.unregister(&lives);
        for live in lives {
            // A failed decommit leaves pages committed and counted; the allocator's next free
            // (or drop) gets them later. A free that could not start is retried by `reclaim`.
            self.free_or_retry(live.code);
        }
    }

    /// Takes `lives` out of the trap table, the PC map and the code-pointer table, and reports
    /// them freed to the listener. Only for code no CPU can be running.
    ///
    /// The trap entries go in one table update and the PC-lookup entries in one map update:
    /// one published step each, every index node copied at most once, however many objects a
    /// module teardown frees (one update per object would retire a root-to-leaf path each, all
    /// waiting for the same grace period).
    fn unregister(&mut self, lives: &[Live]) {
        if lives.is_empty() {
            return;
        }
        let handles: Vec<_> = lives.iter().filter_map(|l| l.trap).collect();
        if self.registries.traps.release_batch(&handles).is_err() {
            // Not ours to judge which handle is stale: release what can be, one by one.
            for h in handles {
                let _ = self.registries.traps.release(h);
            }
        }
        let starts: Vec<usize> = lives.iter().map(|l| l.code.start()).collect();
        self.registries.code.remove_batch(&starts);
        for live in lives {
            if let (Some(table), Some(p)) = (self.pointers, live.pointer) {
                // SAFETY: the module allocated `p` for this code, which is being unregistered,
                // and frees it once.
                let _ = unsafe { table.free(p) };
            }
            if let Some(listener) = self.listener {
                listener.code_freed(&CodeEvent::new(&live.object));
            }
        }
    }
}

impl<M: Mmu + Send + 'static> Drop for CodeModule<M> {
    /// The module's teardown, in the order of the per-object retire path (see the module docs):
    /// first nothing shared leads into the module any more, then the grace ticket, then — in a
    /// later [`GraceDomain::reclaim`](crate::sync::grace::GraceDomain::reclaim) — the frees.
    fn drop(&mut self) {
        // `&mut self`: no other CPU holds the module lock or can take it any more; the books
        // are ours as if under it.
        if let Some(mut state) = self.state.get_mut().take() {
            // Other CPUs may still be running (or about to return into) this module's code:
            // everything it owns is freed after a grace period. But one that passes a quiescent
            // state after the ticket must find no way in, else the grace period would not wait
            // for it: the pointers go before the ticket is taken.
            let ticket = state.unpublish();
            self.registries
                .grace()
                .defer_drop(ticket, alloc::boxed::Box::new(Orphan(state)));
        }
    }
}

/// A dropped module's state: everything it owned, freed once CPUs that may still run its code
/// passed a quiescent state (see [`GraceDomain::defer_drop`](crate::sync::grace::GraceDomain)).
pub(super) struct Orphan<M: Mmu>(pub ModuleState<M>);

impl<M: Mmu> Drop for Orphan<M> {
    fn drop(&mut self) {
        // `needs_sync` does not matter here: after the grace period no CPU enters the dropped
        // module's tables or code any more, whatever slot bytes it holds. Its code pointers
        // were reset before the ticket (`unpublish`): none is left to free here.
        let state = &mut self.0;
        let mut lives: Vec<Live> = state.retired.drain(..).map(|r| r.live).collect();
        lives.extend(core::mem::take(&mut state.live).into_values());
        state.unregister(&lives);
        let mut images: Vec<super::image::Image> =
            state.retired_images.drain(..).map(|r| r.image).collect();
        images.extend(core::mem::take(&mut state.images).into_values());
        // Their pages go with the code spaces below.
        state.unregister_images(&mut images);
        drop(images);
        // The code is not freed one object at a time (an INT3 fill and a decommit each): the
        // allocator releases whole code spaces, every page in one flush. Dropping the handles
        // first is fine: they own nothing but the range.
        drop(lives);
        state.unfreed.clear();
        // SAFETY: the dropped module's grace period is over: no CPU runs, returns into or can
        // reach any of its code any more (the module was unreachable before its ticket).
        unsafe { state.allocator.release_all() };
    }
}
