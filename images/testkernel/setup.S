/* The real-mode part of the test bzImage: sectors holding the Linux
 * boot protocol 2.15 setup header (Documentation/arch/x86/boot.rst) and a
 * minimal real-mode setup. Loaders that enter the protected-mode or
 * 64-bit entry never run it. A boot-sector style loader (QEMU's
 * linuxboot_dma.bin under SeaBIOS) enters it in real mode at the setup
 * segment + 0x20 with DS = the setup segment; it then does what Linux's
 * setup does, reduced to the essentials: fetch the BIOS e820 map into the
 * zero page (INT 15h, E820), switch to flat protected mode and jump to
 * code32_start with ESI = the zero page (the 32-bit boot protocol).
 * Eight sectors, so that the code sits clear of the e820 table it
 * fills. init_size (1 MiB) and cmdline_size (2047) are fixed: the payload is far
 * smaller. Addresses are offsets from setup_start (the file's first byte):
 * the section is extracted from an unlinked object. */
	.code16
	.section .setup, "ax"
setup_start:
	.org 0x1f1
	.byte 7			/* setup_sects */
	.word 0			/* root_flags */
	.long 0			/* syssize */
	.word 0			/* ram_size */
	.word 0xffff		/* vid_mode */
	.word 0			/* root_dev */
	.word 0xaa55		/* boot_flag */
	.byte 0xeb		/* 0x200: jump */
	.byte start_of_setup - 0x202
	.ascii "HdrS"		/* 0x202 */
	.word 0x020f		/* version */
	.long 0			/* realmode_swtch */
	.word 0x1000		/* start_sys_seg */
	.word 0			/* kernel_version */
	.byte 0			/* type_of_loader */
	.byte 1			/* loadflags: LOADED_HIGH */
	.word 0x8000		/* setup_move_size */
	.long 0x100000		/* code32_start */
	.long 0			/* ramdisk_image */
	.long 0			/* ramdisk_size */
	.long 0			/* bootsect_kludge */
	.word 0			/* heap_end_ptr */
	.byte 0			/* ext_loader_ver */
	.byte 0			/* ext_loader_type */
	.long 0			/* cmd_line_ptr */
	.long 0x37ffffff	/* initrd_addr_max */
	.long 0x200000		/* kernel_alignment */
	.byte 0			/* relocatable_kernel */
	.byte 0			/* min_alignment */
	.word 1			/* xloadflags: XLF_KERNEL_64 */
	.long 2047		/* cmdline_size */
	.long 0			/* hardware_subarch */
	.quad 0			/* hardware_subarch_data */
	.long 0			/* payload_offset */
	.long 0			/* payload_length */
	.quad 0			/* setup_data */
	.quad 0x100000		/* pref_address */
	.long 0x100000		/* init_size */
	.long 0			/* handover_offset */
	.long 0			/* kernel_info_offset */
start_of_setup:
	/* The code lives past the zero page's e820 table (0x2d0-0xccf),
	 * which it fills in place. */
	jmp real_setup
	.org 0xd00
real_setup:
	cli
	cld
	movw %ds, %ax
	movw %ax, %es
	movzwl %ax, %esi
	shll $4, %esi			/* ESI = the zero page, linear */

	/* e820: entries at 0x2d0 (20 bytes each), count at 0x1e8, max 128 */
	xorl %ebx, %ebx
	movw $0x2d0, %di
	movb $0, (0x1e8)
1:	movl $0xe820, %eax
	movl $0x534d4150, %edx		/* "SMAP" */
	movl $20, %ecx
	int $0x15
	jc 2f
	cmpl $0x534d4150, %eax
	jne 2f
	incb (0x1e8)
	addw $20, %di
	cmpb $128, (0x1e8)
	je 2f
	testl %ebx, %ebx
	jnz 1b
2:
	/* GDT base and far-jump target are linear: add the setup's base */
	leal (gdt - setup_start)(%esi), %eax
	movl %eax, (gdtr - setup_start + 2)
	leal (pm32 - setup_start)(%esi), %eax
	movl %eax, (farptr - setup_start)
	lgdtl (gdtr - setup_start)
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl *(farptr - setup_start)

	.code32
pm32:
	movl $0x18, %eax		/* __BOOT_DS */
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl 0x214(%esi), %eax		/* code32_start */
	jmp *%eax

	.balign 8
gdt:	.quad 0
	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x10: __BOOT_CS, flat 32-bit code */
	.quad 0x00cf92000000ffff	/* 0x18: __BOOT_DS, flat data */
gdtr:	.word gdtr - gdt - 1
	.long 0
farptr:	.long 0
	.word 0x10
	.org 4096
