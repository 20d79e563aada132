/* Drives a virtio-vsock device (first device, IRQ 5) through virtio-mmio: 'F' features
   negotiated, 'C' the config space holds guest CID 3; one rx buffer posted, then 'W'
   while waiting for a host connection. The host's `CONNECT 1234` arrives as OP_REQUEST
   to port 1234: 'Q'. The guest accepts with OP_RESPONSE on the tx queue and prints 'A'
   once the device used it; the host side then reads `OK <port>`. '!' marks a failure. */
        .include "common.inc"
        .include "virtio.inc"
        .equ RXQ, 0x300000
        .equ TXQ, 0x303000
        .equ EVQ, 0x306000
        .equ RXBUF, 0x310000
        .equ TXBUF, 0x311000
        .equ GUEST_PORT, 1234
        .globl _start
        .text
_start:
        virtio_init 0xd0000000
        putc    'F'
        cmp     dword ptr [rbx + 0x100], 3
        jne     fail
        putc    'C'
        virtio_queue 0, RXQ
        virtio_queue 1, TXQ
        virtio_queue 2, EVQ
        virtio_driver_ok
        irq_setup 5
        desc_set RXQ, 0, RXBUF, 4096, 2, 0
        avail_push RXQ, 0
        mov     dword ptr [rbx + 0x50], 0
        putc    'W'
        wait_irq
        cmp     word ptr [RXQ + 0x2000 + 2], 1      /* one rx buffer used */
        jne     fail
        cmp     word ptr [RXBUF + 30], 1             /* VIRTIO_VSOCK_OP_REQUEST */
        jne     fail
        cmp     dword ptr [RXBUF + 20], GUEST_PORT
        jne     fail
        putc    'Q'
        /* OP_RESPONSE back to the host's port: swap the addresses of the request. */
        mov     rdi, TXBUF
        xor     eax, eax
        mov     ecx, 44
        rep stosb
        mov     qword ptr [TXBUF + 0], 3             /* src_cid */
        mov     qword ptr [TXBUF + 8], 2             /* dst_cid: the host */
        mov     dword ptr [TXBUF + 16], GUEST_PORT
        mov     eax, dword ptr [RXBUF + 16]
        mov     dword ptr [TXBUF + 20], eax          /* dst_port: the host's port */
        mov     word ptr [TXBUF + 28], 1             /* VIRTIO_VSOCK_TYPE_STREAM */
        mov     word ptr [TXBUF + 30], 2             /* VIRTIO_VSOCK_OP_RESPONSE */
        mov     dword ptr [TXBUF + 36], 65536        /* buf_alloc */
        desc_set TXQ, 0, TXBUF, 44, 0, 0
        avail_push TXQ, 0
        mov     dword ptr [rbx + 0x50], 1
1:      wait_irq
        cmp     word ptr [TXQ + 0x2000 + 2], 1
        jne     1b
        putc    'A'
        reset
fail:
        putc    '!'
        reset
        virtio_irq_handler
