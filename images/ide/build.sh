#!/bin/sh
# Builds the IDE test images into images/out/ (git-ignored), from source, with
# binutils (as, ld) and perl only. Rebuilds only what is older than its
# inputs.
#
#   images/out/bootsect.bin     the disk boot sector (bootsect.S)
#   images/out/bootsect-cd.bin  the same program for a CD (--defsym CD=1)
#   images/out/bootsect-write.bin, ide-disk-write.img: the disk program
#                               that also writes (--defsym WRITE=1)
#   images/out/ide-disk.img     boot sector + 256 sectors of a dword
#                               counter, padded to 1 MiB
#   images/out/floppy.img       the floppy boot sector (--defsym FLOPPY=1)
#                               + 2879 sectors of the counter: 1.44 MB
#   images/out/ide-cd.iso       an El Torito "no emulation" CD: volume
#                               descriptors at 16-18, boot catalog at 19,
#                               boot image at 20, 64 sectors of the counter
#                               from 21
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../out"
mkdir -p "$out"
# Tests and images/build.sh may run this at the same time.
exec 8>"$out/.ide-lock"
flock 8

. "$here/../lib.sh" # stale()

assemble() { # assemble OUT [as flags]
    o=$1
    shift
    as --32 "$@" -o "$o.o" "$here/bootsect.S"
    ld -m elf_i386 -Ttext 0x7c00 --oformat binary -e _start -o "$o.tmp" "$o.o"
    rm -f "$o.o"
    size=$(wc -c < "$o.tmp")
    if [ "$size" -ne 512 ]; then
        echo "$o is $size bytes, not 512" >&2
        exit 1
    fi
    mv "$o.tmp" "$o"
}

stale "$out/bootsect.bin" "$here/bootsect.S" && assemble "$out/bootsect.bin"
stale "$out/bootsect-cd.bin" "$here/bootsect.S" && assemble "$out/bootsect-cd.bin" --defsym CD=1
stale "$out/bootsect-write.bin" "$here/bootsect.S" && assemble "$out/bootsect-write.bin" --defsym WRITE=1
stale "$out/bootsect-fd.bin" "$here/bootsect.S" && assemble "$out/bootsect-fd.bin" --defsym FLOPPY=1

# A 1.44 MB diskette: the floppy boot sector and 2879 sectors of the
# counter (368512 dwords).
fd="$out/floppy.img"
if stale "$fd" "$out/bootsect-fd.bin" "$0"; then
    {
        cat "$out/bootsect-fd.bin"
        perl -e 'print pack("V*", 0 .. 368511)'
    } > "$fd.tmp"
    mv "$fd.tmp" "$fd"
fi

for kind in "" -write; do
    disk="$out/ide-disk$kind.img"
    if stale "$disk" "$out/bootsect$kind.bin" "$0"; then
        {
            cat "$out/bootsect$kind.bin"
            # 256 sectors = 32768 little-endian dwords 0, 1, 2, ...
            perl -e 'print pack("V*", 0 .. 32767)'
        } > "$disk.tmp"
        truncate -s 1M "$disk.tmp"
        mv "$disk.tmp" "$disk"
    fi
done

iso="$out/ide-cd.iso"
if stale "$iso" "$out/bootsect-cd.bin" "$0"; then
    perl -e '
        use strict;
        my ($boot_file, $out) = @ARGV;
        open(my $bf, "<:raw", $boot_file) or die "$boot_file: $!";
        local $/; my $boot = <$bf>;
        my $total = 21 + 64;
        my $sec = sub { my $s = shift; $s . ("\0" x (2048 - length $s)) };
        my $both32 = sub { pack("V", $_[0]) . pack("N", $_[0]) };
        my $both16 = sub { pack("v", $_[0]) . pack("n", $_[0]) };
        # Primary volume descriptor (ECMA-119 8.4), minimal.
        my $pvd = "\x01CD001\x01\0" . (" " x 32) . sprintf("%-32s", "STRATA_TEST")
            . ("\0" x 8) . $both32->($total) . ("\0" x 32)
            . $both16->(1) . $both16->(1) . $both16->(2048);
        # Boot record (El Torito 2.0): catalog at sector 19.
        my $brvd = "\0CD001\x01" . pack("a32", "EL TORITO SPECIFICATION")
            . ("\0" x 32) . pack("V", 19);
        my $term = "\xffCD001\x01";
        # Validation entry: header 1, x86, ID, checksum, 55 AA.
        my $val = pack("CCv", 1, 0, 0) . pack("a24", "STRATA") . pack("v", 0) . "\x55\xaa";
        my $sum = 0; $sum += $_ for unpack("v16", $val);
        substr($val, 28, 2) = pack("v", (-$sum) & 0xffff);
        # Default entry: bootable, no emulation, load segment 07C0h,
        # 4 virtual sectors (one 2048-byte sector) from sector 20.
        my $def = pack("CCvCCvVa20", 0x88, 0, 0x7c0, 0, 0, 4, 20, "");
        my $img = ("\0" x (16 * 2048)) . $sec->($pvd) . $sec->($brvd) . $sec->($term)
            . $sec->($val . $def) . $sec->($boot) . pack("V*", 0 .. 32767);
        open(my $o, ">:raw", $out) or die "$out: $!";
        print $o $img;
    ' "$out/bootsect-cd.bin" "$iso.tmp"
    mv "$iso.tmp" "$iso"
fi
echo "$disk"
echo "$iso"
