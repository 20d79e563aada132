/* Writes one byte and resets: the smallest guest that shows the VMM runs guest code. */
        .include "common.inc"
        .globl _start
        .text
_start:
        putc    'K'
        reset
