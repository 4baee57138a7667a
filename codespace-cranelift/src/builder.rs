//! [`JITBuilder`]: what a [`JITModule`](crate::JITModule) is made from (`cranelift_jit::JITBuilder`),
//! and [`Codespace`]: where its code goes.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use codespace::mmu::Mmu;
use codespace::module::Registries;
use codespace::{AddressRange, CodeManager};
use cranelift_codegen::ir;
use cranelift_codegen::isa::OwnedTargetIsa;

use crate::kernel::Kernel;

/// A symbol lookup function: the address of a kernel symbol by name.
pub type SymbolLookup = Box<dyn Fn(&str) -> Option<*const u8> + Send + Sync>;

/// The names library calls are resolved by ([`default_libcall_names`](crate::default_libcall_names)).
pub type LibcallNames = Box<dyn Fn(ir::LibCall) -> String + Send + Sync>;

/// Slots of a module unless [`JITBuilder::max_functions`] says otherwise.
pub const DEFAULT_MAX_FUNCTIONS: u32 = 256;

/// Where a module's code lives and how the kernel runs it: the codespace pieces a
/// [`JITModule`](crate::JITModule) is built over.
pub struct Codespace<'a, M: Mmu + Send + 'static> {
    /// The code window's manager (the module gets its own code spaces in it).
    pub manager: &'a CodeManager<M>,
    /// The registries the kernel's fault handlers consult (trap table, PC lookup, grace domain).
    pub registries: &'static Registries,
    /// The kernel's side: entering code, landing pads, compile stacks, quiescent states.
    pub kernel: &'static dyn Kernel,
}

impl<M: Mmu + Send + 'static> core::fmt::Debug for Codespace<'_, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Codespace").finish_non_exhaustive()
    }
}

/// The settings of a [`JITModule`](crate::JITModule) (`cranelift_jit::JITBuilder`).
pub struct JITBuilder {
    pub(crate) isa: OwnedTargetIsa,
    pub(crate) libcall_names: LibcallNames,
    pub(crate) symbols: BTreeMap<String, usize>,
    pub(crate) lookups: Vec<SymbolLookup>,
    pub(crate) hotswap: bool,
    pub(crate) max_functions: u32,
    pub(crate) fault_ranges: Vec<AddressRange>,
    pub(crate) rox: bool,
}

impl core::fmt::Debug for JITBuilder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("JITBuilder")
            .field("symbols", &self.symbols)
            .field("hotswap", &self.hotswap)
            .field("max_functions", &self.max_functions)
            .field("rox", &self.rox)
            .finish_non_exhaustive()
    }
}

impl JITBuilder {
    /// A builder compiling for `isa` (see [`native::builder`](crate::native::builder)), resolving
    /// library calls by the names `libcall_names` gives them. `is_pic` must be off: calls to
    /// module functions are then `call rel32`, which codespace aims at jump-table slots.
    #[must_use]
    pub fn with_isa(isa: OwnedTargetIsa, libcall_names: LibcallNames) -> Self {
        JITBuilder {
            isa,
            libcall_names,
            symbols: BTreeMap::new(),
            lookups: Vec::new(),
            hotswap: false,
            max_functions: DEFAULT_MAX_FUNCTIONS,
            fault_ranges: Vec::new(),
            rox: false,
        }
    }

    /// Defines symbol `name` at `ptr` (a kernel function or object generated code may use,
    /// declared with [`Linkage::Import`](crate::Linkage::Import)). Takes precedence over the
    /// lookup functions.
    pub fn symbol<K: Into<String>>(&mut self, name: K, ptr: *const u8) -> &mut Self {
        self.symbols.insert(name.into(), ptr as usize);
        self
    }

    /// Defines several symbols.
    pub fn symbols<It, K>(&mut self, symbols: It) -> &mut Self
    where
        It: IntoIterator<Item = (K, *const u8)>,
        K: Into<String>,
    {
        for (name, ptr) in symbols {
            self.symbol(name, ptr);
        }
        self
    }

    /// Adds a lookup for symbols [`symbol`](Self::symbol) did not define; lookups are asked in
    /// reverse order of addition. (`Send + Sync`, unlike cranelift-jit's `Send`: the module is
    /// shared by CPUs.) There is no `dlsym` fallback: a kernel has no dynamic linker.
    pub fn symbol_lookup_fn(&mut self, symbol_lookup_fn: SymbolLookup) -> &mut Self {
        self.lookups.push(symbol_lookup_fn);
        self
    }

    /// Allows redefining finalized functions
    /// ([`prepare_for_function_redefine`](crate::JITModule::prepare_for_function_redefine)):
    /// the new code is installed by patching the function's jump-table slot, and the old code
    /// is freed after a grace period. Off by default, as in cranelift-jit.
    pub fn hotswap(&mut self, enabled: bool) -> &mut Self {
        self.hotswap = enabled;
        self
    }

    /// How many functions (imports included) the module may declare: the number of its
    /// jump-table slots, fixed when the module is created.
    pub fn max_functions(&mut self, functions: u32) -> &mut Self {
        self.max_functions = functions;
        self
    }

    /// Puts the module's code on 2 MiB pages that are read-only and executable from the start
    /// and never writable (codespace's ROX mode, `ModuleConfig::rox`): publishing changes no
    /// page-table entry. Needs a manager with `ManagerConfig::rox_code` (else
    /// [`JITModule::new`](crate::JITModule::new) fails); a code space with no 2 MiB frame
    /// falls back to 4 KiB pages (counted in the manager's stats). Off by default.
    pub fn rox(&mut self, enabled: bool) -> &mut Self {
        self.rox = enabled;
        self
    }

    /// The addresses a trapping load or store of generated code may fault on and still land
    /// (e.g. a heap's reservation with its guard pages). Empty (the default): any address.
    pub fn fault_ranges(&mut self, ranges: &[AddressRange]) -> &mut Self {
        self.fault_ranges = ranges.to_vec();
        self
    }
}
