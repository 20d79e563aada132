/* Calibration guest for `kubevirt-vmm doctor`: prints 'S', runs 2 x ITERATIONS simple
   instructions, prints 'E' and resets through the i8042. The time between the two bytes
   tells whether KVM runs guest code natively or through its instruction emulator. */
        .intel_syntax noprefix
        .code64
        .equ ITERATIONS, 100000
        .globl _start
        .text
_start:
        mov     dx, 0x3f8
        mov     al, 'S'
        out     dx, al
        mov     ecx, ITERATIONS
1:      dec     ecx
        jnz     1b
        mov     al, 'E'
        out     dx, al
        mov     al, 0xfe
        out     0x64, al
2:      hlt
        jmp     2b
