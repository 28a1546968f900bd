/* Multiboot v1 header with the a.out kludge (flag 16): load addresses in
 * the header, so the loader ignores the ELF64 headers (QEMU requires this
 * for 64-bit ELF files). Flags: page-aligned modules, memory info. */
#define MB_MAGIC 0x1badb002
#define MB_FLAGS 0x00010003
	.section .text.mbheader, "ax"
	.align 4
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
	.long mb_header		/* header_addr */
	.long _start		/* load_addr */
	.long _edata		/* load_end_addr */
	.long _end		/* bss_end_addr */
	.long mb_entry		/* entry_addr */
