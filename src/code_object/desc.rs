//! What a piece of code is and what is given to build its object: kind, relocations, the
//! borrowed description.

use super::*;

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
    pub(super) const fn tag(self) -> u8 {
        match self {
            RelocKind::CallSlot { .. } => 0,
            RelocKind::InternalReference { .. } => 1,
        }
    }

    /// The `u32` payload (slot or target offset).
    pub(super) const fn value(self) -> u32 {
        match self {
            RelocKind::CallSlot { slot } => slot,
            RelocKind::InternalReference { target_offset } => target_offset,
        }
    }

    pub(super) const fn from_parts(tag: u8, value: u32) -> Self {
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
