/* Drives the first virtio-mmio device (a virtio-rng at 0xd0000000, IRQ 5) like a driver:
   'V' identification registers read right, 'F' features negotiated (VERSION_1), then one
   16-byte request on queue 0, 'I' the interrupt arrived through the IOAPIC, 'U' the used
   ring holds the request with 16 bytes written. '!' marks a failed step. */
        .include "common.inc"
        .equ MMIO, 0xd0000000
        .equ DESC, 0x300000
        .equ AVAIL, 0x301000
        .equ USED, 0x302000
        .equ BUF, 0x303000
        .equ IDT, 0x304000
        .equ FLAG, 0x305000
        .equ VECTOR, 0x30
        .equ IRQ, 5
        .globl _start
        .text
_start:
        mov     rbx, MMIO
        cmp     dword ptr [rbx + 0x00], 0x74726976   /* magic "virt" */
        jne     fail
        cmp     dword ptr [rbx + 0x04], 2            /* modern transport */
        jne     fail
        cmp     dword ptr [rbx + 0x08], 4            /* entropy device */
        jne     fail
        putc    'V'
        mov     dword ptr [rbx + 0x70], 1            /* ACKNOWLEDGE */
        mov     dword ptr [rbx + 0x70], 3            /* DRIVER */
        mov     dword ptr [rbx + 0x14], 1            /* device features, high word */
        test    dword ptr [rbx + 0x10], 1            /* VIRTIO_F_VERSION_1 */
        jz      fail
        mov     dword ptr [rbx + 0x24], 1
        mov     dword ptr [rbx + 0x20], 1
        mov     dword ptr [rbx + 0x24], 0
        mov     dword ptr [rbx + 0x20], 0
        mov     dword ptr [rbx + 0x70], 0xb          /* FEATURES_OK */
        test    dword ptr [rbx + 0x70], 8
        jz      fail
        putc    'F'
        mov     dword ptr [rbx + 0x30], 0            /* queue 0 */
        cmp     dword ptr [rbx + 0x34], 8
        jb      fail
        mov     rdi, DESC
        xor     eax, eax
        mov     ecx, 0x6000
        rep stosb                                    /* rings, buffer, IDT, flag zeroed */
        mov     dword ptr [rbx + 0x38], 8
        mov     dword ptr [rbx + 0x80], DESC
        mov     dword ptr [rbx + 0x84], 0
        mov     dword ptr [rbx + 0x90], AVAIL
        mov     dword ptr [rbx + 0x94], 0
        mov     dword ptr [rbx + 0xa0], USED
        mov     dword ptr [rbx + 0xa4], 0
        mov     dword ptr [rbx + 0x44], 1            /* queue ready */
        mov     dword ptr [rbx + 0x70], 0xf          /* DRIVER_OK */

        /* Interrupt path: IDT gate, PIC masked, LAPIC on, IOAPIC pin -> VECTOR. */
        lea     rax, [rip + handler]
        mov     rdi, IDT + VECTOR * 16
        mov     word ptr [rdi], ax
        mov     word ptr [rdi + 2], 0x8
        mov     word ptr [rdi + 4], 0x8e00           /* present interrupt gate */
        shr     rax, 16
        mov     word ptr [rdi + 6], ax
        shr     rax, 16
        mov     dword ptr [rdi + 8], eax
        lea     rax, [rip + idtr]
        lidt    [rax]
        mov     al, 0xff
        out     0x21, al
        out     0xa1, al
        mov     edi, 0xfee00000
        mov     dword ptr [rdi + 0xf0], 0x1ff        /* LAPIC enabled, spurious 0xff */
        mov     dword ptr [rdi + 0x80], 0            /* accept all priorities */
        mov     edi, 0xfec00000
        mov     dword ptr [rdi], 0x10 + 2 * IRQ
        mov     dword ptr [rdi + 0x10], VECTOR       /* fixed, edge, unmasked */
        mov     dword ptr [rdi], 0x11 + 2 * IRQ
        mov     dword ptr [rdi + 0x10], 0            /* to APIC 0 */

        /* One device-writable 16-byte buffer, made available, then notify. */
        mov     rdi, DESC
        mov     qword ptr [rdi], BUF
        mov     dword ptr [rdi + 8], 16
        mov     word ptr [rdi + 12], 2               /* VRING_DESC_F_WRITE */
        mov     word ptr [AVAIL + 4], 0
        mov     word ptr [AVAIL + 2], 1
        mov     dword ptr [rbx + 0x50], 0            /* QueueNotify */
        /* Wait with interrupts off between the check and the halt: `sti; hlt` opens the
           window only once the CPU halts, so the interrupt cannot slip in before it. */
1:      cmp     byte ptr [FLAG], 1
        je      2f
        sti
        hlt
        cli
        jmp     1b
2:
        putc    'I'
        cmp     word ptr [USED + 2], 1
        jne     fail
        cmp     dword ptr [USED + 4], 0
        jne     fail
        cmp     dword ptr [USED + 8], 16
        jne     fail
        putc    'U'
        reset
fail:
        putc    '!'
        reset

handler:
        push    rax
        push    rdx
        mov     rax, MMIO
        mov     edx, dword ptr [rax + 0x60]          /* interrupt status */
        mov     dword ptr [rax + 0x64], edx          /* acknowledge */
        mov     byte ptr [FLAG], 1
        mov     eax, 0xfee000b0
        mov     dword ptr [rax], 0                   /* EOI */
        pop     rdx
        pop     rax
        iretq

idtr:
        .word   4095
        .quad   IDT
