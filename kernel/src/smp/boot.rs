//! Starting the application processors: INIT-SIPI-SIPI through a real-mode trampoline.
//!
//! The trampoline is copied to a free page below 1 MiB (the SIPI vector names a page there). It
//! enters long mode directly from real mode — PAE, the kernel's CR3, EFER.LME|NXE, then CR0.PE|PG|WP
//! in one write — and far-jumps into `ap_entry64` in the kernel's text, which loads the stack the
//! boot CPU allocated and calls [`ap_main`]. The boot CPU starts one AP at a time, so the hand-over
//! statics below are never shared by two starting APs.
//!
//! The trampoline page is executable only while APs start: before the first SIPI its identity
//! page becomes R+X and its direct-map page read-only (W^X holds throughout); afterwards both go
//! not present, are shot down on every CPU, and only then become RW+NX
//! ([`layout::retire_trampoline`]).

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;
use x86_64::registers::control::{Cr0, Cr0Flags, Cr3, Efer, EferFlags};

use super::{work, APIC_IDS, ONLINE, STARTED};
use crate::cpu::gdt::{self, IstStacks, IST_STACK_SIZE};
use crate::cpu::interrupts;
use crate::cpu::percpu::{self, MAX_CPUS};
use crate::cpu::time::{self, Deadline};
use crate::memory::layout;
use crate::memory::{self, STACKS_BASE};
use crate::smp::apic;
use crate::smp::madt::CpuList;
use crate::{println, BootInfo};

/// Kernel stack of each AP.
const KERNEL_STACK_PAGES: u64 = 16;
/// Virtual space per CPU at [`STACKS_BASE`]: kernel, #DF and NMI stacks, each over a guard page.
const STACKS_SPAN: u64 = 1 << 20;
/// How long an AP may take to come online (TCG with more vCPUs than host cores is slow).
const START_TIMEOUT: Duration = Duration::from_secs(10);

global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .code16
    .global ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    /* CR4: PAE, OSFXSR, OSXMMEXCPT (as the boot CPU's). */
    movl $0x620, %eax
    movl %eax, %cr4
    movl (ap_tramp_cr3 - ap_trampoline_start), %eax
    movl %eax, %cr3
    /* EFER: LME and NXE. */
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x900, %eax
    wrmsr
    lgdtl (ap_tramp_gdtr - ap_trampoline_start)
    /* CR0: PG, WP, NE, ET, MP, PE (caching on: CD and NW clear). */
    movl $0x80010033, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_entry64
    .balign 8
    .global ap_tramp_gdt
ap_tramp_gdt:
    /* Accessed bits preset: the page is read-only when the CPU loads these descriptors. */
    .quad 0
    .quad 0x00AF9B000000FFFF    /* 0x08: 64-bit ring-0 code */
    .quad 0x00CF93000000FFFF    /* 0x10: data */
    .global ap_tramp_gdtr
ap_tramp_gdtr:
    .word 23
    .long 0                     /* patched: physical address of ap_tramp_gdt */
    .global ap_tramp_cr3
ap_tramp_cr3:
    .long 0                     /* patched: the kernel's PML4 */
    .global ap_trampoline_end
ap_trampoline_end:
    .code64

    .section .text
    .global ap_entry64
ap_entry64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq {stack}(%rip), %rsp
    xorl %ebp, %ebp
    call {main}
    ud2
"#,
    stack = sym AP_STACK_TOP,
    main = sym ap_main,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_tramp_gdtr: u8;
    static ap_tramp_cr3: u8;
    static ap_tramp_gdt: u8;
}

/// Stack top for the AP being started (read by `ap_entry64`).
static AP_STACK_TOP: AtomicU64 = AtomicU64::new(0);
/// Index the AP being started takes.
static AP_INDEX: AtomicUsize = AtomicUsize::new(0);
/// Its IST stack tops.
static AP_DOUBLE_FAULT_TOP: AtomicU64 = AtomicU64::new(0);
static AP_NMI_TOP: AtomicU64 = AtomicU64::new(0);
/// Set once start-up is over: an AP that wakes later (after its timeout) parks instead of
/// running on hand-over values meant for another.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// A free page below 1 MiB for the trampoline: inside usable RAM, clear of the boot structures
/// and of page 0 (the real-mode IVT and BIOS data).
fn trampoline_page(boot: &BootInfo) -> Option<u64> {
    (1..0x9F).map(|p| p << 12).find(|&page| {
        let end = page + 4096;
        boot.memory_regions()
            .iter()
            .any(|r| r.usable && r.start <= page && end <= r.end)
            && boot
                .boot_structures
                .iter()
                .all(|&(s, e)| e <= page || s >= end)
    })
}

/// Copies the trampoline to `page` (through the direct map) and patches its GDT base and CR3.
fn install_trampoline(page: u64) {
    // Only addresses of the assembly's labels are taken.
    let start = &raw const ap_trampoline_start as usize;
    let len = &raw const ap_trampoline_end as usize - start;
    let gdtr = &raw const ap_tramp_gdtr as usize - start;
    let cr3 = &raw const ap_tramp_cr3 as usize - start;
    let gdt = &raw const ap_tramp_gdt as usize - start;
    assert!(len <= 4096, "the AP trampoline fits a page");
    let dst = memory::phys_to_virt(x86_64::PhysAddr::new(page)).as_mut_ptr::<u8>();
    let pml4 = Cr3::read().0.start_address().as_u64();
    assert!(
        pml4 < 1 << 32,
        "the real-mode trampoline loads a 32-bit CR3"
    );
    // SAFETY: `page` is a free low page reserved for the trampoline, writable through the direct
    // map (not yet flipped to read-only); the source is the assembled trampoline in rodata; the
    // patched fields lie inside the copied bytes (offsets of labels before its end).
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, dst, len);
        dst.add(gdtr + 2)
            .cast::<u32>()
            .write_unaligned((page + gdt as u64) as u32);
        dst.add(cr3).cast::<u32>().write_unaligned(pml4 as u32);
    }
}

