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

/// What a piece of code is.
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum CodeKind {
    /// A compiled function.
    Function,
    /// A jump table (its slots are the call targets of functions).
    JumpTable,
    /// A wrapper (entry, exit or adapter stub).
    Wrapper,
    /// The text of an image published by
    /// [`CodeModule::publish_image`](crate::module::CodeModule::publish_image) (a precompiled
    /// wasm module's functions, as one range).
    Image,
}

impl CodeKind {
    /// Lower-case name: `function`, `jump-table`, `wrapper` or `image`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            CodeKind::Function => "function",
            CodeKind::JumpTable => "jump-table",
            CodeKind::Wrapper => "wrapper",
            CodeKind::Image => "image",
        }
    }
}

impl fmt::Display for CodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a [`Relocation`] patches.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum RelocKind {
    /// A rel32 call whose 4-byte displacement field is at the relocation's offset; it must be
    /// resolved to jump-table slot `slot` of the code's own code space.
    CallSlot {
        /// Jump-table slot (function index within the code space's table).
        slot: u32,
    },
    /// An absolute 8-byte address at the relocation's offset that must point into this object,
    /// at `instruction_start() + target_offset`.
    InternalReference {
        /// Offset of the target from the start of the instructions.
        target_offset: u32,
    },
}

impl RelocKind {
    /// Bytes patched at the relocation's offset: 4 for a call slot, 8 for an internal reference.
    #[must_use]
    pub const fn patch_size(self) -> usize {
        match self {
            RelocKind::CallSlot { .. } => 4,
            RelocKind::InternalReference { .. } => 8,
        }
    }

    /// Tag in the packed metadata.
    const fn tag(self) -> u8 {
        match self {
            RelocKind::CallSlot { .. } => 0,
            RelocKind::InternalReference { .. } => 1,
        }
    }

    /// The `u32` payload (slot or target offset).
    const fn value(self) -> u32 {
        match self {
            RelocKind::CallSlot { slot } => slot,
            RelocKind::InternalReference { target_offset } => target_offset,
        }
    }

    const fn from_parts(tag: u8, value: u32) -> Self {
        if tag == 0 {
            RelocKind::CallSlot { slot: value }
        } else {
            RelocKind::InternalReference {
                target_offset: value,
            }
        }
    }
}

/// A place in the instructions that must be patched once the code's address is known.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Relocation {
    /// Offset of the patched field from the start of the instructions.
    pub offset: u32,
    /// What to write there.
    pub kind: RelocKind,
}

/// Everything needed to build a [`CodeObject`]; borrowed, copied into the object.
#[derive(Clone, Copy, Debug)]
pub struct CodeDesc<'a> {
    /// What the code is.
    pub kind: CodeKind,
    /// Function index (functions), if any.
    pub index: Option<u32>,
    /// Where the instructions are (non-empty).
    pub instructions: AddressRange,
    /// Offsets of the instructions that may fault on a guard page, any order, distinct, each
    /// below `instructions.size()`.
    pub protected_instructions: &'a [u32],
    /// Places to patch; each patched field lies inside the instructions.
    pub relocations: &'a [Relocation],
    /// `(pc_offset, source_offset)` pairs sorted by `pc_offset` (equal offsets allowed), each
    /// `pc_offset` below `instructions.size()`.
    pub source_positions: &'a [(u32, u32)],
    /// Name (e.g. from the module's name section); `None` or empty for anonymous code.
    pub name: Option<&'a str>,
}

impl<'a> CodeDesc<'a> {
    /// A description with no index, metadata or name.
    #[must_use]
    pub const fn new(kind: CodeKind, instructions: AddressRange) -> Self {
        CodeDesc {
            kind,
            index: None,
            instructions,
            protected_instructions: &[],
            relocations: &[],
            source_positions: &[],
            name: None,
        }
    }
}

/// Why [`CodeObject::new`] refused a [`CodeDesc`] (checked in the order listed).
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CodeObjectError {
    /// The instruction range holds no byte.
    EmptyInstructions,
    /// A section count or the name length does not fit in a `u32`.
    MetadataTooLarge,
    /// A protected offset is not below the code size (the first one, in input order).
    ProtectedOffsetOutOfRange {
        /// The offending offset.
        offset: u32,
    },
    /// A protected offset was given twice (the smallest such offset).
    DuplicateProtectedOffset {
        /// The repeated offset.
        offset: u32,
    },
    /// A relocation's patched field does not lie inside the instructions (the first one).
    RelocationOutOfRange {
        /// The relocation's offset.
        offset: u32,
    },
    /// An internal reference points outside the instructions (the first one).
    RelocationTargetOutOfRange {
        /// The relocation's offset.
        offset: u32,
        /// Its target offset.
        target_offset: u32,
    },
    /// A source position's pc offset is not below the code size (the first one).
    SourcePositionOutOfRange {
        /// The offending pc offset.
        pc_offset: u32,
    },
    /// Source positions are not sorted by pc offset: entry `index` is below entry `index - 1`.
    UnsortedSourcePositions {
        /// Index of the first out-of-order entry.
        index: usize,
    },
}

