//! Describing a data object (`cranelift_module::DataDescription`): its contents, alignment and
//! the addresses to write into it.

use alloc::borrow::ToOwned;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use cranelift_codegen::binemit::{Addend, CodeOffset};
use cranelift_codegen::entity::PrimaryMap;
use cranelift_codegen::ir;

use crate::module::ModuleRelocTarget;

/// How a data object is initialized.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Init {
    /// Not specified yet ([`define_data`](crate::Module::define_data) refuses it).
    Uninitialized,
    /// All zeros.
    Zeros {
        /// The size of the data.
        size: usize,
    },
    /// These contents.
    Bytes {
        /// The contents, which also give the size.
        contents: Box<[u8]>,
    },
}

impl Init {
    /// The size of the data; `None` while [`Uninitialized`](Init::Uninitialized)
    /// (`cranelift-module` panics there).
    #[must_use]
    pub fn size(&self) -> Option<usize> {
        match self {
            Self::Uninitialized => None,
            Self::Zeros { size } => Some(*size),
            Self::Bytes { contents } => Some(contents.len()),
        }
    }
}

/// A description of a data object.
#[derive(Clone, Debug)]
pub struct DataDescription {
    /// How the data should be initialized.
    pub init: Init,
    /// Functions whose addresses the data holds.
    pub function_decls: PrimaryMap<ir::FuncRef, ModuleRelocTarget>,
    /// Data objects whose addresses the data holds.
    pub data_decls: PrimaryMap<ir::GlobalValue, ModuleRelocTarget>,
    /// Function addresses to write at these offsets.
    pub function_relocs: Vec<(CodeOffset, ir::FuncRef)>,
    /// Data addresses (plus an addend) to write at these offsets.
    pub data_relocs: Vec<(CodeOffset, ir::GlobalValue, Addend)>,
    /// Object-file section (ignored by a JIT, as by cranelift-jit).
    pub custom_section: Option<String>,
    /// Alignment in bytes; `None`: the module's default.
    pub align: Option<u64>,
    /// Whether a linker should keep the object (ignored by a JIT).
    pub used: bool,
}

impl Default for DataDescription {
    fn default() -> Self {
        Self::new()
    }
}

impl DataDescription {
    /// A description with nothing specified.
    #[must_use]
    pub fn new() -> Self {
        Self {
            init: Init::Uninitialized,
            function_decls: PrimaryMap::new(),
            data_decls: PrimaryMap::new(),
            function_relocs: Vec::new(),
            data_relocs: Vec::new(),
            custom_section: None,
            align: None,
            used: false,
        }
    }

    /// Forgets everything, for reuse.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// `size` zero bytes.
    pub fn define_zeroinit(&mut self, size: usize) {
        self.init = Init::Zeros { size };
    }

    /// These contents.
    pub fn define(&mut self, contents: Box<[u8]>) {
        self.init = Init::Bytes { contents };
    }

    /// Names a section (kept for object files; a JIT ignores it).
    pub fn set_custom_section(&mut self, section: &str) {
        self.custom_section = Some(section.to_owned());
    }

    /// Alignment in bytes; [`define_data`](crate::Module::define_data) refuses one that is not
    /// a power of two (`cranelift-module` panics here).
    pub fn set_align(&mut self, align: u64) {
        self.align = Some(align);
    }

    /// Whether a linker should keep the object.
    pub fn set_used(&mut self, used: bool) {
        self.used = used;
    }

    /// Declares a function whose address the data will hold.
    pub fn import_function(&mut self, name: ModuleRelocTarget) -> ir::FuncRef {
        self.function_decls.push(name)
    }

    /// Declares a data object whose address the data will hold.
    pub fn import_global_value(&mut self, name: ModuleRelocTarget) -> ir::GlobalValue {
        self.data_decls.push(name)
    }

    /// Writes `func`'s address at `offset`.
    pub fn write_function_addr(&mut self, offset: CodeOffset, func: ir::FuncRef) {
        self.function_relocs.push((offset, func));
    }

    /// Writes `data`'s address plus `addend` at `offset`.
    pub fn write_data_addr(&mut self, offset: CodeOffset, data: ir::GlobalValue, addend: Addend) {
        self.data_relocs.push((offset, data, addend));
    }

    /// Every address to write: `(offset, target, addend)`, `None` for a reference to a
    /// declaration this description does not hold.
    pub fn all_relocs(
        &self,
    ) -> impl Iterator<Item = (CodeOffset, Option<&ModuleRelocTarget>, Addend)> + '_ {
        let functions = self
            .function_relocs
            .iter()
            .map(|&(offset, f)| (offset, self.function_decls.get(f), 0));
        let data = self
            .data_relocs
            .iter()
            .map(|&(offset, d, addend)| (offset, self.data_decls.get(d), addend));
        functions.chain(data)
    }
}
