/* Two vCPUs: the bootstrap CPU prints 'A', copies a real-mode trampoline to 0x10000 and
   starts CPU 1 with INIT + SIPI through its local APIC. CPU 1 prints 'B' and sets a flag;
   CPU 0 waits for the flag, prints 'C' and resets (or 'X' if CPU 1 never came). */
        .include "common.inc"
        .equ APIC_BASE, 0xfee00000
        .equ ICR_LOW, 0x300
        .equ ICR_HIGH, 0x310
        .equ TRAMPOLINE, 0x10000
        .equ FLAG, 0x11000
        .globl _start
        .text
_start:
        putc    'A'
        mov     byte ptr [FLAG], 0
        lea     rsi, [rip + ap_start]
        mov     edi, TRAMPOLINE
        mov     ecx, ap_end - ap_start
        rep movsb
        /* INIT (delivery mode 5, level assert) to APIC id 1. */
        mov     edi, APIC_BASE
        mov     dword ptr [rdi + ICR_HIGH], 1 << 24
        mov     dword ptr [rdi + ICR_LOW], 0x00004500
        /* Start-up IPI (mode 6), vector = trampoline page. */
        mov     dword ptr [rdi + ICR_HIGH], 1 << 24
        mov     dword ptr [rdi + ICR_LOW], 0x00004600 | (TRAMPOLINE >> 12)
        mov     ecx, 2000000
1:      cmp     byte ptr [FLAG], 1
        je      2f
        pause
        dec     ecx
        jnz     1b
        putc    'X'
        reset
2:      putc    'C'
        reset

        /* Real-mode code for CPU 1: CS = 0x1000, IP = 0. */
        .code16
ap_start:
        mov     dx, COM1
        mov     al, 'B'
        out     dx, al
        mov     ax, FLAG >> 4
        mov     ds, ax
        mov     byte ptr [0], 1
3:      cli
        hlt
        jmp     3b
ap_end:
