//! Foundation tests: the CPU protections codespace relies on, the fault path that resumes at a
//! landing pad, the frame allocator and the heap.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use codespace_kernel::cpu::interrupts::{self, FaultInfo, TrapFrame, PAGE_FAULT};
use codespace_kernel::memory::{self, phys_to_virt, SCRATCH_BASE};
use codespace_kernel::memory::{layout, wx_audit};
use codespace_kernel::test::{ExpectFault, PF_INSTRUCTION, PF_PRESENT, PF_WRITE};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::registers::control::{Cr0, Cr0Flags, Efer, EferFlags};
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Mapper, Page, PageTableFlags as F, PhysFrame, Size4KiB,
    Translate,
};
use x86_64::VirtAddr;

codespace_kernel::kernel_tests![
    cpu_protections_are_on,
    read_of_non_present_page_faults_with_cr2,
    write_to_read_only_page_faults,
    fetch_from_nx_page_faults,
    fault_handler_resumes_at_landing_pad_with_r10,
    invalid_opcode_is_caught,
    frame_allocator_hands_out_distinct_usable_frames,
    heap_holds_a_one_mebibyte_vec,
    command_line_reaches_the_kernel,
    identity_map_past_the_kernel_text_is_nx,
    null_page_is_unmapped,
    boot_stack_guard_page_is_unmapped,
    kernel_text_is_read_only_through_every_mapping,
    page_tables_have_no_writable_executable_frame,
    only_the_kernel_text_is_executable,
];

fn scratch_page(n: u64) -> Page<Size4KiB> {
    Page::containing_address(VirtAddr::new(SCRATCH_BASE + n * 4096))
}

/// Maps a fresh zeroed frame at scratch page `n`.
fn map_scratch(n: u64, flags: F) -> Page<Size4KiB> {
    let page = scratch_page(n);
    memory::map_fresh_page(page.start_address().as_u64(), flags).expect("scratch page");
    page
}

fn unmap_scratch(page: Page<Size4KiB>) {
    let (frame, flush) = memory::page_table().unmap(page).expect("page was mapped");
    flush.flush();
    // SAFETY: the frame is no longer mapped anywhere.
    unsafe { memory::frames().deallocate_frame(frame) };
}

fn cpu_protections_are_on() {
    assert!(
        Cr0::read().contains(Cr0Flags::WRITE_PROTECT),
        "CR0.WP is off"
    );
    assert!(
        Efer::read().contains(EferFlags::NO_EXECUTE_ENABLE),
        "EFER.NXE is off"
    );
    assert!(Cr0::read().contains(Cr0Flags::PAGING));
}

fn read_of_non_present_page_faults_with_cr2() {
    let addr = scratch_page(7).start_address().as_u64() + 0x123;
    let info = ExpectFault::page_fault(addr)
        .without_bits(PF_PRESENT | PF_WRITE | PF_INSTRUCTION)
        .run(|| {
            // SAFETY: deliberately reads an unmapped address; the fault is caught.
            let _ = unsafe { core::ptr::read_volatile(addr as *const u8) };
        });
    assert_eq!(info.cr2, addr);
    assert_eq!(info.error_code & 0x1f, 0);
}

fn write_to_read_only_page_faults() {
    let page = map_scratch(1, F::PRESENT | F::NO_EXECUTE);
    let addr = page.start_address().as_u64() + 8;
    // SAFETY: the page is mapped readable.
    assert_eq!(unsafe { core::ptr::read_volatile(addr as *const u64) }, 0);
    let info = ExpectFault::page_fault(addr)
        .with_bits(PF_PRESENT | PF_WRITE)
        .run(|| {
            // SAFETY: deliberately writes a read-only page; the fault is caught.
            unsafe { core::ptr::write_volatile(addr as *mut u64, 0xdead) };
        });
    assert_eq!(info.error_code & PF_INSTRUCTION, 0);
    unmap_scratch(page);
}

