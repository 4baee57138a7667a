//! What a module has declared: functions, data objects and their names
//! (`cranelift_module::ModuleDeclarations`).

use alloc::borrow::{Cow, ToOwned};
use alloc::collections::btree_map::{BTreeMap, Entry};
use alloc::format;
use alloc::string::String;

use cranelift_codegen::entity::PrimaryMap;
use cranelift_codegen::ir;

use crate::module::{DataId, FuncId, FuncOrDataId, Linkage, ModuleError, ModuleResult};

/// A function that can be called.
#[derive(Debug, Clone)]
pub struct FunctionDeclaration {
    /// Its name, `None` for an anonymous function.
    pub name: Option<String>,
    /// Its linkage.
    pub linkage: Linkage,
    /// Its signature.
    pub signature: ir::Signature,
}

impl FunctionDeclaration {
    /// The linkage name of the function (synthesized for an anonymous one).
    #[must_use]
    pub fn linkage_name(&self, id: FuncId) -> Cow<'_, str> {
        match &self.name {
            Some(name) => Cow::Borrowed(name),
            None => Cow::Owned(format!(".Lfn{:x}", id.as_u32())),
        }
    }
}

/// A data object that can be accessed.
#[derive(Debug, Clone)]
pub struct DataDeclaration {
    /// Its name, `None` for an anonymous object.
    pub name: Option<String>,
    /// Its linkage.
    pub linkage: Linkage,
    /// Whether generated code may write it (else it is read-only once finalized).
    pub writable: bool,
    /// Thread-local (refused: a kernel has no TLS model Cranelift knows).
    pub tls: bool,
}

impl DataDeclaration {
    /// The linkage name of the data object (synthesized for an anonymous one).
    #[must_use]
    pub fn linkage_name(&self, id: DataId) -> Cow<'_, str> {
        match &self.name {
            Some(name) => Cow::Borrowed(name),
            None => Cow::Owned(format!(".Ldata{:x}", id.as_u32())),
        }
    }
}

/// The declarations of a module: names, functions and data objects, by identifier.
#[derive(Debug, Default)]
pub struct ModuleDeclarations {
    names: BTreeMap<String, FuncOrDataId>,
    functions: PrimaryMap<FuncId, FunctionDeclaration>,
    data_objects: PrimaryMap<DataId, DataDeclaration>,
}

impl ModuleDeclarations {
    /// The identifier declared for `name`.
    #[must_use]
    pub fn get_name(&self, name: &str) -> Option<FuncOrDataId> {
        self.names.get(name).copied()
    }

    /// Every function declaration.
    pub fn get_functions(&self) -> impl Iterator<Item = (FuncId, &FunctionDeclaration)> {
        self.functions.iter()
    }

    /// Every data declaration.
    pub fn get_data_objects(&self) -> impl Iterator<Item = (DataId, &DataDeclaration)> {
        self.data_objects.iter()
    }

    /// The declaration of `func_id`, if declared (`cranelift-module` indexes and panics; this
    /// returns `None` for an identifier of another module).
    #[must_use]
    pub fn get_function_decl(&self, func_id: FuncId) -> Option<&FunctionDeclaration> {
        self.functions.get(func_id)
    }

    /// The declaration of `data_id`, if declared.
    #[must_use]
    pub fn get_data_decl(&self, data_id: DataId) -> Option<&DataDeclaration> {
        self.data_objects.get(data_id)
    }

    /// Declares a function (again): a second declaration must have the same signature; the
    /// linkages merge. Returns the identifier and the merged linkage.
    ///
    /// # Errors
    /// [`ModuleError::IncompatibleDeclaration`] for a data object's name,
    /// [`ModuleError::IncompatibleSignature`].
    pub fn declare_function(
        &mut self,
        name: &str,
        linkage: Linkage,
        signature: &ir::Signature,
    ) -> ModuleResult<(FuncId, Linkage)> {
        match self.names.entry(name.to_owned()) {
            Entry::Occupied(entry) => match *entry.get() {
                FuncOrDataId::Func(id) => {
                    let existing = &mut self.functions[id];
                    if &existing.signature != signature {
                        return Err(ModuleError::IncompatibleSignature(
                            name.to_owned(),
                            existing.signature.clone(),
                            signature.clone(),
                        ));
                    }
                    existing.linkage = Linkage::merge(existing.linkage, linkage);
                    Ok((id, existing.linkage))
                }
                FuncOrDataId::Data(_) => Err(ModuleError::IncompatibleDeclaration(name.to_owned())),
            },
            Entry::Vacant(entry) => {
                let id = self.functions.push(FunctionDeclaration {
                    name: Some(name.to_owned()),
                    linkage,
                    signature: signature.clone(),
                });
                entry.insert(FuncOrDataId::Func(id));
                Ok((id, linkage))
            }
        }
    }

    /// Declares an anonymous local function.
    pub fn declare_anonymous_function(&mut self, signature: &ir::Signature) -> FuncId {
        self.functions.push(FunctionDeclaration {
            name: None,
            linkage: Linkage::Local,
            signature: signature.clone(),
        })
    }

    /// Declares a data object (again): linkages merge, writable if either declaration is.
    ///
    /// # Errors
    /// [`ModuleError::IncompatibleDeclaration`] for a function's name, or for a declaration
    /// that changes `tls` (`cranelift-module` panics there).
    pub fn declare_data(
        &mut self,
        name: &str,
        linkage: Linkage,
        writable: bool,
        tls: bool,
    ) -> ModuleResult<(DataId, Linkage)> {
        match self.names.entry(name.to_owned()) {
            Entry::Occupied(entry) => match *entry.get() {
                FuncOrDataId::Data(id) => {
                    let existing = &mut self.data_objects[id];
                    if existing.tls != tls {
                        return Err(ModuleError::IncompatibleDeclaration(name.to_owned()));
                    }
                    existing.linkage = Linkage::merge(existing.linkage, linkage);
                    existing.writable |= writable;
                    Ok((id, existing.linkage))
                }
                FuncOrDataId::Func(_) => Err(ModuleError::IncompatibleDeclaration(name.to_owned())),
            },
            Entry::Vacant(entry) => {
                let id = self.data_objects.push(DataDeclaration {
                    name: Some(name.to_owned()),
                    linkage,
                    writable,
                    tls,
                });
                entry.insert(FuncOrDataId::Data(id));
                Ok((id, linkage))
            }
        }
    }

    /// Declares an anonymous local data object.
    pub fn declare_anonymous_data(&mut self, writable: bool, tls: bool) -> DataId {
        self.data_objects.push(DataDeclaration {
            name: None,
            linkage: Linkage::Local,
            writable,
            tls,
        })
    }
}