impl fmt::Display for CodeObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodeObjectError::EmptyInstructions => f.write_str("empty instruction range"),
            CodeObjectError::MetadataTooLarge => f.write_str("code metadata too large"),
            CodeObjectError::ProtectedOffsetOutOfRange { offset } => {
                write!(f, "protected offset {offset:#x} lies outside the code")
            }
            CodeObjectError::DuplicateProtectedOffset { offset } => {
                write!(f, "protected offset {offset:#x} given twice")
            }
            CodeObjectError::RelocationOutOfRange { offset } => {
                write!(
                    f,
                    "relocation at {offset:#x} patches bytes outside the code"
                )
            }
            CodeObjectError::RelocationTargetOutOfRange {
                offset,
                target_offset,
            } => write!(
                f,
                "relocation at {offset:#x} targets {target_offset:#x}, outside the code"
            ),
            CodeObjectError::SourcePositionOutOfRange { pc_offset } => {
                write!(f, "source position at {pc_offset:#x} lies outside the code")
            }
            CodeObjectError::UnsortedSourcePositions { index } => {
                write!(f, "source position {index} is out of pc order")
            }
        }
    }
}

impl core::error::Error for CodeObjectError {}

/// Result of [`CodeObject::dec_ref`].
#[must_use = "the caller that sees `Dead` must free the code"]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DecRef {
    /// References remain.
    Alive,
    /// This call dropped the last reference: the object is now dying and the caller frees it.
    /// Exactly one `dec_ref` per object returns this.
    Dead,
    /// The object was dying already: an unbalanced `dec_ref`. Nothing changed.
    AlreadyDying,
}

/// A counted reference to a [`CodeObject`]'s code, from [`CodeObject::hold`]: while it lives the
/// code is not retired (a module retires code only once its count reached zero); dropping it,
/// or [`release`](Self::release), gives the reference back exactly once.
///
/// It keeps the code's metadata and its count, not its memory past its module's drop: a dropped
/// module frees all its code once its grace period is over, whatever references are still
/// out. A task that runs the code (or keeps a pointer into it across a possible preemption)
/// takes a [`GraceHold`](crate::sync::grace::GraceHold), which is what keeps that grace period
/// open.
#[derive(Debug)]
pub struct CodeRef {
    object: Arc<CodeObject>,
}

impl CodeRef {
    /// The object this reference counts in (its metadata stays alive; see [`CodeRef`] for
    /// its code).
    #[must_use]
    pub fn object(&self) -> &Arc<CodeObject> {
        &self.object
    }

    /// Gives the reference back now; tells whether it was the last
    /// ([`DecRef::Dead`]: the code's owner may retire it, e.g. a module's
    /// [`free_dead_code`](crate::module::CodeModule::free_dead_code)).
    pub fn release(self) -> DecRef {
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: `this` holds one reference, taken by `hold`, and is consumed here without
        // running its `Drop`, so it is given back exactly once.
        let result = unsafe { this.object.dec_ref() };
        // SAFETY: `this` is never used or dropped again; the `Arc` is moved out exactly once.
        drop(unsafe { core::ptr::read(&this.object) });
        result
    }
}

impl core::ops::Deref for CodeRef {
    type Target = CodeObject;
    fn deref(&self) -> &CodeObject {
        &self.object
    }
}

impl Drop for CodeRef {
    fn drop(&mut self) {
        // SAFETY: the guard holds one reference, taken by `hold`; `Drop` runs once, and
        // `release` (the other way out) skips it.
        let _ = unsafe { self.object.dec_ref() };
    }
}

/// Printable name of a piece of code (V8's `DebugName`): its own name, else `func[<index>]` for
/// a function (`func[?]` without an index), `jump-table` or `wrapper`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct DebugName<'a> {
    kind: CodeKind,
    index: Option<u32>,
    name: Option<&'a str>,
}

impl<'a> DebugName<'a> {
    /// The debug name of code of `kind` with `index` and `name` (an empty name counts as none).
    #[must_use]
    pub const fn new(kind: CodeKind, index: Option<u32>, name: Option<&'a str>) -> Self {
        let name = match name {
            Some(n) if n.is_empty() => None,
            n => n,
        };
        DebugName { kind, index, name }
    }

    /// The code's own name, if it has one.
    #[must_use]
    pub const fn name(&self) -> Option<&'a str> {
        self.name
    }
}

impl fmt::Display for DebugName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name, self.kind, self.index) {
            (Some(name), _, _) => f.write_str(name),
            (None, CodeKind::Function, Some(index)) => write!(f, "func[{index}]"),
            (None, CodeKind::Function, None) => f.write_str("func[?]"),
            (None, kind, _) => f.write_str(kind.as_str()),
        }
    }
}

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

/// `name kind [start, end) size`; the alternate form (`{:#}`) adds one line per non-empty
/// metadata section.
impl fmt::Display for CodeObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.instructions;
        write!(
            f,
            "{} {} [{:#x}, {:#x}) {}",
            self.debug_name(),
            self.kind,
            r.start(),
            r.end(),
            r.size()
        )?;
        if !f.alternate() {
            return Ok(());
        }
        if self.protected_count > 0 {
            f.write_str("\n  protected instructions:")?;
            for o in self.protected_instructions() {
                write!(f, " {o:#x}")?;
            }
        }
        if self.relocation_count > 0 {
            f.write_str("\n  relocations:")?;
            for r in self.relocations() {
                match r.kind {
                    RelocKind::CallSlot { slot } => write!(f, " {:#x} call-slot {slot};", r.offset),
                    RelocKind::InternalReference { target_offset } => {
                        write!(f, " {:#x} internal {target_offset:#x};", r.offset)
                    }
                }?;
            }
        }
        if self.source_position_count > 0 {
            f.write_str("\n  source positions:")?;
            for (pc, src) in self.source_positions() {
                write!(f, " {pc:#x}={src}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CodeObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeObject")
            .field("kind", &self.kind)
            .field("index", &self.index)
            .field("name", &self.name())
            .field("instructions", &self.instructions)
            .field("ref_count", &self.ref_count())
            .field("dying", &self.is_dying())
            .field("protected", &self.protected_count)
            .field("relocations", &self.relocation_count)
            .field("source_positions", &self.source_position_count)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::string::{String, ToString};
    use std::sync::Arc;
    use std::vec::Vec;

    /// `dec_ref` of a reference the test holds (the tests count references to made-up code
    /// nothing runs).
    fn release(c: &CodeObject) -> DecRef {
        // SAFETY: no code runs behind the tests' objects: an unbalanced release only shows in
        // the count, which is what the tests check.
        unsafe { c.dec_ref() }
    }

    fn r(start: usize, end: usize) -> AddressRange {
        AddressRange::new(start, end)
    }

    const RELOCS: [Relocation; 2] = [
        Relocation {
            offset: 0x9,
            kind: RelocKind::CallSlot { slot: 3 },
        },
        Relocation {
            offset: 0x18,
            kind: RelocKind::InternalReference {
                target_offset: 0x3c,
            },
        },
    ];
    const POSITIONS: [(u32, u32); 4] = [(0x0, 10), (0x8, 12), (0x8, 13), (0x20, 40)];

    fn full() -> CodeObject {
        CodeObject::new(&CodeDesc {
            kind: CodeKind::Function,
            index: Some(3),
            instructions: r(0x1000, 0x1040),
            protected_instructions: &[0x20, 0x4, 0x10],
            relocations: &RELOCS,
            source_positions: &POSITIONS,
            name: Some("add_one"),
        })
        .unwrap()
    }

    #[test]
    fn header_fits_and_metadata_is_one_allocation() {
        assert!(core::mem::size_of::<CodeObject>() <= 96);
        assert_eq!(core::mem::size_of::<CodeObject>(), 64);
        let c = full();
        // 3 protected + 4 positions × 2 words + 2 relocations × 9 bytes + 7 name bytes.
        let meta = 3 * 4 + 4 * 8 + 2 * 9 + 7;
        assert_eq!(c.metadata.len(), meta);
        assert_eq!(c.memory_usage(), 64 + meta);
        let bare = CodeObject::new(&CodeDesc::new(CodeKind::JumpTable, r(0, 8))).unwrap();
        assert_eq!(bare.memory_usage(), 64);
    }

    #[test]
    fn accessors_round_trip() {
        let c = full();
        assert_eq!(c.kind(), CodeKind::Function);
        assert_eq!(c.index(), Some(3));
        assert_eq!(c.instructions(), r(0x1000, 0x1040));
        assert_eq!(c.instruction_start(), 0x1000);
        assert_eq!(
            c.protected_instructions().collect::<Vec<_>>(),
            [0x4, 0x10, 0x20]
        );
        assert_eq!(c.protected_instructions().len(), 3);
        assert!(c.is_protected(0x10));
        assert!(!c.is_protected(0x11));
        assert!(!c.is_protected(0x40));
        assert_eq!(c.relocations().collect::<Vec<_>>(), RELOCS);
        assert_eq!(c.source_positions().collect::<Vec<_>>(), POSITIONS);
        assert_eq!(c.name(), Some("add_one"));
        assert!(c.contains(0x1000) && c.contains(0x103f));
        assert!(!c.contains(0x1040) && !c.contains(0xfff));
        assert_eq!(c.ref_count(), 1);
        assert!(!c.is_dying());
    }

    #[test]
    fn source_position_before_is_last_at_or_below() {
        let c = full();
        assert_eq!(c.source_position_before(0), Some(10));
        assert_eq!(c.source_position_before(7), Some(10));
        // Equal pc offsets: the last one wins.
        assert_eq!(c.source_position_before(8), Some(13));
        assert_eq!(c.source_position_before(0x1f), Some(13));
        assert_eq!(c.source_position_before(0x20), Some(40));
        assert_eq!(c.source_position_before(u32::MAX), Some(40));
        let late = CodeObject::new(&CodeDesc {
            source_positions: &[(4, 1)],
            ..CodeDesc::new(CodeKind::Function, r(0, 8))
        })
        .unwrap();
        assert_eq!(late.source_position_before(3), None);
        assert_eq!(late.source_position_before(4), Some(1));
        let none = CodeObject::new(&CodeDesc::new(CodeKind::Function, r(0, 8))).unwrap();
        assert_eq!(none.source_position_before(4), None);
    }

    #[test]
    fn debug_names() {
        let named = full();
        assert_eq!(named.debug_name().to_string(), "add_one");
        let desc = |kind, index, name| CodeDesc {
            index,
            name,
            ..CodeDesc::new(kind, r(0x1000, 0x1010))
        };
        let name = |d: CodeDesc<'_>| CodeObject::new(&d).unwrap().debug_name().to_string();
        assert_eq!(name(desc(CodeKind::Function, Some(3), None)), "func[3]");
        assert_eq!(name(desc(CodeKind::Function, Some(3), Some(""))), "func[3]");
        assert_eq!(name(desc(CodeKind::Function, None, None)), "func[?]");
        assert_eq!(name(desc(CodeKind::Wrapper, Some(1), None)), "wrapper");
        assert_eq!(name(desc(CodeKind::JumpTable, None, None)), "jump-table");
        assert_eq!(
            name(desc(CodeKind::Wrapper, None, Some("js-to-wasm"))),
            "js-to-wasm"
        );
        assert_eq!(
            CodeObject::new(&desc(CodeKind::Function, Some(3), Some("")))
                .unwrap()
                .name(),
            None
        );
    }

    #[test]
    fn display_header_and_sections() {
        let c = full();
        assert_eq!(c.to_string(), "add_one function [0x1000, 0x1040) 64");
        assert_eq!(
            std::format!("{c:#}"),
            "add_one function [0x1000, 0x1040) 64\n  protected instructions: 0x4 0x10 0x20\n  \
             relocations: 0x9 call-slot 3; 0x18 internal 0x3c;\n  \
             source positions: 0x0=10 0x8=12 0x8=13 0x20=40"
        );
        let jt = CodeObject::new(&CodeDesc::new(CodeKind::JumpTable, r(0x2000, 0x2100))).unwrap();
        assert_eq!(
            std::format!("{jt:#}"),
            "jump-table jump-table [0x2000, 0x2100) 256"
        );
        assert!(std::format!("{c:?}").contains("add_one"));
    }

    #[test]
    fn validation_errors() {
        let base = CodeDesc::new(CodeKind::Function, r(0x1000, 0x1010));
        let err = |d: CodeDesc<'_>| CodeObject::new(&d).unwrap_err();
        assert_eq!(
            err(CodeDesc::new(CodeKind::Function, r(5, 5))),
            CodeObjectError::EmptyInstructions
        );
        assert_eq!(
            err(CodeDesc {
                protected_instructions: &[1, 0x10, 0x20],
                ..base
            }),
            CodeObjectError::ProtectedOffsetOutOfRange { offset: 0x10 }
        );
        assert_eq!(
            err(CodeDesc {
                protected_instructions: &[3, 1, 5, 3, 1],
                ..base
            }),
            CodeObjectError::DuplicateProtectedOffset { offset: 1 }
        );
        let call = |offset| Relocation {
            offset,
            kind: RelocKind::CallSlot { slot: 0 },
        };
        let internal = |offset, target_offset| Relocation {
            offset,
            kind: RelocKind::InternalReference { target_offset },
        };
        assert!(CodeObject::new(&CodeDesc {
            relocations: &[call(0xc), internal(0x8, 0xf)],
            ..base
        })
        .is_ok());
        assert_eq!(
            err(CodeDesc {
                relocations: &[call(0xd)],
                ..base
            }),
            CodeObjectError::RelocationOutOfRange { offset: 0xd }
        );
        assert_eq!(
            err(CodeDesc {
                relocations: &[internal(0x9, 0)],
                ..base
            }),
            CodeObjectError::RelocationOutOfRange { offset: 0x9 }
        );
        assert_eq!(
            err(CodeDesc {
                relocations: &[call(u32::MAX)],
                ..base
            }),
            CodeObjectError::RelocationOutOfRange { offset: u32::MAX }
        );
        assert_eq!(
            err(CodeDesc {
                relocations: &[internal(0, 0x10)],
                ..base
            }),
            CodeObjectError::RelocationTargetOutOfRange {
                offset: 0,
                target_offset: 0x10
            }
        );
        assert_eq!(
            err(CodeDesc {
                source_positions: &[(0, 0), (0x10, 1)],
                ..base
            }),
            CodeObjectError::SourcePositionOutOfRange { pc_offset: 0x10 }
        );
        assert_eq!(
            err(CodeDesc {
                source_positions: &[(0, 0), (4, 1), (4, 2), (3, 3)],
                ..base
            }),
            CodeObjectError::UnsortedSourcePositions { index: 3 }
        );
        assert!(CodeObjectError::DuplicateProtectedOffset { offset: 16 }
            .to_string()
            .contains("0x10"));
    }

    #[test]
    fn ref_count_dies_once_and_is_not_resurrected() {
        let c = full();
        assert!(c.inc_ref());
        assert_eq!(c.ref_count(), 2);
        assert_eq!(release(&c), DecRef::Alive);
        assert!(!c.is_dying());
        assert_eq!(release(&c), DecRef::Dead);
        assert!(c.is_dying());
        assert_eq!(c.ref_count(), 0);
        assert!(!c.inc_ref(), "dying code must not be resurrected");
        assert!(c.is_dying());
        assert_eq!(c.ref_count(), 0);
    }

    #[test]
    fn dec_ref_on_dying_is_refused_and_changes_nothing() {
        let c = full();
        assert_eq!(release(&c), DecRef::Dead);
        let count = c.ref_count();
        assert_eq!(release(&c), DecRef::AlreadyDying);
        assert_eq!(c.ref_count(), count);
        assert!(c.is_dying());
    }

    #[test]
    fn ref_count_race_exactly_one_dead() {
        for _ in 0..20 {
            let c = Arc::new(full());
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let c = Arc::clone(&c);
                    let barrier = Arc::clone(&barrier);
                    std::thread::spawn(move || {
                        let mut dead = 0;
                        let mut refs = 0;
                        barrier.wait();
                        for i in 0..2000 {
                            // Thread 0 drops the initial reference part-way through.
                            if t == 0 && i == 500 && release(&c) == DecRef::Dead {
                                dead += 1;
                            }
                            if c.inc_ref() {
                                refs += 1;
                                if release(&c) == DecRef::Dead {
                                    dead += 1;
                                }
                            }
                        }
                        (dead, refs)
                    })
                })
                .collect();
            let results: Vec<(u32, u32)> = threads.into_iter().map(|h| h.join().unwrap()).collect();
            let dead: u32 = results.iter().map(|r| r.0).sum();
            assert_eq!(dead, 1, "exactly one dec_ref observes Dead: {results:?}");
            assert!(c.is_dying());
            assert_eq!(c.ref_count(), 0);
            assert!(!c.inc_ref());
        }
    }

    #[test]
    fn ref_count_many_holders_release_concurrently() {
        let c = Arc::new(full());
        for _ in 0..63 {
            assert!(c.inc_ref());
        }
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || (0..8).filter(|_| release(&c) == DecRef::Dead).count())
            })
            .collect();
        let dead: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(dead, 1);
        assert!(c.is_dying());
    }

    #[cfg(feature = "disasm")]
    #[test]
    fn disassembly_marks_protected_and_source_positions() {
        // mov eax,[rdi] (protected, source 12); add eax,1; ret
        let bytes = [0x8b, 0x07, 0x83, 0xc0, 0x01, 0xc3, 0xcc, 0xcc];
        let c = CodeObject::new(&CodeDesc {
            index: Some(3),
            protected_instructions: &[0],
            source_positions: &[(0, 12), (2, 14)],
            ..CodeDesc::new(CodeKind::Function, r(0x1000, 0x1006))
        })
        .unwrap();
        let mut out = String::new();
        c.disassemble(&bytes, &mut out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "func[3] function [0x1000, 0x1006) 6",
                "0000000000001000: 8b07                  mov eax,[rdi]  ; protected, source 12",
                "0000000000001002: 83c001                add eax,1  ; source 14",
                "0000000000001005: c3                    ret",
            ]
        );
    }

    #[test]
    fn display_to_string_buffer() {
        let mut s = String::new();
        fmt::Write::write_fmt(&mut s, format_args!("{}", full())).unwrap();
        assert_eq!(s, "add_one function [0x1000, 0x1040) 64");
    }
}