fn fetch_from_nx_page_faults() {
    let page = map_scratch(2, F::PRESENT | F::WRITABLE | F::NO_EXECUTE);
    let addr = page.start_address().as_u64();
    // SAFETY: the page is mapped writable; 0xC3 is `ret`.
    unsafe { core::ptr::write_volatile(addr as *mut u8, 0xC3) };
    let info = ExpectFault::page_fault(addr)
        .with_bits(PF_PRESENT | PF_INSTRUCTION)
        .run(|| {
            // SAFETY: deliberately calls into an NX page; the fetch faults before anything runs.
            let f: extern "C" fn() = unsafe { core::mem::transmute(addr as usize) };
            f();
        });
    assert_eq!(
        info.rip, addr,
        "the fault is reported at the fetched address"
    );
    unmap_scratch(page);
}

global_asm!(
    r#"
    .section .text
    /* u64 probe_load(const u64 *p): returns *p, or the faulting PC when the fixup fired. */
    .global probe_load
probe_load:
    .global probe_load_insn
probe_load_insn:
    movq (%rdi), %rax
    ret
    .global probe_load_landing
probe_load_landing:
    movq %r10, %rax
    ret
"#,
    options(att_syntax)
);

extern "C" {
    fn probe_load(p: *const u64) -> u64;
    fn probe_load_insn();
    fn probe_load_landing();
}

static FIXUP_CR2: AtomicU64 = AtomicU64::new(0);

fn landing_fixup(frame: &mut TrapFrame, info: &FaultInfo) -> bool {
    if info.vector != PAGE_FAULT || info.cr2 != FIXUP_CR2.load(Ordering::SeqCst) {
        return false;
    }
    frame.r10 = frame.rip;
    frame.rip = probe_load_landing as *const () as u64;
    true
}

fn fault_handler_resumes_at_landing_pad_with_r10() {
    let page = map_scratch(3, F::PRESENT | F::WRITABLE | F::NO_EXECUTE);
    let mapped = page.start_address().as_u64();
    // SAFETY: mapped page, writable.
    unsafe { core::ptr::write_volatile(mapped as *mut u64, 0x1234_5678) };
    let unmapped = scratch_page(4).start_address().as_u64();
    FIXUP_CR2.store(unmapped, Ordering::SeqCst);
    interrupts::set_fault_handler(Some(landing_fixup));
    // SAFETY: probe_load reads one u64; the mapped read succeeds, the unmapped one is fixed up.
    let (ok, faulted) = unsafe {
        (
            probe_load(mapped as *const u64),
            probe_load(unmapped as *const u64),
        )
    };
    interrupts::set_fault_handler(None);
    unmap_scratch(page);
    assert_eq!(
        ok, 0x1234_5678,
        "a load that does not fault returns the value"
    );
    assert_eq!(
        faulted, probe_load_insn as *const () as u64,
        "r10 holds the faulting PC"
    );
}

fn invalid_opcode_is_caught() {
    let info = ExpectFault::vector(6).run(|| {
        // SAFETY: ud2 raises #UD, which the test expects.
        unsafe { core::arch::asm!("ud2") };
    });
    assert_eq!(info.error_code, 0);
}

