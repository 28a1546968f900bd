/*
 * tinybios: a 64 KiB test firmware for Strata's KVM tests, built from this
 * source by images/build.sh. It runs from the reset vector in real mode,
 * prints "TINYBIOS <variant>" on COM1, and then does what its variant says:
 *
 *   VARIANT_TRIPLE  enters protected mode with an empty IDT and raises an
 *                   interrupt: a triple fault, which resets the machine;
 *   VARIANT_REP     string port I/O: `rep outsb` of "REP-OUT" to the UART's
 *                   data port, and `rep insb` of four bytes from CMOS
 *                   register D (0x80 each), printed in hex as "REP-IN ..";
 *   VARIANT_FPU     executes fwait; fninit, x87 instructions this development
 *                   host's KVM cannot emulate in ring 0 (PLATFORM.md); on
 *                   hosts that can, it prints "FPU-OK" and halts.
 *
 * The image is mapped so that it ends at 4 GiB: offset 0xfff0 is the reset
 * vector, and CS base 0xffff0000 lets the code address its own bytes.
 */
    .code16
    .text
    .globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ss
    movw $0x7000, %sp
    movw $banner, %si
    call puts
#if VARIANT_TRIPLE
    /* Protected mode with an empty IDT: the breakpoint cannot be
     * delivered (#GP), neither can the #GP (#DF), nor the #DF. */
    lgdtl %cs:gdt_desc
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(0xf0000 + pm32)
    .code32
pm32:
    lidtl (0xf0000 + empty_idt)
    int $0x03
    .code16
#elif VARIANT_REP
    /* Each element of a string instruction is a separate port access. */
    movw $rep_out, %si
    movw $9, %cx
    movw $0x3f8, %dx
    cld
    rep outsb %cs:(%si), (%dx)
    movb $0x0d, %al
    outb %al, $0x70
    xorw %ax, %ax
    movw %ax, %es
    movw $0x500, %di
    movw $4, %cx
    movw $0x71, %dx
    rep insb (%dx), %es:(%di)
    movw $rep_in, %si
    call puts
    movw $0x500, %bx
4:  movb %es:(%bx), %al
    call puthex
    incw %bx
    cmpw $0x504, %bx
    jne 4b
    movw $crlf, %si
    call puts
#elif VARIANT_FPU
    /* memtest86+ starts its FPU with these two. */
    fwait
    fninit
    movw $fpu_ok, %si
    call puts
#endif
1:  hlt
    jmp 1b

/* Prints the NUL-terminated string at %cs:%si on COM1 (polling LSR.THRE). */
puts:
    movb %cs:(%si), %al
    testb %al, %al
    jz 3f
    movb %al, %ah
    movw $0x3fd, %dx
2:  inb %dx, %al
    testb $0x20, %al
    jz 2b
    movw $0x3f8, %dx
    movb %ah, %al
    outb %al, %dx
    incw %si
    jmp puts
3:  ret

#if VARIANT_REP
/* Prints %al as two hex digits on COM1 (the UART accepts bytes at once). */
puthex:
    pushw %ax
    shrb $4, %al
    call putnib
    popw %ax
    andb $0x0f, %al
putnib:
    addb $'0', %al
    cmpb $'9', %al
    jbe 5f
    addb $7, %al
5:  movw $0x3f8, %dx
    outb %al, %dx
    ret
rep_out:
    .ascii "REP-OUT\r\n"
rep_in:
    .asciz "REP-IN "
crlf:
    .asciz "\r\n"
#endif

empty_idt:
    .word 0
    .long 0

    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08: flat 32-bit code */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long 0xf0000 + gdt

banner:
#if VARIANT_TRIPLE
    .asciz "TINYBIOS triple\r\n"
#elif VARIANT_REP
    .asciz "TINYBIOS rep\r\n"
#elif VARIANT_FPU
    .asciz "TINYBIOS fpu\r\n"
#else
    .asciz "TINYBIOS\r\n"
#endif
fpu_ok:
    .asciz "FPU-OK\r\n"

    /* The reset vector: 16 bytes below the end of the 64 KiB image. */
    .org 0xfff0
    ljmp $0xf000, $_start
    .org 0x10000
