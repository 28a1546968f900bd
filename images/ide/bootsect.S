/*
 * A boot sector that tests a BIOS disk path end to end.
 *
 * Loaded by the BIOS at 0000:7C00 with the boot drive in DL, it:
 *  1. checks for the INT 13h extensions (AH=41h, BX=55AAh),
 *  2. reads DATA_SECTORS sectors starting at LBA 1 with extended reads
 *     (AH=42h), CHUNK sectors at a time, into 2000:0000,
 *  3. checks every dword of the data against its index (the image builder
 *     fills the data area with a little-endian dword counter), so a sector
 *     read from the wrong place or not at all is caught, and adds the
 *     dwords into a 32-bit checksum compared with the closed form
 *     n(n-1)/2,
 *  4. prints "STRATA-BOOT-OK" (or "STRATA-BOOT-FAIL <stage>") on COM1
 *     (port 3F8h) and halts.
 *
 * Assembled with --defsym WRITE=1 it then writes the last chunk it read
 * back to the disk, right after the data (LBA 257-320), and prints
 * "STRATA-WRITE-OK": a guest that writes, for the -snapshot test.
 *
 * Assembled with --defsym CD=1 it is the boot image of an El Torito
 * "no emulation" CD instead: 2048-byte sectors, data from LBA 21, and the
 * marker "STRATA-CD-OK", so that boot-order tests can tell which device
 * booted without waiting for a full boot loader.
 *
 * Assembled with --defsym FLOPPY=1 it is a 1.44 MB diskette's boot
 * sector: floppies have no INT 13h extensions, so it reads the whole
 * diskette after itself (2879 sectors) with CHS reads (AH=02h), one track
 * (or its rest) at a time, and checks the same dword counter.
 *
 * Real mode, 16-bit code; built with GNU as and ld (see build.sh).
 */
        .code16
        .text
        .globl _start

        .ifdef CD
        .equ SECTOR, 2048
        .equ DATA_LBA, 21
        .equ DATA_SECTORS, 64
        .equ CHUNK, 16
        .else
        .ifdef FLOPPY
        .equ SECTOR, 512
        .equ DATA_LBA, 1
        .equ DATA_SECTORS, 2879
        .equ SPT, 18
        .equ HEADS, 2
        .equ CHUNK, SPT
        .else
        .equ SECTOR, 512
        .equ DATA_LBA, 1
        .equ DATA_SECTORS, 256
        .equ CHUNK, 64
        .endif
        .endif
        .equ DWORDS, DATA_SECTORS * SECTOR / 4
        .equ COM1, 0x3f8

_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %ss
        movw    $0x7c00, %sp
        ljmp    $0, $start2            /* normalise CS:IP to 0000:7Cxx */
start2:
        sti
        movb    %dl, drive

        .ifndef FLOPPY
        movb    $'E', stage
        movb    $0x41, %ah
        movw    $0x55aa, %bx
        int     $0x13
        jc      fail
        cmpw    $0xaa55, %bx
        jne     fail
        .endif

        xorl    %esi, %esi             /* checksum */
        xorl    %edi, %edi             /* expected next dword */
        movb    $'R', stage
read_loop:
        pushl   %esi
        .ifdef FLOPPY
        /* CHS of dap_lba; read to the end of its track (count in CX). */
        movw    dap_lba, %ax
        xorw    %dx, %dx
        movw    $SPT, %bx
        divw    %bx                    /* AX = track * HEADS + head, DX = sector - 1 */
        movw    $SPT, %cx
        subw    %dx, %cx               /* sectors left on the track */
        movw    %cx, chunk
        incb    %dl
        movb    %dl, %cl               /* sector (1-based) */
        xorw    %dx, %dx
        movw    $HEADS, %bx
        divw    %bx                    /* AX = cylinder, DX = head */
        movb    %al, %ch
        movb    %dl, %dh
        movb    drive, %dl
        movw    $0x2000, %ax
        movw    %ax, %es
        xorw    %bx, %bx
        movb    chunk, %al
        movb    $0x02, %ah
        int     $0x13
        .else
        movw    $dap, %si
        movb    $0x42, %ah
        movb    drive, %dl
        int     $0x13
        .endif
        popl    %esi
        jc      fail

        /* Verify the chunk at 2000:0000. */
        movb    $'D', stage
        pushw   %ds
        .ifdef FLOPPY
        movw    chunk, %cx
        shlw    $7, %cx                /* dwords in the chunk */
        .else
        movw    $CHUNK * SECTOR / 4, %cx
        .endif
        movw    $0x2000, %ax
        movw    %ax, %ds
        xorw    %bx, %bx
check:
        movl    (%bx), %eax
        cmpl    %eax, %edi
        jne     bad_data
        addl    %eax, %esi
        incl    %edi
        addw    $4, %bx
        loop    check
        popw    %ds

        .ifdef FLOPPY
        movzwl  chunk, %eax
        addl    %eax, dap_lba
        .else
        addl    $CHUNK, dap_lba
        .endif
        cmpl    $DATA_SECTORS + DATA_LBA, dap_lba
        jb      read_loop_r

        movb    $'S', stage
        cmpl    $(DWORDS * (DWORDS - 1) / 2) & 0xffffffff, %esi
        jne     fail
        .ifdef WRITE
        /* Write the last chunk read (still at 2000:0000) back to the disk
         * right after the data: the -snapshot test's guest write. */
        movb    $'W', stage
        movl    $DATA_LBA + DATA_SECTORS, dap_lba
        movw    $dap, %si
        movw    $0x4300, %ax           /* extended write, no verify */
        movb    drive, %dl
        int     $0x13
        jc      fail
        .endif
        movw    $ok_msg, %si
        call    puts
        jmp     halt

read_loop_r:
        movb    $'R', stage
        jmp     read_loop

bad_data:
        popw    %ds
fail:
        movw    $fail_msg, %si
        call    puts
        movb    stage, %al
        call    putc
        movw    $crlf, %si
        call    puts
halt:
        cli
        hlt
        jmp     halt

/* Print the NUL-terminated string at DS:SI on COM1. */
puts:
        lodsb
        testb   %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

/* Print AL on COM1, waiting for the transmitter holding register. */
putc:
        pushw   %ax
        movw    $COM1 + 5, %dx
2:      inb     %dx, %al
        testb   $0x20, %al
        jz      2b
        popw    %ax
        movw    $COM1, %dx
        outb    %al, %dx
        ret

        .ifdef CD
ok_msg:   .asciz "STRATA-CD-OK\r\n"
        .else
        .ifdef WRITE
ok_msg:   .asciz "STRATA-WRITE-OK\r\n"
        .else
ok_msg:   .asciz "STRATA-BOOT-OK\r\n"
        .endif
        .endif
fail_msg: .asciz "STRATA-BOOT-FAIL "
crlf:     .asciz "\r\n"

        .balign 4
dap:
        .byte   16, 0
        .word   CHUNK
        .word   0, 0x2000              /* offset, segment */
dap_lba:
        .long   DATA_LBA, 0
drive:  .byte   0
stage:  .byte   0
chunk:  .word   0

        .org    510
        .byte   0x55, 0xaa
