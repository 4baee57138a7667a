//! wasmtime in this kernel, through `codespace-wasmtime`: the [`Platform`] (per-CPU slots,
//! interrupt control, the wasm address-space slot), the CPU feature check against the ISA flags
//! precompiled modules use, and the kernel-side wasmtime `Config`.

pub mod memory;

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;

use codespace::module::{CodeModule, ModuleConfig, ModuleError};
use codespace::{AddressRange, CodeError, CodeManager, ManagerConfig};
use codespace_wasmtime::WasmCode;

use codespace::mmu::x86::X86_INTERRUPTS;
use codespace_wasmtime::wasmtime;
use codespace_wasmtime::{settings, Access, CpuSlots, InterruptControl, MemoryError, Platform};
use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags};

use crate::code::{self, KernelMmu, REGISTRIES};
use crate::cpu::percpu::PerCpu;

/// Every CPU's slots for codespace-wasmtime.
static SLOTS: PerCpu<CpuSlots> = crate::per_cpu!(CpuSlots::new());

/// The kernel as codespace-wasmtime's platform.
struct Kernel;

// SAFETY: `cpu` returns the calling CPU's own `CpuSlots` (GS-based index, fixed per CPU, static
// storage); `X86_INTERRUPTS` uses cli/sti with the saved IF; the memory functions reserve in the
// wasm slot, which nothing else maps, map only fresh zeroed frames, never executable, and free a
// frame only after its page was invalidated on every CPU.
unsafe impl Platform for Kernel {
    fn cpu(&self) -> &CpuSlots {
        SLOTS.this()
    }

    fn interrupts(&self) -> InterruptControl {
        X86_INTERRUPTS
    }

    fn reserve(&self, len: usize, access: Access) -> Result<NonNull<u8>, MemoryError> {
        memory::reserve(len, access)
    }

    unsafe fn set_access(
        &self,
        start: usize,
        len: usize,
        access: Access,
    ) -> Result<(), MemoryError> {
        memory::set_access(start, len, access)
    }

    unsafe fn discard(&self, start: usize, len: usize, access: Access) -> Result<(), MemoryError> {
        memory::discard(start, len, access)
    }

    unsafe fn release(&self, start: usize, len: usize) -> Result<(), MemoryError> {
        memory::release(start, len)
    }
}

static KERNEL: Kernel = Kernel;

/// Installs the kernel as codespace-wasmtime's platform (once; later calls do nothing).
pub fn init() {
    let _ = codespace_wasmtime::install(&KERNEL);
}

/// wasmtime's `detect_host_feature`, answered from this CPU's CPUID.
#[must_use]
pub fn detect_host_feature(feature: &str) -> Option<bool> {
    let leaf1 = core::arch::x86_64::__cpuid(1);
    let (ecx, edx) = (leaf1.ecx, leaf1.edx);
    let bit = |reg: u32, n: u32| Some(reg & (1 << n) != 0);
    match feature {
        "sse3" => bit(ecx, 0),
        "ssse3" => bit(ecx, 9),
        "sse4.1" => bit(ecx, 19),
        "sse4.2" => bit(ecx, 20),
        "popcnt" => bit(ecx, 23),
        "cmpxchg16b" => bit(ecx, 13),
        "fma" => bit(ecx, 12),
        "avx" => bit(ecx, 28),
        "sse2" => bit(edx, 26),
        _ => Some(false),
    }
}

/// Why this CPU cannot run precompiled wasm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CpuError {
    /// CR4.OSFXSR or CR4.OSXMMEXCPT is clear: SSE instructions raise #UD.
    SseDisabled,
    /// CR0.EM or CR0.TS is set: SSE instructions raise #UD or #NM.
    FpuTrapping,
    /// CPUID lacks a feature the modules are compiled for (wasmtime's host feature name).
    MissingFeature(&'static str),
}

