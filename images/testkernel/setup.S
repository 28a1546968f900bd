/* The real-mode part of the test bzImage: two sectors whose only content
 * is the Linux boot protocol 2.15 setup header (Documentation/arch/x86/
 * boot.rst). Loaders that enter the protected-mode or 64-bit entry never
 * run it; its real-mode entry halts. init_size (1 MiB) and cmdline_size
 * (2047) are fixed: the payload is far smaller. */
	.code16
	.section .setup, "ax"
	.org 0x1f1
	.byte 1			/* setup_sects */
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
	cli
1:	hlt
	jmp 1b
	.org 1024
