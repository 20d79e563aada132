/* Drives a virtio-balloon (first device, IRQ 5) as Linux's free page reporting does: 'F'
   VERSION_1 and REPORTING negotiated; a page full of 0xa5 reported free on the reporting
   queue (queue 2, after inflate and deflate), 'I' after its interrupt, 'U' the used ring
   holds it, 'Z' the page now reads as zeros (the host took it back). '!' marks a failure. */
        .include "common.inc"
        .include "virtio.inc"
        .equ Q, 0x300000
        .equ PAGE, 0x310000
        .globl _start
        .text
_start:
        mov     rbx, 0xd0000000
        cmp     dword ptr [rbx + 0x00], 0x74726976   /* magic "virt" */
        jne     fail
        cmp     dword ptr [rbx + 0x08], 5            /* memory balloon */
        jne     fail
        mov     dword ptr [rbx + 0x70], 1
        mov     dword ptr [rbx + 0x70], 3
        mov     dword ptr [rbx + 0x14], 0            /* features, low word */
        test    dword ptr [rbx + 0x10], 0x20         /* VIRTIO_BALLOON_F_REPORTING */
        jz      fail
        mov     dword ptr [rbx + 0x24], 0
        mov     dword ptr [rbx + 0x20], 0x20
        mov     dword ptr [rbx + 0x24], 1
        mov     dword ptr [rbx + 0x20], 1            /* VIRTIO_F_VERSION_1 */
        mov     dword ptr [rbx + 0x70], 0xb
        test    dword ptr [rbx + 0x70], 8
        jz      fail
        putc    'F'
        virtio_queue 2, Q
        virtio_driver_ok
        irq_setup 5
        mov     rdi, PAGE
        mov     al, 0xa5
        mov     ecx, 4096
        rep stosb
        desc_set Q, 0, PAGE, 4096, 2, 0              /* device-writable, as Linux adds it */
        avail_push Q, 0
        mov     dword ptr [rbx + 0x50], 2            /* QueueNotify: queue 2 */
        wait_irq
        putc    'I'
        cmp     word ptr [Q + 0x2000 + 2], 1
        jne     fail
        cmp     dword ptr [Q + 0x2000 + 4], 0
        jne     fail
        putc    'U'
        mov     rsi, PAGE
        mov     ecx, 512
1:      cmp     qword ptr [rsi], 0
        jne     fail
        add     rsi, 8
        loop    1b
        putc    'Z'
        reset
fail:
        putc    '!'
        reset

        virtio_irq_handler
