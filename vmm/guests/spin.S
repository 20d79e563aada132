/* Prints '.' forever with a short delay: for pause, resume and stop. */
        .include "common.inc"
        .globl _start
        .text
_start:
1:      putc    '.'
        mov     ecx, 2000
2:      dec     ecx
        jnz     2b
        jmp     1b