/// Checks that this CPU runs code compiled with [`settings::ISA_FLAGS`]: SSE enabled by the
/// kernel (CR0, CR4) and every feature present (CPUID).
///
/// # Errors
/// The first missing piece.
pub fn check_cpu() -> Result<(), CpuError> {
    let cr4 = Cr4::read();
    if !cr4.contains(Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE) {
        return Err(CpuError::SseDisabled);
    }
    let cr0 = Cr0::read();
    if cr0.intersects(Cr0Flags::EMULATE_COPROCESSOR | Cr0Flags::TASK_SWITCHED) {
        return Err(CpuError::FpuTrapping);
    }
    for flag in settings::ISA_FLAGS {
        let feature = match *flag {
            "has_sse3" => "sse3",
            "has_ssse3" => "ssse3",
            "has_sse41" => "sse4.1",
            "has_sse42" => "sse4.2",
            "has_popcnt" => "popcnt",
            _ => return Err(CpuError::MissingFeature("unknown flag")),
        };
        if detect_host_feature(feature) != Some(true) {
            return Err(CpuError::MissingFeature(feature));
        }
    }
    Ok(())
}

/// The kernel's wasmtime `Config`: the shared settings, CPUID feature detection, and (once
/// given) codespace as the code memory.
#[must_use]
pub fn config() -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    settings::apply_shared(&mut config);
    // SAFETY: `detect_host_feature` answers from this CPU's CPUID, and every CPU of this kernel
    // is the same model (QEMU `-cpu`), so a feature it reports present is present everywhere.
    unsafe {
        config.detect_host_feature(detect_host_feature);
    }
    config
}

/// Where a wasm memory access may fault: the wasm slot (every linear memory's reservation and
/// guard) and the unmapped null page (null funcref loads, Spectre-guarded bounds checks).
#[must_use]
pub fn fault_ranges() -> Vec<AddressRange> {
    vec![
        AddressRange::new(memory::WASM_BASE, memory::WASM_BASE + memory::WASM_SIZE),
        AddressRange::new(0, 4096),
    ]
}

/// Why [`runtime`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The code manager over the window.
    Manager(CodeError),
    /// The codespace module.
    Module(ModuleError),
    /// wasmtime refused the configuration.
    Engine(wasmtime::Error),
}

/// A wasmtime engine whose code lives in a codespace module over `window`.
#[derive(Debug)]
pub struct Runtime {
    /// The code memory (images placed, trap sites registered).
    pub code: Arc<WasmCode<KernelMmu>>,
    /// The engine to load and run modules with.
    pub engine: wasmtime::Engine,
}

/// Builds a [`Runtime`] over the code-window slice `window`.
///
/// # Errors
/// [`RuntimeError`].
pub fn runtime(window: AddressRange) -> Result<Runtime, RuntimeError> {
    runtime_with(window, config())
}

/// A [`Runtime`] whose engine uses `config` (plus the code memory) instead of [`config`]: for
/// tests of what a mismatched engine does with a module.
///
/// # Errors
/// [`RuntimeError`].
pub fn runtime_with(
    window: AddressRange,
    config: wasmtime::Config,
) -> Result<Runtime, RuntimeError> {
    let manager = code::manager(window, ManagerConfig::default()).map_err(RuntimeError::Manager)?;
    runtime_in(&manager, config)
}

/// A [`Runtime`] whose code lives in a new module of an existing `manager` (the demo shares its
/// code window with the rest of its tour), with engine configuration `config`.
///
/// # Errors
/// [`RuntimeError`].
pub fn runtime_in(
    manager: &CodeManager<KernelMmu>,
    config: wasmtime::Config,
) -> Result<Runtime, RuntimeError> {
    let module = CodeModule::new(
        manager,
        &REGISTRIES,
        code::module_config(manager, ModuleConfig::default()),
    )
    .map_err(RuntimeError::Module)?;
    runtime_of(Arc::new(module), config)
}

/// A [`Runtime`] whose code lives in `module` (made with the configuration the caller wants,
/// such as `ModuleConfig::rox`), with engine configuration `config`.
///
/// # Errors
/// [`RuntimeError::Engine`].
pub fn runtime_of(
    module: Arc<CodeModule<KernelMmu>>,
    mut config: wasmtime::Config,
) -> Result<Runtime, RuntimeError> {
    let code = WasmCode::new(module, fault_ranges());
    config.with_custom_code_memory(Some(code.clone()));
    let engine = wasmtime::Engine::new(&config).map_err(RuntimeError::Engine)?;
    Ok(Runtime { code, engine })
}
