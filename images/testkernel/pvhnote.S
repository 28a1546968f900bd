/* The PVH entry note (Xen's XEN_ELFNOTE_PHYS32_ENTRY, type 18). */
	.section .note.Xen, "a"
	.align 4
	.long 4			/* name size: "Xen\0" */
	.long 4			/* descriptor size */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.align 4
	.long pvh_entry