/// Maps CPU `cpu`'s kernel, #DF and NMI stacks (each over an unmapped guard page).
fn map_stacks(cpu: usize) -> Result<(u64, IstStacks), &'static str> {
    let base = STACKS_BASE + cpu as u64 * STACKS_SPAN;
    let ist_pages = (IST_STACK_SIZE / 4096) as u64;
    let kernel_top = base + (1 + KERNEL_STACK_PAGES) * 4096;
    let df_top = kernel_top + (1 + ist_pages) * 4096;
    let nmi_top = df_top + (1 + ist_pages) * 4096;
    memory::map_stack(kernel_top, KERNEL_STACK_PAGES)?;
    let double_fault = memory::map_stack(df_top, ist_pages)?;
    let nmi = memory::map_stack(nmi_top, ist_pages)?;
    Ok((kernel_top, IstStacks { double_fault, nmi }))
}

/// Starts every AP in `list` (boot CPU, once). Prints a line for an AP that did not start.
pub(super) fn start_aps(list: &CpuList, boot: &BootInfo) {
    if list.ignored > 0 {
        println!(
            "smp: {} CPUs beyond {MAX_CPUS} or x2APIC-only left off",
            list.ignored
        );
    }
    let bsp = apic::id();
    let aps = list.apic_ids[..list.count].iter().filter(|&&id| id != bsp);
    if aps.clone().next().is_none() {
        return;
    }
    let Some(page) = trampoline_page(boot) else {
        println!("smp: no free page below 1 MiB for the AP trampoline; running on one CPU");
        return;
    };
    // Low frames are never handed out (the allocator starts at 1 MiB); say so explicitly.
    memory::frames().reserve(page, page + 4096);
    install_trampoline(page);
    layout::set_trampoline_executable(page);

    let mut next = 1;
    for &id in aps {
        let stacks = match map_stacks(next) {
            Ok(s) => s,
            Err(why) => {
                println!("smp: no stacks for cpu {next} ({why}); not starting more CPUs");
                break;
            }
        };
        AP_INDEX.store(next, Ordering::SeqCst);
        AP_STACK_TOP.store(stacks.0, Ordering::SeqCst);
        AP_DOUBLE_FAULT_TOP.store(stacks.1.double_fault.as_u64(), Ordering::SeqCst);
        AP_NMI_TOP.store(stacks.1.nmi.as_u64(), Ordering::SeqCst);
        APIC_IDS[next].store(id, Ordering::SeqCst);
        if !start_one(id, page, next) {
            println!("smp: CPU with APIC ID {id} did not start; not starting more CPUs");
            break;
        }
        next += 1;
    }
    CLOSED.store(true, Ordering::SeqCst);
    STARTED.store(next, Ordering::SeqCst);

    // Not present, shot down, then RW+NX: never writable on one CPU while executable on another.
    layout::retire_trampoline(page, |pages| super::shootdown(pages, false));
}

/// INIT, then up to two SIPIs (the second only if the first was not taken), then waits for the
/// AP to come online.
fn start_one(apic_id: u32, page: u64, cpu: usize) -> bool {
    let online = || ONLINE.load(Ordering::SeqCst) & (1 << cpu) != 0;
    apic::send_init(apic_id);
    time::spin_for(Duration::from_millis(10));
    apic::send_startup(apic_id, (page >> 12) as u8);
    time::spin_for(Duration::from_micros(200));
    if !online() {
        // Ignored by an AP that already left wait-for-SIPI.
        apic::send_startup(apic_id, (page >> 12) as u8);
    }
    let deadline = Deadline::after(START_TIMEOUT);
    while !online() {
        if deadline.expired() {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Rust entry of an AP, on its own kernel stack, in long mode on the kernel's page tables.
extern "C" fn ap_main() -> ! {
    let cpu = AP_INDEX.load(Ordering::SeqCst);
    percpu::init_cpu(cpu);
    if CLOSED.load(Ordering::SeqCst) {
        park();
    }
    let stacks = IstStacks {
        double_fault: x86_64::VirtAddr::new(AP_DOUBLE_FAULT_TOP.load(Ordering::SeqCst)),
        nmi: x86_64::VirtAddr::new(AP_NMI_TOP.load(Ordering::SeqCst)),
    };
    gdt::init(cpu, stacks);
    interrupts::init();
    // The trampoline set both; codespace relies on them on every CPU.
    if !Efer::read().contains(EferFlags::NO_EXECUTE_ENABLE)
        || !Cr0::read().contains(Cr0Flags::WRITE_PROTECT)
    {
        println!("cpu {cpu}: EFER.NXE or CR0.WP is off; parking it");
        park();
    }
    apic::enable_local(false);
    // The boot CPU only waits for ONLINE meanwhile: the PIT is this CPU's (see `apic`).
    apic::calibrate_timer();
    // Online first, then flush: see the ipi module ("CPUs coming online").
    ONLINE.fetch_or(1 << cpu, Ordering::SeqCst);
    crate::cpu::percpu::note_several_cpus_online();
    x86_64::instructions::tlb::flush_all();
    work::idle_loop(cpu)
}

fn park() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
