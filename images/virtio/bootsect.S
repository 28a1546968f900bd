/*
 * A boot sector for the virtio-blk boot tests (cli/tests/virtio_blk_kvm.rs).
 * SeaBIOS loads it at 0x7c00 from the boot disk; it reads LBA 1-2 through
 * INT 13h AH=42h (the same path SeaBIOS's virtio-blk driver serves), checks
 * the two signatures the test wrote there, and prints VIRTIO-BOOT-OK (or
 * VIRTIO-BOOT-BAD) on COM1, then halts.
 *
 * Build: as --32 -o b.o bootsect.S && ld -m elf_i386 -Ttext=0x7c00 --oformat binary -o b.bin b.o
 * (the test does this itself into its scratch directory).
 */
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    sti
    mov %dl, drive
    mov $dap, %si
    mov $0x42, %ah
    int $0x13
    jc fail
    cld
    mov $0x8000, %si
    mov $sig1, %di
    mov $8, %cx
    repe cmpsb
    jne fail
    mov $0x8200, %si
    mov $sig2, %di
    mov $8, %cx
    repe cmpsb
    jne fail
    mov $okmsg, %si
    jmp print
fail:
    mov $badmsg, %si
print:
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz done
    out %al, %dx
    jmp 1b
done:
    cli
    hlt
    jmp done

drive:  .byte 0
    .balign 4
dap:    .byte 0x10, 0
        .word 2                 /* sectors */
        .word 0x8000, 0         /* buffer offset, segment */
        .quad 1                 /* first LBA */
sig1:   .ascii "VIRTDATA"
sig2:   .ascii "SECTOR2!"
okmsg:  .asciz "VIRTIO-BOOT-OK\r\n"
badmsg: .asciz "VIRTIO-BOOT-BAD\r\n"
    .org 510
    .word 0xaa55
