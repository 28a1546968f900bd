#!/bin/sh
# Builds the project's test kernels into images/out/ (git-ignored), only
# when a source is newer than the output:
#   testkernel-pvh.elf   ELF64 with a PVH note
#   testkernel-mb.elf    ELF64 with a multiboot header (a.out kludge)
#   testkernel.bzImage   Linux boot protocol 2.15 image (64-bit entry)
# Needs gcc and binutils (x86-64). Prints the output directory.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=$here/testkernel
out=$here/out
mkdir -p "$out"
stamp=$out/testkernel.bzImage
newest=$(ls -t "$src"/* "$0" | head -1)
if [ -f "$stamp" ] && [ -f "$out/testkernel-pvh.elf" ] && [ -f "$out/testkernel-mb.elf" ] && [ "$stamp" -nt "$newest" ]; then
	echo "$out"
	exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
CFLAGS="-m64 -Os -ffreestanding -nostdlib -fno-pic -fno-pie -fno-stack-protector -fno-builtin \
 -mno-red-zone -mgeneral-regs-only -mno-sse -mno-mmx -mno-80387 -fno-asynchronous-unwind-tables -Wall -Werror"
gcc $CFLAGS -c "$src/kernel.c" -o "$tmp/kernel.o"
for s in entry pvhnote mbheader; do
	gcc -m64 -c "$src/$s.S" -o "$tmp/$s.o"
done
LD="ld -m elf_x86_64 -nostdlib -z max-page-size=0x1000 -z noexecstack --build-id=none --no-warn-rwx-segments -T $src/link.ld"
$LD -o "$tmp/pvh.elf" "$tmp/entry.o" "$tmp/pvhnote.o" "$tmp/kernel.o"
$LD -o "$tmp/mb.elf" "$tmp/entry.o" "$tmp/mbheader.o" "$tmp/kernel.o"
$LD -o "$tmp/plain.elf" "$tmp/entry.o" "$tmp/kernel.o"
objcopy -O binary "$tmp/plain.elf" "$tmp/payload.bin"
gcc -m32 -c "$src/setup.S" -o "$tmp/setup.o"
objcopy -O binary -j .setup "$tmp/setup.o" "$tmp/setup.bin"
cat "$tmp/setup.bin" "$tmp/payload.bin" > "$tmp/bzImage"
cp "$tmp/pvh.elf" "$out/testkernel-pvh.elf"
cp "$tmp/mb.elf" "$out/testkernel-mb.elf"
cp "$tmp/bzImage" "$out/testkernel.bzImage"
echo "$out"
