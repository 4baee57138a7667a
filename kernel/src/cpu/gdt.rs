//! Per-CPU GDT and TSS: kernel segments and the IST stacks of #DF and NMI.
//!
//! Only the double fault and the NMI run on IST stacks: a #DF must get a good stack even when the
//! kernel stack overflowed, and an NMI can arrive anywhere. The page fault runs on the interrupted
//! kernel stack, so a nested #PF pushes a new frame instead of overwriting the outer one on a
//! shared IST stack.

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use crate::cpu::percpu::MAX_CPUS;

/// IST slot (1-based in hardware, 0-based here) of the double-fault stack.
pub const DOUBLE_FAULT_IST_INDEX: u16 = 0;
/// IST slot of the NMI stack.
pub const NMI_IST_INDEX: u16 = 1;

/// Size of each of the boot CPU's IST stacks (APs allocate theirs, see `smp::boot`).
pub const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack([u8; IST_STACK_SIZE]);

static mut BSP_DOUBLE_FAULT_STACK: Stack = Stack([0; IST_STACK_SIZE]);
static mut BSP_NMI_STACK: Stack = Stack([0; IST_STACK_SIZE]);

static TSS: [Once<TaskStateSegment>; MAX_CPUS] = [const { Once::new() }; MAX_CPUS];
static GDT: [Once<(GlobalDescriptorTable, Selectors)>; MAX_CPUS] =
    [const { Once::new() }; MAX_CPUS];

#[derive(Debug)]
struct Selectors {
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

/// Tops of a CPU's IST stacks.
#[derive(Debug, Clone, Copy)]
pub struct IstStacks {
    /// Top of the double-fault stack.
    pub double_fault: VirtAddr,
    /// Top of the NMI stack.
    pub nmi: VirtAddr,
}

/// The boot CPU's IST stacks (statics: it loads its GDT before the heap exists).
pub(crate) fn bsp_stacks() -> IstStacks {
    let top = |s: *const Stack| VirtAddr::from_ptr(s) + IST_STACK_SIZE as u64;
    IstStacks {
        double_fault: top(&raw const BSP_DOUBLE_FAULT_STACK),
        nmi: top(&raw const BSP_NMI_STACK),
    }
}

/// Builds CPU `cpu`'s TSS and GDT (once) and loads them with the segment registers. Runs on that
/// CPU; the tables live in statics indexed by `cpu`, so they are never freed or shared.
pub(crate) fn init(cpu: usize, stacks: IstStacks) {
    let tss = TSS[cpu].call_once(|| {
        let mut tss = TaskStateSegment::new();
        tss.interrupt_stack_table[DOUBLE_FAULT_IST_INDEX as usize] = stacks.double_fault;
        tss.interrupt_stack_table[NMI_IST_INDEX as usize] = stacks.nmi;
        tss
    });
    let (gdt, sel) = GDT[cpu].call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, which lives in a static for ever; the TSS
    // descriptor is this CPU's own (a busy TSS cannot be loaded twice, and no other CPU uses it).
    unsafe {
        CS::set_reg(sel.code);
        DS::set_reg(sel.data);
        ES::set_reg(sel.data);
        SS::set_reg(sel.data);
        load_tss(sel.tss);
    }
}
