/*
 * Ring-0 part of the benchmark guests (images/virtio-bench,
 * images/ahci-bench), shared by both. Entered through multiboot v1 (32-bit
 * protected mode, paging off, EAX = magic, EBX = info). Guest ring 0 is
 * emulated instruction by instruction on the project's machines (see
 * PLATFORM.md), so this does the least that ring 3 cannot do for itself,
 * then leaves ring 0 for good:
 *   - identity-map the first 4 GiB with 2 MiB pages, all marked user, so
 *     ring 3 reaches the rings, buffers and multiboot info directly, and
 *     the devices' MMIO registers (3-4 GiB, where firmware or the guest
 *     puts 32-bit BARs, mapped uncached: PCD | PWT); the tables are
 *     static data, so ring 0 (emulated, slow) does not build them;
 *   - long mode, a GDT with ring-3 code/data and a TSS (RSP0 for faults);
 *   - an IDT whose exception entries report on COM1 (a fault in ring 3
 *     would otherwise triple-fault and reset, which re-runs the program),
 *     and a DPL-3 gate at 0x80 that halts, for the end of the run;
 *   - iretq to bench_main(info) in ring 3 with IOPL 3 and IF 0: port I/O
 *     (PCI config, virtio notify, PIT, COM1) works from ring 3, and no
 *     interrupt is ever taken (the driver polls).
 *   - a TSS I/O permission bitmap that allows every port as well: under
 *     kvm_pvm (the project's machines) the IOPL field does not survive
 *     the iretq (ring 3 runs with IOPL 0 and `out` raised #GP), while the
 *     bitmap is honoured. On hardware KVM either one is enough.
 * The 32-bit part writes 32-bit values only; addresses are below 4 GiB.
 */
#define COM1 0x3f8
#define KCODE 0x08
#define KDATA 0x10
#define UDATA 0x18
#define UCODE 0x20
#define TSSSEL 0x28

/* Multiboot v1 header with the a.out kludge (flag 16): the loader takes
 * the load addresses from here and ignores the ELF64 headers, which QEMU
 * requires for 64-bit ELF files. Flags: page-aligned modules, memory
 * info, address fields valid. */
#define MB_MAGIC 0x1badb002
#define MB_FLAGS 0x00010003
	.section .text.mbheader, "ax"
	.align 4
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
	.long mb_header		/* header_addr */
	.long mb_header		/* load_addr: the image starts here */
	.long _edata		/* load_end_addr */
	.long _end		/* bss_end_addr */
	.long mb_entry		/* entry_addr */

	.code32
	.globl mb_entry
mb_entry:
	movl %ebx, %esi		/* multiboot info, kept for bench_main */
	movl $stack0_top, %esp

	/* TSS descriptor base (the linker cannot split an address into the
	 * descriptor's fields), and RSP0 for exceptions taken from ring 3. */
	movl $tss, %eax
	movw %ax, gdt_tss + 2
	shrl $16, %eax
	movb %al, gdt_tss + 4
	movb %ah, gdt_tss + 7
	movl $stack0_top, tss + 4
	movw $104, tss + 102		/* I/O bitmap right after the TSS */
	movb $0xff, tss + 104 + 8192	/* the bitmap's terminating byte */

	/* IDT: vectors 0-31 -> isr_stubs + 16 * vector (interrupt gates,
	 * DPL 0), vector 0x80 -> halt_gate (DPL 3, reachable with int). */
	xorl %ecx, %ecx
