/* Reports what CPUID leaf 1 tells the guest: 'H'/'h' hypervisor bit, 'X'/'x' XSAVE,
   'C'/'c' CMPXCHG16B, 'A'/'a' AVX, then the initial APIC id as a digit. */
        .include "common.inc"
        .globl _start
        .text
_start:
        mov     eax, 1
        xor     ecx, ecx
        cpuid
        mov     r9d, ecx
        mov     r10d, ebx
        .macro  flag bit, yes, no
        mov     r8d, \no
        bt      r9d, \bit
        jnc     1f
        mov     r8d, \yes
1:      putc    r8b
        .endm
        flag    31, 'H', 'h'
        flag    26, 'X', 'x'
        flag    13, 'C', 'c'
        flag    28, 'A', 'a'
        mov     eax, r10d
        shr     eax, 24
        add     al, '0'
        mov     dx, COM1
        out     dx, al
        reset
