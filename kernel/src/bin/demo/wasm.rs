//! The tour's wasmtime step: a WebAssembly module compiled ahead of time on the host
//! (`codespace-wasm-precompile`, handed over as a Multiboot module), loaded into codespace with
//! only its text executable, called, and trapping through codespace's trap table back into
//! wasmtime, which reports its trap code.

use alloc::format;
use alloc::string::String;

use codespace::CodeManager;
use codespace_kernel::code::{self, KernelMmu};
use codespace_kernel::{println, wasm};
use codespace_wasmtime::wasmtime::{Instance, Store, Trap};

/// Loads `basic.cwasm` into a module of `manager`, calls it and makes it trap.
pub fn tour(manager: &CodeManager<KernelMmu>) -> Result<(), String> {
    let cwasm = codespace_kernel::boot_info()
        .module("basic.cwasm")
        .ok_or(
            "Multiboot module basic.cwasm missing: boot through `cargo run`, which precompiles \
             kernel/tests/wasm/basic.wat",
        )?
        .bytes();
    wasm::check_cpu().map_err(|e| format!("this CPU cannot run the module: {e:?}"))?;
    let rt = wasm::runtime_in(manager, wasm::config()).map_err(|e| format!("{e:?}"))?;
    // SAFETY: the engine was built with `rt.code`; the container comes from the host tool and
    // its header, settings fingerprint and checksum are checked before wasmtime reads it.
    let module = unsafe { rt.code.load(&rt.engine, cwasm) }.map_err(|e| format!("{e:?}"))?;
    let image = rt.code.image_ranges()[0];
    let text = module.text();
    println!(
        "    basic.cwasm ({} bytes, precompiled on the host for x86_64-unknown-none) placed at \
         {:#x}..{:#x}; only its text {:#x}+{:#x} is executable",
        cwasm.len(),
        image.start(),
        image.end(),
        text.as_ptr() as usize,
        text.len()
    );
    let mut store = Store::new(&rt.engine, ());
    let err = |e: codespace_wasmtime::wasmtime::Error| format!("{e:?}");
    let instance = Instance::new(&mut store, &module, &[]).map_err(err)?;
    let add = instance
        .get_typed_func::<(i32, i32), i32>(&mut store, "add")
        .map_err(err)?;
    println!(
        "    call: add(40, 2) = {}",
        add.call(&mut store, (40, 2)).map_err(err)?
    );
    for (name, arg, vector, call) in [
        ("div_u", (7, 0), 0u8, "div_u(7, 0)"),
        ("load", (65533, 0), 14, "load(65533)"),
    ] {
        let hits = code::trap_hits(vector);
        let trap = if name == "div_u" {
            let f = instance
                .get_typed_func::<(i32, i32), i32>(&mut store, name)
                .map_err(err)?;
            f.call(&mut store, arg).map(|_| ())
        } else {
            let f = instance
                .get_typed_func::<i32, i32>(&mut store, name)
                .map_err(err)?;
            f.call(&mut store, arg.0).map(|_| ())
        };
        let e = trap.err().ok_or_else(|| format!("{name} did not trap"))?;
        let code = e
            .downcast_ref::<Trap>()
            .ok_or_else(|| format!("{name}: not a wasm trap: {e:?}"))?;
        println!(
            "    trap: {call} -> wasmtime {code:?} (\"{code}\"), through codespace's trap table \
             (vector {vector} hits +{})",
            code::trap_hits(vector) - hits
        );
    }
    println!(
        "    the store still works after the traps: add(1, 2) = {}",
        add.call(&mut store, (1, 2)).map_err(err)?
    );
    Ok(())
}
