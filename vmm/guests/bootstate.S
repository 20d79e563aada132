/* Reports the boot state the Linux 64-bit boot protocol promises:
   'L' long mode active with paging, 'Z' rsi points at a zero page with the boot flag and
   "HdrS" magic, then the command line from cmd_line_ptr, '\n', the e820 entry count as
   a digit, and 'P' if the MP floating pointer is at 0x9fc00. Lower case means "no". */
        .include "common.inc"
        .globl _start
        .text
_start:
        mov     rbx, rsi
        /* EFER.LMA (bit 10) and CR0.PG (bit 31). */
        mov     ecx, 0xc0000080
        rdmsr
        mov     r8d, 'l'
        bt      eax, 10
        jnc     1f
        mov     rax, cr0
        bt      eax, 31
        jnc     1f
        mov     r8d, 'L'
1:      putc    r8b
        mov     r8d, 'z'
        cmp     rbx, 0x7000
        jne     2f
        cmp     word ptr [rbx + 0x1fe], 0xaa55
        jne     2f
        cmp     dword ptr [rbx + 0x202], 0x53726448
        jne     2f
        mov     r8d, 'Z'
2:      putc    r8b
        /* Command line: cmd_line_ptr at offset 0x228, NUL terminated. */
        mov     esi, dword ptr [rbx + 0x228]
        mov     dx, COM1
3:      lodsb
        test    al, al
        jz      4f
        out     dx, al
        jmp     3b
4:      putc    '\n'
        movzx   eax, byte ptr [rbx + 0x1e8]
        add     al, '0'
        out     dx, al
        mov     r8d, 'p'
        cmp     dword ptr [0x9fc00], 0x5f504d5f   /* "_MP_" */
        jne     5f
        mov     r8d, 'P'
5:      putc    r8b
        reset
