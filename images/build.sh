#!/bin/sh
# Builds the test images into images/out/ (git-ignored), from source, with
# binutils (as, ld) and perl only. Rebuilds only what is older than its
# inputs.
#
#   images/out/bootsect.bin   the boot sector (bootsect.S)
#   images/out/ide-disk.img   boot sector + 256 sectors of dword counter
#                             + padding to 1 MiB: what bootsect.S checks
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/out"
mkdir -p "$out"

if [ ! -f "$out/bootsect.bin" ] || [ "$here/bootsect.S" -nt "$out/bootsect.bin" ]; then
    as --32 -o "$out/bootsect.o" "$here/bootsect.S"
    ld -m elf_i386 -Ttext 0x7c00 --oformat binary -e _start -o "$out/bootsect.bin.tmp" "$out/bootsect.o"
    size=$(wc -c < "$out/bootsect.bin.tmp")
    if [ "$size" -ne 512 ]; then
        echo "bootsect.bin is $size bytes, not 512" >&2
        exit 1
    fi
    mv "$out/bootsect.bin.tmp" "$out/bootsect.bin"
    rm -f "$out/bootsect.o"
fi

disk="$out/ide-disk.img"
if [ ! -f "$disk" ] || [ "$out/bootsect.bin" -nt "$disk" ] || [ "$0" -nt "$disk" ]; then
    {
        cat "$out/bootsect.bin"
        # 256 sectors = 32768 little-endian dwords 0, 1, 2, ...
        perl -e 'print pack("V*", 0 .. 32767)'
    } > "$disk.tmp"
    truncate -s 1M "$disk.tmp"
    mv "$disk.tmp" "$disk"
fi
echo "$disk"
