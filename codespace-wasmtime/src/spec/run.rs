//! Running the steps of one file on a wasmtime: the host tool runs them as the reference, a
//! kernel runs them and compares. Everything a file's steps create lives in one [`FileRun`] (one
//! `Store`), which moves between CPUs as a whole between steps.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use wasmtime::{
    Engine, Global, GlobalType, Instance, Linker, Memory, MemoryType, Module, Mutability, Ref,
    RefType, Store, Table, TableType, Trap, Val, ValType,
};

use super::{Action, Outcome, Value};

/// The state of one file's run: its store (every instance it made), the linker with `spectest`
/// and the registered instances, the named instances and the current one.
pub struct FileRun {
    store: Store<()>,
    linker: Linker<()>,
    named: BTreeMap<String, Instance>,
    current: Option<Instance>,
}

impl core::fmt::Debug for FileRun {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FileRun")
            .field("named", &self.named.keys())
            .finish_non_exhaustive()
    }
}

/// Defines the spec interpreter's `spectest` module in `linker`, its items in `store`: the print
/// functions (which print nothing), globals of 666 and 666.6, a funcref table of 10 to 20 and a
/// memory of 1 to 2 pages.
///
/// # Errors
/// wasmtime's, when a definition fails (out of memory).
pub fn spectest(linker: &mut Linker<()>, store: &mut Store<()>) -> wasmtime::Result<()> {
    linker.func_wrap("spectest", "print", || {})?;
    linker.func_wrap("spectest", "print_i32", |_: i32| {})?;
    linker.func_wrap("spectest", "print_i64", |_: i64| {})?;
    linker.func_wrap("spectest", "print_f32", |_: f32| {})?;
    linker.func_wrap("spectest", "print_f64", |_: f64| {})?;
    linker.func_wrap("spectest", "print_i32_f32", |_: i32, _: f32| {})?;
    linker.func_wrap("spectest", "print_f64_f64", |_: f64, _: f64| {})?;
    let globals = [
        ("global_i32", ValType::I32, Val::I32(666)),
        ("global_i64", ValType::I64, Val::I64(666)),
        ("global_f32", ValType::F32, Val::F32(666.6f32.to_bits())),
        ("global_f64", ValType::F64, Val::F64(666.6f64.to_bits())),
    ];
    for (name, ty, val) in globals {
        let g = Global::new(&mut *store, GlobalType::new(ty, Mutability::Const), val)?;
        linker.define(&mut *store, "spectest", name, g)?;
    }
    let table = Table::new(
        &mut *store,
        TableType::new(RefType::FUNCREF, 10, Some(20)),
        Ref::Func(None),
    )?;
    linker.define(&mut *store, "spectest", "table", table)?;
    let memory = Memory::new(&mut *store, MemoryType::new(1, Some(2)))?;
    linker.define(&mut *store, "spectest", "memory", memory)?;
    Ok(())
}

/// The outcome of a wasmtime error: a trap's code, or `other` for anything else.
fn error_outcome(e: &wasmtime::Error, other: impl FnOnce() -> Outcome) -> Outcome {
    match e.downcast_ref::<Trap>() {
        Some(trap) => Outcome::Trap(format!("{trap:?}")),
        None => other(),
    }
}

fn to_val(v: Value) -> Result<Val, String> {
    Ok(match v {
        Value::I32(x) => Val::I32(x as i32),
        Value::I64(x) => Val::I64(x as i64),
        Value::F32(x) => Val::F32(x),
        Value::F64(x) => Val::F64(x),
        Value::V128(x) => Val::V128(x.into()),
        Value::FuncRef(false) => Val::FuncRef(None),
        Value::ExternRef(false) => Val::ExternRef(None),
        Value::FuncRef(true) | Value::ExternRef(true) => {
            return Err("a non-null reference argument".to_string())
        }
    })
}

fn from_val(v: &Val) -> Result<Value, String> {
    Ok(match v {
        Val::I32(x) => Value::I32(*x as u32),
        Val::I64(x) => Value::I64(*x as u64),
        Val::F32(x) => Value::F32(*x),
        Val::F64(x) => Value::F64(*x),
        Val::V128(x) => Value::V128(x.as_u128()),
        Val::FuncRef(f) => Value::FuncRef(f.is_some()),
        Val::ExternRef(r) => Value::ExternRef(r.is_some()),
        other => return Err(format!("a result of unsupported type {other:?}")),
    })
}

impl FileRun {
    /// A fresh store on `engine` with `spectest` defined.
    ///
    /// # Errors
    /// wasmtime's, when the store's items cannot be made.
    pub fn new(engine: &Engine) -> wasmtime::Result<Self> {
        let mut store = Store::new(engine, ());
        let mut linker = Linker::new(engine);
        linker.allow_shadowing(true);
        spectest(&mut linker, &mut store)?;
        Ok(FileRun {
            store,
            linker,
            named: BTreeMap::new(),
            current: None,
        })
    }

    fn instance(&self, id: Option<&String>) -> Result<Instance, Outcome> {
        match id {
            Some(id) => self.named.get(id).copied(),
            None => self.current,
        }
        .ok_or_else(|| Outcome::Failed(format!("no instance {id:?}")))
    }

    /// Runs `action`, instantiating from `modules` (the file's modules, in bundle order).
    pub fn step(&mut self, action: &Action, modules: &[Module]) -> Outcome {
        match self.try_step(action, modules) {
            Ok(outcome) | Err(outcome) => outcome,
        }
    }

    fn try_step(&mut self, action: &Action, modules: &[Module]) -> Result<Outcome, Outcome> {
        Ok(match action {
            Action::Skip(_) => Outcome::Skipped,
            Action::Instantiate { module, id } => {
                let module = modules
                    .get(*module as usize)
                    .ok_or_else(|| Outcome::Failed(format!("no module {module}")))?;
                match self.linker.instantiate(&mut self.store, module) {
                    Ok(instance) => {
                        self.current = Some(instance);
                        if let Some(id) = id {
                            self.named.insert(id.clone(), instance);
                        }
                        Outcome::Values(Vec::new())
                    }
                    Err(e) => error_outcome(&e, || Outcome::Unlinkable),
                }
            }
            Action::Register { name, id } => {
                let instance = self.instance(id.as_ref())?;
                self.linker
                    .instance(&mut self.store, name, instance)
                    .map_err(|e| Outcome::Failed(format!("register: {e}")))?;
                Outcome::Values(Vec::new())
            }
            Action::Get { id, global } => {
                let instance = self.instance(id.as_ref())?;
                let g = instance
                    .get_global(&mut self.store, global)
                    .ok_or_else(|| Outcome::Failed(format!("no global {global}")))?;
                let v = g.get(&mut self.store);
                Outcome::Values(alloc::vec![from_val(&v).map_err(Outcome::Failed)?])
            }
            Action::Invoke { id, func, args } => {
                let instance = self.instance(id.as_ref())?;
                let f = instance
                    .get_func(&mut self.store, func)
                    .ok_or_else(|| Outcome::Failed(format!("no function {func}")))?;
                let params = args
                    .iter()
                    .map(|&a| to_val(a))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(Outcome::Failed)?;
                let mut results: Vec<Val> =
                    f.ty(&self.store).results().map(|_| Val::I32(0)).collect();
                match f.call(&mut self.store, &params, &mut results) {
                    Ok(()) => Outcome::Values(
                        results
                            .iter()
                            .map(from_val)
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(Outcome::Failed)?,
                    ),
                    Err(e) => error_outcome(&e, || Outcome::Failed(format!("{e}"))),
                }
            }
        })
    }
}