/// Model checks of the liveness count: every interleaving of holders releasing and a lookup
/// taking a reference. Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {

    /// `dec_ref` of a reference the test holds (the tests count references to made-up code
    /// nothing runs).
    fn release(c: &CodeObject) -> DecRef {
        // SAFETY: no code runs behind the tests' objects: an unbalanced release only shows in
        // the count, which is what the tests check.
        unsafe { c.dec_ref() }
    }
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    fn object() -> CodeObject {
        CodeObject::new(&CodeDesc::new(
            CodeKind::Function,
            AddressRange::new(0x1000, 0x1040),
        ))
        .unwrap()
    }

    fn checked(f: impl Fn() + Send + Sync + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound.get_or_insert(3);
        builder.check(f);
    }

    /// Two holders release while a third thread tries to take a reference: exactly one
    /// release sees `Dead`; a reference taken is one more release to wait for; a reference is
    /// never taken once the count reached zero; and the thread seeing `Dead` sees everything
    /// the other holders wrote before releasing (it frees the code after them).
    #[test]
    fn loom_code_object_dies_exactly_once_and_is_never_resurrected() {
        checked(|| {
            let o = Arc::new(object());
            assert!(o.inc_ref(), "a second holder");
            // What each holder last wrote while it held the code (e.g. its use of the code).
            let notes = Arc::new([UnsafeCell::new(0u32), UnsafeCell::new(0u32)]);
            let holder = |i: usize| {
                let (o, notes) = (Arc::clone(&o), Arc::clone(&notes));
                loom::thread::spawn(move || {
                    // SAFETY: loom tracks the cell; only this holder writes it before its
                    // release, only the thread seeing `Dead` reads it after.
                    unsafe { notes[i].with_mut(|n| *n = 1) };
                    let r = release(&o);
                    if r == DecRef::Dead {
                        for n in notes.iter() {
                            // SAFETY: as above; a missing happens-before is a reported race.
                            assert_eq!(unsafe { n.with(|n| *n) }, 1);
                        }
                    }
                    r
                })
            };
            let a = holder(0);
            let b = holder(1);
            // A lookup racing the releases.
            let taken = o.inc_ref();
            let dead_before_release = o.is_dying();
            assert!(
                !(taken && dead_before_release),
                "resurrected a dying object"
            );
            let mine = taken.then(|| release(&o));
            let results = [a.join().unwrap(), b.join().unwrap()];
            let deads = results
                .iter()
                .chain(mine.iter())
                .filter(|&&r| r == DecRef::Dead)
                .count();
            assert_eq!(deads, 1, "{results:?} {mine:?}");
            assert!(results
                .iter()
                .chain(mine.iter())
                .all(|&r| r != DecRef::AlreadyDying));
            assert!(o.is_dying());
            assert_eq!(o.ref_count(), 0);
            assert!(!o.inc_ref(), "dead code stays dead");
            assert_eq!(release(&o), DecRef::AlreadyDying);
        });
    }
}