2:	movl %ecx, %eax
	shll $4, %eax
	addl $isr_stubs, %eax
	movl %ecx, %edx
	shll $4, %edx
	addl $idt, %edx
	movw %ax, (%edx)
	movw $KCODE, 2(%edx)
	movw $0x8e00, 4(%edx)
	shrl $16, %eax
	movw %ax, 6(%edx)
	incl %ecx
	cmpl $32, %ecx
	jne 2b
	movl $halt_gate, %eax
	movl $idt + 16 * 0x80, %edx
	movw %ax, (%edx)
	movw $KCODE, 2(%edx)
	movw $0xee00, 4(%edx)
	shrl $16, %eax
	movw %ax, 6(%edx)

	lgdt gdt_ptr
	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax		/* PAE */
	movl %eax, %cr4
	movl $0xc0000080, %ecx	/* EFER.LME */
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax	/* PG | PE */
	movl %eax, %cr0
	ljmp $KCODE, $long64

	.code64
long64:
	movw $KDATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	lidt idt_ptr
	movw $TSSSEL, %ax
	ltr %ax
	movl %esi, %edi		/* bench_main(info) */
	pushq $(UDATA | 3)	/* SS */
	pushq $stack3_top	/* RSP */
	pushq $0x3002		/* RFLAGS: IOPL 3, IF 0 */
	pushq $(UCODE | 3)	/* CS */
	pushq $bench_main	/* RIP */
	iretq

/* Exception stubs, 16 bytes apart so the IDT loop can compute them. The
 * CPU pushes an error code for 8, 10-14, 17, 21, 29 and 30; the others
 * push a zero so the frame is the same. */
.macro STUB vec
	.align 16
	.if (\vec == 8) || (\vec >= 10 && \vec <= 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
	.else
	pushq $0
	.endif
	pushq $\vec
	jmp fault_common
.endm
	.align 16
isr_stubs:
	.altmacro
	.set v, 0
	.rept 32
	STUB %v
	.set v, v + 1
	.endr

/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
 * fault_report(vector, error, rip, rflags). */
fault_common:
	movq (%rsp), %rdi
	movq 8(%rsp), %rsi
	movq 16(%rsp), %rdx
	movq 32(%rsp), %rcx
	andq $-16, %rsp
	call fault_report
halt_gate:
	cli
	hlt
	jmp halt_gate

	.section .data
	.align 16
gdt:
	.quad 0
	.quad 0x00af9a000000ffff	/* 0x08: ring-0 64-bit code */
	.quad 0x00cf92000000ffff	/* 0x10: ring-0 data */
	.quad 0x00cff2000000ffff	/* 0x18: ring-3 data */
	.quad 0x00affa000000ffff	/* 0x20: ring-3 64-bit code */
gdt_tss:				/* 0x28: 64-bit TSS, 16 bytes */
	.word 104 + 8192		/* limit: TSS + I/O bitmap + 0xff */
	.word 0				/* base 15:0, set at run time */
	.byte 0				/* base 23:16 */
	.byte 0x89			/* present, available 64-bit TSS */
	.byte 0				/* limit 19:16, flags */
	.byte 0				/* base 31:24 */
	.long 0				/* base 63:32 */
	.long 0
gdt_end:
gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt
	.align 8
idt_ptr:
	.word 16 * 0x81 - 1
	.quad idt

/* Page tables: PML4[0] -> PDPT, PDPT[i] -> pd + 4096 * i, each PD 512
 * x 2 MiB. 7 = present | writable | user; 0x87 adds the 2 MiB page bit;
 * 0x9f adds PWT | PCD (uncached) for the MMIO gigabyte. */
	.align 4096
pml4:	.quad pdpt + 7
	.fill 511, 8, 0
pdpt:	.quad pd + 7, pd + 4096 + 7, pd + 8192 + 7, pd + 12288 + 7
	.fill 508, 8, 0
pd:
	.set i, 0
	.rept 1536
	.quad (i << 21) | 0x87
	.set i, i + 1
	.endr
	.rept 512
	.quad (i << 21) | 0x9f
	.set i, i + 1
	.endr

	.section .bss
	.align 4096

idt:	.skip 16 * 0x81
	.align 16
tss:	.skip 104 + 8192 + 1		/* all-zero I/O bitmap: every port allowed */
	.align 16
	.skip 8192
stack0_top:
	.skip 65536
stack3_top:
