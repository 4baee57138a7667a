//! Code objects: the header and metadata of one piece of generated code (V8's `WasmCode`).
//!
//! A [`CodeObject`] describes code that lives elsewhere (in published code memory): its address
//! range, kind and function index, plus its metadata: protected instruction offsets (for the
//! [`TrapTable`](crate::trap::TrapTable)), relocations, source positions and a name. All
//! metadata is packed into **one** allocation next to a small header (64 bytes on x86-64,
//! asserted at compile time to stay within 96; V8 asserts 104 for its `WasmCode`).
//!
//! Code objects carry a *liveness* count with V8's "dying" semantics (see
//! [`CodeObject::dec_ref`]), separate from the `Arc` that keeps the header's memory alive: the
//! count says whether the code may still run, and the object that saw it drop to zero frees the
//! code (removes it from the code map and trap table, releases its memory). A module's drop
//! frees all its code after a grace period whatever the counts say: the grace period (and a
//! preempted task's [`GraceHold`](crate::sync::grace::GraceHold)), not the count, protects code
//! that still runs then.

use crate::sync::atomic::{self, AtomicU32, Ordering};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::range::AddressRange;

mod code_ref;
mod desc;
mod display;
mod error;
#[cfg(all(test, loom))]
mod loom_models;
#[cfg(all(test, not(loom)))]
mod tests;

pub use code_ref::{CodeRef, DecRef};
pub use desc::{CodeDesc, CodeKind, RelocKind, Relocation};
pub use display::DebugName;
pub use error::CodeObjectError;

/// Header and metadata of one piece of generated code.
///
/// The header is 64 bytes on x86-64 (compile-time assertion: at most 96). Metadata lives in one
/// byte allocation, sections back to back in native byte order:
///
/// ```text
/// protected offsets    protected_count × u32, sorted ascending
/// source pc offsets    source_position_count × u32, sorted (non-decreasing)
/// source offsets       source_position_count × u32
/// relocations          relocation_count × (offset u32, value u32)
/// relocation tags      relocation_count × u8
/// name                 name_len bytes of UTF-8
/// ```
///
/// The object does not own the instruction bytes (they live in code memory). Reference counting
/// of the code's liveness is [`inc_ref`](Self::inc_ref)/[`dec_ref`](Self::dec_ref).
pub struct CodeObject {
    instructions: AddressRange,
    metadata: Box<[u8]>,
    index: Option<u32>,
    protected_count: u32,
    source_position_count: u32,
    relocation_count: u32,
    name_len: u32,
    /// Live references in the low 31 bits; [`DYING`](Self::DYING) once they reached zero.
    ref_count: AtomicU32,
    kind: CodeKind,
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<CodeObject>() <= 96);

/// First index `i` in `0..n` for which `pred(i)` is false (`pred` true then false over `0..n`).
fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

fn count_u32(n: usize) -> Result<u32, CodeObjectError> {
    u32::try_from(n).map_err(|_| CodeObjectError::MetadataTooLarge)
}

impl CodeObject {
    /// Top bit of the reference count: set when the count reached zero (the object is dying).
    pub const DYING: u32 = 1 << 31;

    /// Validates `desc` and copies its metadata into one allocation. The reference count starts
    /// at 1.
    ///
    /// # Errors
    ///
    /// The first applicable [`CodeObjectError`], in the order the variants are declared.
    pub fn new(desc: &CodeDesc<'_>) -> Result<Self, CodeObjectError> {
        let size = desc.instructions.size();
        if size == 0 {
            return Err(CodeObjectError::EmptyInstructions);
        }
        let name = desc.name.unwrap_or("");
        let protected_count = count_u32(desc.protected_instructions.len())?;
        let source_position_count = count_u32(desc.source_positions.len())?;
        let relocation_count = count_u32(desc.relocations.len())?;
        let name_len = count_u32(name.len())?;
        // `off < size`, and `off + len <= size`, without overflow.
        let inside = |off: u32| (off as usize) < size;
        let fits =
            |off: u32, len: usize| (off as usize).checked_add(len).is_some_and(|e| e <= size);

        if let Some(&offset) = desc.protected_instructions.iter().find(|&&o| !inside(o)) {
            return Err(CodeObjectError::ProtectedOffsetOutOfRange { offset });
        }
        let mut protected = desc.protected_instructions.to_vec();
        protected.sort_unstable();
        if let Some(w) = protected.windows(2).find(|w| w[0] == w[1]) {
            return Err(CodeObjectError::DuplicateProtectedOffset { offset: w[0] });
        }
        for r in desc.relocations {
            if !fits(r.offset, r.kind.patch_size()) {
                return Err(CodeObjectError::RelocationOutOfRange { offset: r.offset });
            }
            if let RelocKind::InternalReference { target_offset } = r.kind {
                if !inside(target_offset) {
                    return Err(CodeObjectError::RelocationTargetOutOfRange {
                        offset: r.offset,
                        target_offset,
                    });
                }
            }
        }
        if let Some(&(pc_offset, _)) = desc.source_positions.iter().find(|p| !inside(p.0)) {
            return Err(CodeObjectError::SourcePositionOutOfRange { pc_offset });
        }
        if let Some(i) = desc
            .source_positions
            .windows(2)
            .position(|w| w[1].0 < w[0].0)
        {
            return Err(CodeObjectError::UnsortedSourcePositions { index: i + 1 });
        }

        let len = 4 * protected.len()
            + 8 * desc.source_positions.len()
            + 9 * desc.relocations.len()
            + name.len();
        let mut meta = Vec::with_capacity(len);
        for o in &protected {
            meta.extend_from_slice(&o.to_ne_bytes());
        }
        for &(pc, _) in desc.source_positions {
            meta.extend_from_slice(&pc.to_ne_bytes());
        }
        for &(_, src) in desc.source_positions {
            meta.extend_from_slice(&src.to_ne_bytes());
        }
        for r in desc.relocations {
            meta.extend_from_slice(&r.offset.to_ne_bytes());
            meta.extend_from_slice(&r.kind.value().to_ne_bytes());
        }
        meta.extend(desc.relocations.iter().map(|r| r.kind.tag()));
        meta.extend_from_slice(name.as_bytes());
        debug_assert_eq!(meta.len(), len);

        Ok(CodeObject {
            instructions: desc.instructions,
            metadata: meta.into_boxed_slice(),
            index: desc.index,
            protected_count,
            source_position_count,
            relocation_count,
            name_len,
            ref_count: AtomicU32::new(1),
            kind: desc.kind,
        })
    }

    // Section layout.

    fn source_pcs_base(&self) -> usize {
        4 * self.protected_count as usize
    }

    fn source_offsets_base(&self) -> usize {
        self.source_pcs_base() + 4 * self.source_position_count as usize
    }

    fn relocations_base(&self) -> usize {
        self.source_offsets_base() + 4 * self.source_position_count as usize
    }

    fn reloc_tags_base(&self) -> usize {
        self.relocations_base() + 8 * self.relocation_count as usize
    }

    fn name_base(&self) -> usize {
        self.reloc_tags_base() + self.relocation_count as usize
    }

    /// The `u32` at byte `at` of the metadata (0 past the end; never happens by construction).
    fn word_at(&self, at: usize) -> u32 {
        self.metadata
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_ne_bytes)
    }

    fn protected_at(&self, i: usize) -> u32 {
        self.word_at(4 * i)
    }

    fn source_pc_at(&self, i: usize) -> u32 {
        self.word_at(self.source_pcs_base() + 4 * i)
    }

    fn source_offset_at(&self, i: usize) -> u32 {
        self.word_at(self.source_offsets_base() + 4 * i)
    }

    fn relocation_at(&self, i: usize) -> Relocation {
        let at = self.relocations_base() + 8 * i;
        let tag = self
            .metadata
            .get(self.reloc_tags_base() + i)
            .copied()
            .unwrap_or(0);
        Relocation {
            offset: self.word_at(at),
            kind: RelocKind::from_parts(tag, self.word_at(at + 4)),
        }
    }

    // Header.

    /// What the code is.
    #[must_use]
    pub fn kind(&self) -> CodeKind {
        self.kind
    }

    /// Function index, if any.
    #[must_use]
    pub fn index(&self) -> Option<u32> {
        self.index
    }

    /// Where the instructions are.
    #[must_use]
    pub fn instructions(&self) -> AddressRange {
        self.instructions
    }

    /// Address of the first instruction.
    #[must_use]
    pub fn instruction_start(&self) -> usize {
        self.instructions.start()
    }

    /// Whether `pc` lies in the instructions.
    #[must_use]
    pub fn contains(&self, pc: usize) -> bool {
        self.instructions.contains(pc)
    }

    // Metadata.

    /// Protected instruction offsets, ascending (the form
    /// [`TrapTable::register`](crate::trap::TrapTable::register) accepts).
    pub fn protected_instructions(
        &self,
    ) -> impl ExactSizeIterator<Item = u32> + DoubleEndedIterator + Clone + '_ {
        (0..self.protected_count as usize).map(move |i| self.protected_at(i))
    }

    /// Whether the instruction at `pc_offset` is protected. O(log k), allocation-free.
    #[must_use]
    pub fn is_protected(&self, pc_offset: u32) -> bool {
        let n = self.protected_count as usize;
        let i = partition_point(n, |i| self.protected_at(i) < pc_offset);
        i < n && self.protected_at(i) == pc_offset
    }

    /// Relocations, in the order given.
    pub fn relocations(
        &self,
    ) -> impl ExactSizeIterator<Item = Relocation> + DoubleEndedIterator + Clone + '_ {
        (0..self.relocation_count as usize).map(move |i| self.relocation_at(i))
    }

    /// `(pc_offset, source_offset)` pairs, sorted by `pc_offset`.
    pub fn source_positions(
        &self,
    ) -> impl ExactSizeIterator<Item = (u32, u32)> + DoubleEndedIterator + Clone + '_ {
        (0..self.source_position_count as usize)
            .map(move |i| (self.source_pc_at(i), self.source_offset_at(i)))
    }

    /// Source offset of the last source position whose pc offset is at most `pc_offset`, or
    /// `None` when the first position comes later (or there is none). O(log n), allocation-free.
    #[must_use]
    pub fn source_position_before(&self, pc_offset: u32) -> Option<u32> {
        let n = self.source_position_count as usize;
        let i = partition_point(n, |i| self.source_pc_at(i) <= pc_offset);
        i.checked_sub(1).map(|i| self.source_offset_at(i))
    }

    /// The code's own name, if it has a non-empty one.
    #[must_use]
    pub fn name(&self) -> Option<&str> {
        let base = self.name_base();
        let bytes = self.metadata.get(base..base + self.name_len as usize)?;
        // Valid UTF-8 by construction (copied from a `&str`).
        core::str::from_utf8(bytes).ok().filter(|n| !n.is_empty())
    }

    /// Printable name: [`name`](Self::name), else `func[<index>]`, `jump-table` or `wrapper`.
    #[must_use]
    pub fn debug_name(&self) -> DebugName<'_> {
        DebugName::new(self.kind, self.index, self.name())
    }

    /// Bytes used: the header plus the metadata allocation (V8's
    /// `EstimateCurrentMemoryConsumption`).
    #[must_use]
    pub fn memory_usage(&self) -> usize {
        core::mem::size_of::<Self>() + self.metadata.len()
    }

    // Reference counting.

    /// Adds a live reference, unless the object is already dying: then returns `false` and
    /// changes nothing, so dead code is never resurrected.
    ///
    /// V8 only increments counts of code that is known to be live (found on a stack or in a
    /// code table under its lock); a `false` here means the caller raced with the final
    /// [`dec_ref`](Self::dec_ref) and must treat the code as gone.
    ///
    /// Also returns `false` (nothing changed) if the count would reach [`DYING`](Self::DYING)
    /// (2³¹ − 1 live references).
    #[must_use = "false means the code is dying and was not referenced"]
    pub fn inc_ref(&self) -> bool {
        let mut cur = self.ref_count.load(Ordering::Relaxed);
        loop {
            // A dying object is not resurrected; a count about to reach the flag bit is refused
            // rather than wrapped (2^31 holders is a leak, not a workload).
            if cur & Self::DYING != 0 || cur + 1 >= Self::DYING {
                return false;
            }
            // Relaxed like `Arc::clone`: the caller already holds a reference or the lock of a
            // table that does, which orders this with the final decrement.
            match self.ref_count.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Takes a counted reference (as [`inc_ref`](Self::inc_ref)) that releases itself exactly
    /// once when dropped: the safe way to keep code from being retired while it may run (V8's
    /// `WasmCodeRefScope`); it does not keep the memory past its module's drop (see
    /// [`CodeRef`]). `None` when the object is dying (or the count is saturated).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use codespace::code_object::{CodeDesc, CodeKind, CodeObject, DecRef};
    /// # use codespace::AddressRange;
    /// let code = Arc::new(CodeObject::new(&CodeDesc::new(
    ///     CodeKind::Function,
    ///     AddressRange::new(0x1000, 0x1040),
    /// ))?);
    /// let held = CodeObject::hold(&code).expect("live");
    /// assert_eq!(code.ref_count(), 2);
    /// assert_eq!(held.release(), DecRef::Alive);
    /// assert_eq!(code.ref_count(), 1);
    /// # Ok::<(), codespace::code_object::CodeObjectError>(())
    /// ```
    #[must_use = "dropping the reference releases it at once"]
    pub fn hold(this: &Arc<Self>) -> Option<CodeRef> {
        this.inc_ref().then(|| CodeRef {
            object: Arc::clone(this),
        })
    }

    /// Drops a live reference. The transition to zero happens exactly once: that call returns
    /// [`DecRef::Dead`] and marks the object dying (count 0 with [`DYING`](Self::DYING) set);
    /// its caller frees the code. A call on an object that is already dying (more `dec_ref`s
    /// than references) returns [`DecRef::AlreadyDying`] and changes nothing; every other call
    /// returns [`DecRef::Alive`].
    ///
    /// [`hold`](Self::hold) gives a [`CodeRef`] that calls this exactly once, safely.
    ///
    /// # Safety
    /// The caller gives up one reference it holds and does not give it up again: one it took
    /// with a successful [`inc_ref`](Self::inc_ref), or the creation reference it owns (a
    /// module's). After the call neither it nor anyone it lent the reference to relies on that
    /// reference to keep the code alive. An unbalanced call (std's
    /// `Arc::decrement_strong_count` is `unsafe` for the same reason) can make the count reach
    /// zero while another holder still runs the code, which is then retired and, after a grace
    /// period that holder does not block, freed under it.
    pub unsafe fn dec_ref(&self) -> DecRef {
        let mut cur = self.ref_count.load(Ordering::Relaxed);
        loop {
            if cur & Self::DYING != 0 || cur == 0 {
                return DecRef::AlreadyDying;
            }
            let next = if cur == 1 { Self::DYING } else { cur - 1 };
            match self.ref_count.compare_exchange_weak(
                cur,
                next,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) if cur == 1 => {
                    // Everything other holders did before their decrements happens-before the
                    // caller frees the code (as in `Arc::drop`).
                    atomic::fence(Ordering::Acquire);
                    return DecRef::Dead;
                }
                Ok(_) => return DecRef::Alive,
                Err(now) => cur = now,
            }
        }
    }

    /// Live references (0 once dying).
    #[must_use]
    pub fn ref_count(&self) -> u32 {
        self.ref_count.load(Ordering::Relaxed) & !Self::DYING
    }

    /// Whether the count reached zero: the code is dead or being freed.
    #[must_use]
    pub fn is_dying(&self) -> bool {
        self.ref_count.load(Ordering::Relaxed) & Self::DYING != 0
    }

    /// Writes an Intel-syntax disassembly of `bytes`, the object's instruction bytes as read
    /// from code memory (bytes past the object's size are ignored), after the header line.
    ///
    /// One line per instruction: `address: bytes  instruction`, followed by `  ; protected` for
    /// protected instructions and `source <offset>` for source positions within the
    /// instruction, e.g. `0000000000001004: 8b07                  mov eax,[rdi]  ; protected,
    /// source 12`.
    ///
    /// # Errors
    ///
    /// Whatever `out` returns.
    #[cfg(feature = "disasm")]
    pub fn disassemble(&self, bytes: &[u8], out: &mut dyn fmt::Write) -> fmt::Result {
        use alloc::string::String;
        use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

        writeln!(out, "{self}")?;
        let bytes = bytes.get(..self.instructions.size()).unwrap_or(bytes);
        let start = self.instruction_start();
        let mut decoder = Decoder::with_ip(64, bytes, start as u64, DecoderOptions::NONE);
        let mut formatter = IntelFormatter::new();
        let mut text = String::new();
        let mut instr = Instruction::default();
        let mut offset = 0usize;
        while decoder.can_decode() {
            decoder.decode_out(&mut instr);
            let len = instr.len();
            text.clear();
            formatter.format(&instr, &mut text);
            write!(out, "{:016x}: ", start + offset)?;
            let raw = bytes.get(offset..offset + len).unwrap_or(&[]);
            for b in raw {
                write!(out, "{b:02x}")?;
            }
            for _ in raw.len()..10 {
                out.write_str("  ")?;
            }
            write!(out, "  {text}")?;
            // Offsets fit in u32 for any object with metadata; others get no comments.
            let off = u32::try_from(offset).unwrap_or(u32::MAX);
            let end = u32::try_from(offset + len).unwrap_or(u32::MAX);
            let mut sep = "  ; ";
            if self.is_protected(off) {
                write!(out, "{sep}protected")?;
                sep = ", ";
            }
            let first = partition_point(self.source_position_count as usize, |i| {
                self.source_pc_at(i) < off
            });
            for (pc, src) in self.source_positions().skip(first) {
                if pc >= end {
                    break;
                }
                write!(out, "{sep}source {src}")?;
                sep = ", ";
            }
            writeln!(out)?;
            offset += len;
        }
        Ok(())
    }
}