fn frame_allocator_hands_out_distinct_usable_frames() {
    const N: usize = 64;
    let before = memory::frames().free_frames();
    let mut frames: Vec<PhysFrame> = Vec::new();
    for _ in 0..N {
        frames.push(memory::frames().allocate_frame().expect("a free frame"));
    }
    assert_eq!(memory::frames().free_frames(), before - N);
    let mut sorted = frames.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), N, "frames are distinct");
    let (image_start, image_end) = codespace_kernel::kernel_image();
    for (i, f) in frames.iter().enumerate() {
        let phys = f.start_address().as_u64();
        assert!(phys >= 1 << 20, "below 1 MiB: {phys:#x}");
        assert!(
            phys >= image_end || phys + 4096 <= image_start,
            "inside the kernel image"
        );
        assert!(!memory::frames().is_free(*f));
        let p = phys_to_virt(f.start_address()).as_mut_ptr::<u64>();
        // SAFETY: the frame is ours; the direct map makes it writable.
        unsafe {
            core::ptr::write_bytes(p, 0, 512);
            p.add(511).write_volatile(i as u64 + 1);
        }
    }
    // Map one frame and see the direct-map write through the new mapping.
    let page = scratch_page(5);
    {
        let mut frames_guard = memory::frames();
        // SAFETY: frames[3] is ours and unmapped elsewhere but for the direct map.
        unsafe {
            memory::page_table()
                .map_to(
                    page,
                    frames[3],
                    F::PRESENT | F::WRITABLE | F::NO_EXECUTE,
                    &mut *frames_guard,
                )
                .expect("map")
                .flush();
        }
    }
    assert_eq!(
        memory::page_table().translate_addr(page.start_address()),
        Some(frames[3].start_address())
    );
    // SAFETY: the page was just mapped to frames[3].
    let seen = unsafe {
        (page.start_address().as_u64() as *const u64)
            .add(511)
            .read_volatile()
    };
    assert_eq!(seen, 4);
    let (frame, flush) = memory::page_table().unmap(page).expect("mapped");
    flush.flush();
    assert_eq!(frame, frames[3]);
    for f in frames {
        // SAFETY: each frame was allocated above and is no longer mapped.
        unsafe { memory::frames().deallocate_frame(f) };
    }
    assert_eq!(
        memory::frames().free_frames(),
        before,
        "free count restored"
    );
}

fn heap_holds_a_one_mebibyte_vec() {
    let (used_before, _) = memory::heap_usage();
    let mut v: Vec<u8> = Vec::with_capacity(1 << 20);
    v.extend((0..1u32 << 20).map(|i| (i * 7) as u8));
    assert_eq!(v.len(), 1 << 20);
    assert_eq!(v[123_456], (123_456u32 * 7) as u8);
    assert!(memory::heap_usage().0 >= used_before + (1 << 20));
    drop(v);
    assert_eq!(memory::heap_usage().0, used_before);
}

fn command_line_reaches_the_kernel() {
    let boot = codespace_kernel::boot_info();
    assert!(
        !boot.command_line().contains("boot"),
        "the image path is stripped: {:?}",
        boot.command_line()
    );
    assert!(boot.usable_bytes() > 16 << 20);
}

fn identity_map_past_the_kernel_text_is_nx() {
    use x86_64::structures::paging::mapper::TranslateResult;
    let frame = memory::frames().allocate_frame().expect("frame");
    let identity = VirtAddr::new(frame.start_address().as_u64());
    let result = memory::page_table().translate(identity);
    // SAFETY: the frame was allocated above and is mapped nowhere else.
    unsafe { memory::frames().deallocate_frame(frame) };
    match result {
        TranslateResult::Mapped { flags, .. } => {
            assert!(
                flags.contains(F::NO_EXECUTE),
                "identity page of a free frame is executable"
            )
        }
        other => panic!("identity address not mapped: {other:?}"),
    }
    // The kernel's own text still runs (this test does), and the direct map is NX as well.
    let direct = phys_to_virt(frame.start_address());
    match memory::page_table().translate(direct) {
        TranslateResult::Mapped { .. } => {}
        other => panic!("direct map missing: {other:?}"),
    }
}

fn null_page_is_unmapped() {
    ExpectFault::page_fault(0x10)
        .without_bits(PF_PRESENT)
        .run(|| {
            // SAFETY: deliberately reads near address 0; the fault is caught.
            let _ = unsafe { core::ptr::read_volatile(core::hint::black_box(0x10) as *const u8) };
        });
}

