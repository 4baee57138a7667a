//! What a module is configured with, what code looks like when added, and what can go wrong.

use core::fmt;

use crate::code_map::CodeMapError;
use crate::code_object::{CodeKind, CodeObjectError, Relocation};
use crate::code_pointer_table::CodePointerError;
use crate::jump_table::JumpTableError;
use crate::manager::CodeError;
use crate::trap::TrapError;

/// Settings of a [`CodeModule`](super::CodeModule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleConfig {
    /// Number of functions, i.e. jump-table slots.
    pub functions: u32,
    /// Address of the runtime's lazy-compile entry; enables lazy slots (`push index; jmp entry`).
    pub lazy_entry: Option<usize>,
    /// Whether more code spaces may be reserved.
    pub growable: bool,
    /// Size of the first code space (0: sized by need).
    pub initial_reservation: usize,
    /// Code spaces on 2 MiB pages that are never writable (the ROX mode, see
    /// [`AllocatorConfig::rox`](crate::AllocatorConfig::rox)); needs the manager's
    /// [`rox_code`](crate::ManagerConfig::rox_code). Off by default.
    pub rox: bool,
}

impl Default for ModuleConfig {
    fn default() -> Self {
        ModuleConfig {
            functions: 0,
            lazy_entry: None,
            growable: true,
            initial_reservation: 0,
            rox: false,
        }
    }
}

/// Code to add to a module.
#[derive(Debug, Clone, Copy)]
pub struct NewCode<'a> {
    /// What it is.
    pub kind: CodeKind,
    /// Function index: installs the code in that jump-table slot.
    pub index: Option<u32>,
    /// Machine code, position-independent but for `relocations`.
    pub bytes: &'a [u8],
    /// Offsets of loads/stores that may hit a guard page (#PF).
    pub protected: &'a [u32],
    /// Offsets of instructions that trap with another exception, and which (`ud2`: #UD, an
    /// integer division: #DE); found by
    /// [`TrapTable::lookup_trap`](crate::trap::TrapTable::lookup_trap). #PF sites may be given
    /// here too (they join `protected`).
    pub sites: &'a [(u32, crate::trap::TrapVector)],
    /// Offset of the landing pad where a protected fault resumes (r10 = faulting PC).
    pub landing_pad: Option<u32>,
    /// The fault addresses protected instructions may take (e.g. each linear memory's
    /// reservation with its guard region, the null page range); a fault in none of them is not
    /// the code's to handle. Empty: any address.
    pub fault_ranges: &'a [crate::AddressRange],
    /// Fields to resolve once the address is known.
    pub relocations: &'a [Relocation],
    /// `(pc_offset, source_offset)` pairs, sorted.
    pub source_positions: &'a [(u32, u32)],
    /// Name for profilers and debuggers.
    pub name: Option<&'a str>,
}

impl<'a> NewCode<'a> {
    /// Plain code of `kind` with nothing but its bytes.
    #[must_use]
    pub const fn new(kind: CodeKind, bytes: &'a [u8]) -> Self {
        NewCode {
            kind,
            index: None,
            bytes,
            protected: &[],
            sites: &[],
            landing_pad: None,
            fault_ranges: &[],
            relocations: &[],
            source_positions: &[],
            name: None,
        }
    }

    /// The function with `index`.
    #[must_use]
    pub const fn function(index: u32, bytes: &'a [u8]) -> Self {
        let mut c = NewCode::new(CodeKind::Function, bytes);
        c.index = Some(index);
        c
    }
}

