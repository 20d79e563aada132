/* Console echo: polls the UART for input and writes every byte back; 'q' resets. */
        .include "common.inc"
        .globl _start
        .text
_start:
        putc    '>'
1:      mov     dx, COM1 + 5          /* line status register */
        in      al, dx
        test    al, 1                 /* data ready */
        jz      1b
        mov     dx, COM1
        in      al, dx
        out     dx, al
        cmp     al, 'q'
        jne     1b
        reset
