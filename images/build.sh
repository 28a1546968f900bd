#!/bin/sh
# Builds the project's test media from source into images/out/ (cached:
# a file is rebuilt only when its sources are newer). Needs gcc and binutils.
set -eu
cd "$(dirname "$0")"
mkdir -p out
# Tests run this in parallel: one build at a time.
exec 9>out/.lock
flock 9
. ./lib.sh
build_tinybios() { # variant
    out="out/tinybios-$1.bin"
    if [ ! -f "$out" ] || [ tinybios/tinybios.S -nt "$out" ]; then
        def=$(echo "VARIANT_$1" | tr a-z A-Z)
        gcc -m32 -c -D"$def"=1 -o "out/tinybios-$1.o" tinybios/tinybios.S
        ld -m elf_i386 -Ttext=0 --oformat binary -o "$out" "out/tinybios-$1.o"
        rm -f "out/tinybios-$1.o"
    fi
}
build_tinybios triple
build_tinybios fpu
build_tinybios rep

# The boot test kernel (images/testkernel), three forms:
#   testkernel-pvh.elf   ELF64 with a PVH note
#   testkernel-mb.elf    ELF64 with a multiboot header (a.out kludge)
#   testkernel.bzImage   Linux boot protocol 2.15 image (64-bit entry)
build_testkernel() {
    src=testkernel
    newest=$(ls -t "$src"/* common/* build.sh lib.sh | head -1)
    if [ -f out/testkernel.bzImage ] && [ -f out/testkernel-pvh.elf ] && [ -f out/testkernel-mb.elf ] \
        && [ out/testkernel.bzImage -nt "$newest" ]; then
        return
    fi
    tmp=$(mktemp -d)
    # shellcheck disable=SC2086
    gcc -Os $FREESTANDING_CFLAGS -c "$src/kernel.c" -o "$tmp/kernel.o"
    for s in entry pvhnote mbheader; do
        gcc -m64 -c "$src/$s.S" -o "$tmp/$s.o"
    done
    ld="ld -m elf_x86_64 -nostdlib -z max-page-size=0x1000 -z noexecstack --build-id=none --no-warn-rwx-segments -T $src/link.ld"
    $ld -o "$tmp/pvh.elf" "$tmp/entry.o" "$tmp/pvhnote.o" "$tmp/kernel.o"
    $ld -o "$tmp/mb.elf" "$tmp/entry.o" "$tmp/mbheader.o" "$tmp/kernel.o"
    $ld -o "$tmp/plain.elf" "$tmp/entry.o" "$tmp/kernel.o"
    objcopy -O binary "$tmp/plain.elf" "$tmp/payload.bin"
    gcc -m32 -c "$src/setup.S" -o "$tmp/setup.o"
    objcopy -O binary -j .setup "$tmp/setup.o" "$tmp/setup.bin"
    cat "$tmp/setup.bin" "$tmp/payload.bin" > "$tmp/bzImage"
    cp "$tmp/pvh.elf" out/testkernel-pvh.elf
    cp "$tmp/mb.elf" out/testkernel-mb.elf
    cp "$tmp/bzImage" out/testkernel.bzImage
    rm -rf "$tmp"
}
build_testkernel

# The IDE boot program, disk image and El Torito CD (images/ide/).
sh ide/build.sh >/dev/null
sh virtio-bench/build.sh # the virtio-blk benchmark guest (images/virtio-bench/)
sh ahci-bench/build.sh # the AHCI benchmark guest (images/ahci-bench/)
sh linux-init/build.sh >/dev/null # the Linux-driver lane's initramfs (images/linux-init/)