fn boot_stack_guard_page_is_unmapped() {
    let guard = layout::boot_stack_guard() + 8;
    let here = core::hint::black_box(&raw const guard) as u64;
    // The boot stack lies right above the 4 KiB guard page.
    assert!(
        here > guard && here - guard < (4 << 10) + layout::BOOT_STACK_SIZE as u64,
        "this test runs on the boot stack just above its guard ({here:#x} vs {guard:#x})"
    );
    ExpectFault::page_fault(guard)
        .without_bits(PF_PRESENT)
        .run(|| {
            // SAFETY: deliberately reads the guard page; the fault is caught.
            let _ = unsafe { core::ptr::read_volatile(guard as *const u64) };
        });
}

fn kernel_text_is_read_only_through_every_mapping() {
    let text = cpu_protections_are_on as *const () as u64;
    let (start, end) = layout::kernel_text();
    assert!(
        (start..end).contains(&text),
        "this function lies in the kernel text"
    );
    let direct = phys_to_virt(x86_64::PhysAddr::new(text)).as_u64();
    for addr in [text, direct] {
        ExpectFault::page_fault(addr)
            .with_bits(PF_PRESENT | PF_WRITE)
            .run(|| {
                // SAFETY: deliberately writes the kernel text (same byte back); it must fault
                // before anything changes.
                unsafe {
                    let p = addr as *mut u8;
                    p.write_volatile(p.read_volatile());
                }
            });
    }
}

/// Walks every PML4 slot: no leaf is writable and executable, and no frame executable through
/// one mapping is writable through another (identity, direct map, anything a test mapped).
/// Then plants one violation of each kind and checks the audit reports both: it can fail.
fn page_tables_have_no_writable_executable_frame() {
    let report = wx_audit::audit_active();
    assert!(report.is_clean(), "W^X violations: {report}");
    assert!(
        report.leaves > 2 * 2048,
        "the identity and direct maps were walked: {report}"
    );

    // A W+X scratch page, and a writable alias of the kernel text's first frame.
    let wx = map_scratch(10, F::PRESENT | F::WRITABLE);
    let alias = scratch_page(11);
    let text =
        PhysFrame::<Size4KiB>::containing_address(x86_64::PhysAddr::new(layout::kernel_text().0));
    {
        let mut frames = memory::frames();
        // SAFETY: maps the text frame writable for the duration of the audit only; nothing
        // writes through the alias, and it is unmapped (without freeing the frame) right after.
        unsafe {
            memory::page_table()
                .map_to(
                    alias,
                    text,
                    F::PRESENT | F::WRITABLE | F::NO_EXECUTE,
                    &mut *frames,
                )
                .expect("map the alias")
                .flush();
        }
    }
    let planted = wx_audit::audit_active();
    let (_, flush) = memory::page_table().unmap(alias).expect("alias mapped");
    flush.flush();
    unmap_scratch(wx);
    let wx_va = wx.start_address().as_u64();
    assert!(
        planted
            .writable_and_executable
            .iter()
            .any(|l| l.va == wx_va),
        "the planted W+X page is not reported: {planted}"
    );
    assert!(
        planted
            .writable_aliases
            .iter()
            .any(|(w, x)| w.va == alias.start_address().as_u64() && x.executable),
        "the planted writable alias of kernel text is not reported: {planted}"
    );
    assert!(
        wx_audit::audit_active().is_clean(),
        "clean again once removed"
    );
}

/// The kernel text's identity pages are the only executable kernel mappings: the direct map,
/// the rest of the identity map and the AP trampoline page (executable only while APs start)
/// are not.
fn only_the_kernel_text_is_executable() {
    let (start, end) = layout::kernel_text();
    let report = wx_audit::audit_active();
    assert!(
        !report.executable.is_empty(),
        "the kernel text is executable"
    );
    for leaf in &report.executable {
        assert!(
            leaf.va == leaf.phys && leaf.phys >= start && leaf.phys + leaf.size <= end,
            "executable outside the kernel text: {leaf}"
        );
    }
    let pages: u64 = report.executable.iter().map(|l| l.size / 4096).sum();
    assert_eq!(pages, (end - start) / 4096, "every text page is executable");
}
