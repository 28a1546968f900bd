/*
 * Strata's boot test kernel: entry points. One payload, linked at 1 MiB,
 * entered four ways:
 *   +0x000  Linux boot protocol 32-bit entry (code32_start), ESI = zero page
 *   +0x200  Linux boot protocol 64-bit entry, RSI = zero page
 *   pvh_entry   PVH (32-bit, paging off), EBX = hvm_start_info
 *   mb_entry    Multiboot v1 (32-bit, paging off), EAX = magic, EBX = info
 * Every entry first writes '!' to COM1, so a benchmark can time the
 * kernel's first instruction from the outside. The 32-bit entries switch
 * to long mode on their own identity page tables (first 1 GiB, 2 MiB
 * pages) and all of them call kmain(kind, info, magic) in 64-bit mode.
 */
#define COM1 0x3f8
#define KIND_LINUX32 1
#define KIND_LINUX64 2
#define KIND_PVH 3
#define KIND_MULTIBOOT 4

	.section .text.entry, "ax"
	.code32
	.globl _start
_start:
	movw $COM1, %dx
	movb $'!', %al
	outb %al, %dx
	movl $KIND_LINUX32, %edi
	xorl %ebp, %ebp
	jmp common32

	.org 0x200
	.code64
linux64_entry:
	movw $COM1, %dx
	movb $'!', %al
	outb %al, %dx
	movl $KIND_LINUX64, %edi
	xorl %edx, %edx
	movq $stack_top, %rsp
	call kmain
	jmp halt64

	.code32
	.globl pvh_entry
pvh_entry:
	movw $COM1, %dx
	movb $'!', %al
	outb %al, %dx
	movl %ebx, %esi
	movl $KIND_PVH, %edi
	xorl %ebp, %ebp
	jmp common32

	.globl mb_entry
mb_entry:
	movl %eax, %ebp
	movw $COM1, %dx
	movb $'!', %al
	outb %al, %dx
	movl %ebx, %esi
	movl $KIND_MULTIBOOT, %edi
	jmp common32

/* EDI = kind, ESI = info, EBP = multiboot magic; only EAX/ECX/EDX used. */
common32:
	lgdt gdt64_ptr
	movl $pdpt, %eax
	orl $3, %eax
	movl %eax, pml4
	movl $pd, %eax
	orl $3, %eax
	movl %eax, pdpt
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $21, %eax
	orl $0x83, %eax
	movl %eax, pd(,%ecx,8)
	incl %ecx
	cmpl $512, %ecx
	jne 1b
	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax		/* PAE */
	movl %eax, %cr4
	movl $0xc0000080, %ecx	/* EFER */
	rdmsr
	orl $0x100, %eax	/* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax	/* PG | PE */
	movl %eax, %cr0
	ljmp $0x08, $long64

	.code64
long64:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movl %edi, %edi
	movl %esi, %esi
	movl %ebp, %edx
	movq $stack_top, %rsp
	call kmain
halt64:
	cli
	hlt
	jmp halt64

	.section .rodata
	.align 8
gdt64:
	.quad 0
	.quad 0x00af9a000000ffff	/* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff	/* 0x10: data */
gdt64_ptr:
	.word gdt64_ptr - gdt64 - 1
	.long gdt64

	.section .bss
	.align 4096
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4096
	.skip 16384
stack_top:
