//! Multiboot 1 entry: the header QEMU's loader reads and the 32-bit code that enters long mode.
//!
//! The header uses the a.out-kludge fields (flags bit 16), so QEMU loads the ELF64 image as flat
//! bytes at the addresses the header names instead of refusing a 64-bit ELF.
//!
//! The boot page tables map the first 4 GiB twice with 2 MiB pages: identity (PML4 slot 0, where
//! the kernel runs) and at [`PHYS_OFFSET`](crate::memory::PHYS_OFFSET) (PML4 slot 256, the
//! direct map through which page tables are edited, marked NX at the PML4 level).

pub mod info;

use core::arch::global_asm;

/// Multiboot 1 header magic.
const MB_MAGIC: u32 = 0x1BAD_B002;
/// Flags: bit 1 asks for the memory map, bit 16 says the address fields are valid (a.out kludge).
const MB_FLAGS: u32 = (1 << 1) | (1 << 16);

global_asm!(
    r#"
    .section .multiboot_header, "a"
    .balign 4
multiboot_header:
    .long {magic}
    .long {flags}
    .long {checksum}
    .long multiboot_header      /* header_addr */
    .long __kernel_start        /* load_addr */
    .long __load_end            /* load_end_addr */
    .long __bss_end             /* bss_end_addr */
    .long _start                /* entry_addr */

    .section .bss
    .balign 4096
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4096 * 4
    /* The stack's lowest page is left unmapped once the kernel's own tables are built
       (layout.rs): an overflow faults instead of running into the page tables below. */
    .global boot_stack_guard
boot_stack_guard:
    .skip 4096
boot_stack_bottom:
    .skip {stack}
boot_stack_top:

    .section .rodata
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF    /* 0x08: 64-bit ring-0 code */
    .quad 0x00CF92000000FFFF    /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .boot.text, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    movl $boot_stack_top, %esp
    /* Keep the Multiboot magic (eax) and info pointer (ebx) for kernel_entry(edi, esi). */
    movl %eax, %edi
    movl %ebx, %esi

    /* 2048 PD entries: 4 GiB in 2 MiB pages, present | writable | huge. */
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, boot_pd(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax
    movl %eax, boot_pd+4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jne 1b

    /* PDPT[0..4] -> the four PDs. */
    xorl %ecx, %ecx
2:
    movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jne 2b

    /* PML4[0] (identity) and PML4[256] (direct map, NX) share the PDPT. */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    movl %eax, boot_pml4 + 256 * 8
    movl $0x80000000, boot_pml4 + 256 * 8 + 4

    movl $boot_pml4, %eax
    movl %eax, %cr3

    /* CR4: PAE, OSFXSR, OSXMMEXCPT. */
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4

    /* EFER: LME (long mode) and NXE (no-execute). */
    movl $0xC0000080, %ecx
    rdmsr
    orl $((1 << 8) | (1 << 11)), %eax
    wrmsr

    /* CR0: PG (paging) and WP (ring-0 writes honour read-only pages). */
    movl %cr0, %eax
    orl $((1 << 31) | (1 << 16)), %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode_start

    .code64
long_mode_start:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movabsq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    call kernel_entry
3:
    hlt
    jmp 3b
"#,
    magic = const MB_MAGIC,
    stack = const crate::memory::layout::BOOT_STACK_SIZE,
    flags = const MB_FLAGS,
    checksum = const 0u32.wrapping_sub(MB_MAGIC).wrapping_sub(MB_FLAGS),
    options(att_syntax)
);
