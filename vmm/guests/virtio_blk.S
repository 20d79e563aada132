/* Drives a virtio-blk disk (first device, IRQ 5) through virtio-mmio: 'F' features
   negotiated; GET_ID request, 'I' after its interrupt, then the 20-byte serial as text;
   a 512-byte read of sector 0, 'R' and the first 8 bytes of the sector; 'S' if both
   status bytes were OK. '!' marks a failed step. */
        .include "common.inc"
        .include "virtio.inc"
        .equ Q, 0x300000
        .equ HDR, 0x310000             /* request header: type, reserved, sector */
        .equ BUF, 0x311000
        .equ STATUS, 0x312000
        .equ STATUS2, 0x312010
        .globl _start
        .text
_start:
        virtio_init 0xd0000000
        putc    'F'
        virtio_queue 0, Q
        virtio_driver_ok
        irq_setup 5
        /* GET_ID (type 8): header, 20 writable bytes, status. */
        mov     dword ptr [HDR], 8
        mov     dword ptr [HDR + 4], 0
        mov     qword ptr [HDR + 8], 0
        mov     byte ptr [STATUS], 0xff
        desc_set Q, 0, HDR, 16, 1, 1
        desc_set Q, 1, BUF, 20, 3, 2
        desc_set Q, 2, STATUS, 1, 2, 0
        avail_push Q, 0
        mov     dword ptr [rbx + 0x50], 0
        wait_irq
        putc    'I'
        mov     rsi, BUF
        mov     ecx, 20
        mov     dx, COM1
1:      lodsb
        test    al, al
        jz      2f
        out     dx, al
        loop    1b
2:      /* IN (type 0) of sector 0 into BUF: header, 512 writable bytes, status. */
        mov     dword ptr [HDR], 0
        mov     byte ptr [STATUS2], 0xff
        desc_set Q, 3, HDR, 16, 1, 4
        desc_set Q, 4, BUF, 512, 3, 5
        desc_set Q, 5, STATUS2, 1, 2, 0
        mov     word ptr [Q + 0x1000 + 6], 3
        mov     word ptr [Q + 0x1000 + 2], 2
        mov     dword ptr [rbx + 0x50], 0
        wait_irq
        putc    'R'
        mov     rsi, BUF
        mov     ecx, 8
        mov     dx, COM1
3:      lodsb
        out     dx, al
        loop    3b
        cmp     byte ptr [STATUS], 0
        jne     fail
        cmp     byte ptr [STATUS2], 0
        jne     fail
        putc    'S'
        reset
fail:
        putc    '!'
        reset
        virtio_irq_handler
