/* Raises #UD with an empty IDT: #UD -> #NP -> #DF -> triple fault (KVM_EXIT_SHUTDOWN). */
        .include "common.inc"
        .globl _start
        .text
_start:
        putc    'T'
        ud2
