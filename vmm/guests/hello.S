/* Writes one byte and resets: the smallest guest that shows a VMM runs guest code, and the
   guest of the VMM start-up benchmark. It has two entries doing the same work:
   - the ELF entry, in 64-bit mode, which kubevirt-vmm uses (the Linux 64-bit boot path);
   - a PVH entry (XEN_ELFNOTE_PHYS32_ENTRY note), in 32-bit protected mode, which QEMU's
     `-kernel` and the benchmark's minimal VMM use. QEMU's microvm has no i8042, so the PVH
     path also writes to an isa-debug-exit port (0xf4), which ends QEMU. */
        .include "common.inc"
        .globl _start
        .text
_start:
        putc    'K'
        reset

        .code32
pvh_start:
        mov     dx, COM1
        mov     al, 'K'
        out     dx, al
        mov     al, 0xfe
        out     0x64, al
        xor     eax, eax
        out     0xf4, al
1:      hlt
        jmp     1b

        .section .note.Xen, "a"
        .p2align 2
        .long   4                     /* name size: "Xen\0" */
        .long   4                     /* descriptor size */
        .long   18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .long   pvh_start