/// Why a module operation failed; nothing changed unless the variant says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModuleError {
    /// Allocation, commit, publish or patch failed ([`CodeError::SyncFailed`] and
    /// [`CodeError::FlushFailed`] say what stayed changed).
    Code(CodeError),
    /// The code's metadata is invalid.
    Metadata(CodeObjectError),
    /// Registering trap data failed.
    Trap(TrapError),
    /// Function index beyond the module's functions.
    BadIndex {
        /// The index given.
        index: u32,
    },
    /// Protected instructions or trap sites without a landing pad, or a landing pad outside the
    /// code.
    BadLandingPad,
    /// A relocation does not fit its instruction (not a rel32 call/jump, out of reach, or
    /// overlapping another relocation).
    BadRelocation {
        /// Offset of the relocation.
        offset: u32,
    },
    /// No code of this module starts there (or it is a jump table, or already released).
    UnknownCode {
        /// The address given.
        start: usize,
    },
    /// The code is installed as a function; replace the function instead.
    StillInstalled {
        /// Start of the code.
        start: usize,
    },
    /// A jump slot or code pointer still targets the code.
    StillTargeted {
        /// Start of the code.
        start: usize,
    },
    /// A slot may target only code of this module or a registered external entry.
    UnknownTarget {
        /// The target given.
        target: usize,
    },
    /// An external entry cannot be code that stays callable: it lies inside one of this
    /// module's code spaces (whose code is freed and reused on the module's own schedule), or
    /// inside the code window but in no code space at all.
    BadExternal {
        /// The entry given.
        entry: usize,
    },
    /// The module's code already has pointers in its code-pointer table: switching tables would
    /// free them in the wrong one (another module's live pointers) and leave the old entries
    /// aimed at code that is freed.
    CodePointersExist,
    /// A jump table could not be emitted.
    JumpTable(JumpTableError),
    /// The code overlaps code already registered for PC lookup.
    CodeMap(CodeMapError),
    /// The code pointer table refused (full).
    CodePointer(CodePointerError),
    /// Too many functions: their jump tables would not fit in a code space (or in the
    /// configured initial reservation), or memory for the per-function tables could not be
    /// allocated.
    TooManyFunctions {
        /// Functions asked for.
        functions: u32,
    },
    /// The module's lock was held and the caller runs with interrupts disabled.
    Busy,
    /// The image was not loaded by this module, or was unpublished already.
    UnknownImage,
    /// The image's text is published already (an image is published once).
    ImageAlreadyPublished,
    /// The text range to publish is empty or not page aligned at both ends.
    ImageTextUnaligned {
        /// The range given.
        text: crate::AddressRange,
    },
    /// The text range to publish does not lie inside the image's pages.
    ImageTextOutside {
        /// The range given.
        text: crate::AddressRange,
    },
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleError::Code(e) => write!(f, "{e}"),
            ModuleError::Metadata(e) => write!(f, "code metadata: {e:?}"),
            ModuleError::Trap(e) => write!(f, "trap data: {e}"),
            ModuleError::BadIndex { index } => write!(f, "no function {index}"),
            ModuleError::BadLandingPad => {
                f.write_str("protected code needs a landing pad inside it")
            }
            ModuleError::BadRelocation { offset } => write!(f, "bad relocation at {offset:#x}"),
            ModuleError::UnknownCode { start } => write!(f, "no releasable code at {start:#x}"),
            ModuleError::StillInstalled { start } => {
                write!(f, "code at {start:#x} is an installed function")
            }
            ModuleError::StillTargeted { start } => {
                write!(f, "a slot or code pointer still targets {start:#x}")
            }
            ModuleError::UnknownTarget { target } => {
                write!(
                    f,
                    "{target:#x} is neither code of this module nor an external entry"
                )
            }
            ModuleError::BadExternal { entry } => write!(
                f,
                "{entry:#x} lies in this module's code or in no code space of the window"
            ),
            ModuleError::CodePointersExist => {
                f.write_str("the module's code already has pointers in its code pointer table")
            }
            ModuleError::JumpTable(e) => write!(f, "jump table: {e:?}"),
            ModuleError::CodeMap(e) => write!(f, "PC lookup: {e}"),
            ModuleError::CodePointer(e) => write!(f, "code pointer table: {e:?}"),
            ModuleError::TooManyFunctions { functions } => {
                write!(f, "{functions} functions do not fit")
            }
            ModuleError::Busy => f.write_str("module lock held; interrupts disabled, not waiting"),
            ModuleError::UnknownImage => f.write_str("not an image loaded by this module"),
            ModuleError::ImageAlreadyPublished => f.write_str("the image is published already"),
            ModuleError::ImageTextUnaligned { text } => {
                write!(f, "text {text:?} is empty or not page aligned")
            }
            ModuleError::ImageTextOutside { text } => {
                write!(f, "text {text:?} lies outside the image")
            }
        }
    }
}

impl core::error::Error for ModuleError {}

impl From<CodeError> for ModuleError {
    fn from(e: CodeError) -> Self {
        match e {
            CodeError::Busy => ModuleError::Busy,
            e => ModuleError::Code(e),
        }
    }
}

/// So a kernel's setup can `?` a backend error (`X86Mmu::new`) in a function that returns
/// `ModuleError`, as it does a manager's.
impl From<crate::mmu::MmuError> for ModuleError {
    fn from(e: crate::mmu::MmuError) -> Self {
        ModuleError::from(CodeError::from(e))
    }
}
