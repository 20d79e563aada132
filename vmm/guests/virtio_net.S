/* Drives a virtio-net device (first device, IRQ 5) through virtio-mmio: 'F' features
   negotiated, 'M' the config space holds a MAC; one rx buffer posted; a broadcast frame
   (EtherType 0x88b5, payload "kubevirt-tx") sent on the tx queue, 'T' once used; then 'W'
   while waiting for the host to send a frame, 'X' when one arrived whose payload is
   "kubevirt-rx". '!' marks a failure. */
        .include "common.inc"
        .include "virtio.inc"
        .equ RXQ, 0x300000
        .equ TXQ, 0x303000
        .equ RXBUF, 0x310000
        .equ TXBUF, 0x311000
        .equ HDR_LEN, 12               /* virtio_net_hdr_v1 */
        .globl _start
        .text
_start:
        virtio_init 0xd0000000
        putc    'F'
        mov     eax, dword ptr [rbx + 0x100]
        or      ax, word ptr [rbx + 0x104]
        test    eax, eax
        jz      fail
        putc    'M'
        virtio_queue 0, RXQ
        virtio_queue 1, TXQ
        virtio_driver_ok
        irq_setup 5
        desc_set RXQ, 0, RXBUF, 2048, 2, 0
        avail_push RXQ, 0
        mov     dword ptr [rbx + 0x50], 0
        /* The frame: header (zeroed), broadcast destination, our MAC, EtherType, text. */
        mov     rdi, TXBUF
        xor     eax, eax
        mov     ecx, HDR_LEN + 64
        rep stosb
        mov     dword ptr [TXBUF + HDR_LEN], 0xffffffff
        mov     word ptr [TXBUF + HDR_LEN + 4], 0xffff
        mov     eax, dword ptr [rbx + 0x100]
        mov     dword ptr [TXBUF + HDR_LEN + 6], eax
        mov     ax, word ptr [rbx + 0x104]
        mov     word ptr [TXBUF + HDR_LEN + 10], ax
        mov     word ptr [TXBUF + HDR_LEN + 12], 0xb588
        lea     rsi, [rip + tx_text]
        mov     rdi, TXBUF + HDR_LEN + 14
        mov     ecx, 11
        rep movsb
        desc_set TXQ, 0, TXBUF, HDR_LEN + 64, 0, 0
        avail_push TXQ, 0
        mov     dword ptr [rbx + 0x50], 1
1:      wait_irq
        cmp     word ptr [TXQ + 0x2000 + 2], 1
        jne     1b
        putc    'T'
        putc    'W'
2:      cmp     word ptr [RXQ + 0x2000 + 2], 1
        je      3f
        wait_irq
        jmp     2b
3:      lea     rsi, [rip + rx_text]
        mov     rdi, RXBUF + HDR_LEN + 14
        mov     ecx, 11
        repe cmpsb
        jne     fail
        putc    'X'
        reset
fail:
        putc    '!'
        reset
tx_text:
        .ascii  "kubevirt-tx"
rx_text:
        .ascii  "kubevirt-rx"
        virtio_irq_handler
