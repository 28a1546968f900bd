#!/bin/sh
# Builds images/out/ahci-bench.elf (the AHCI benchmark guest, a multiboot
# v1 ELF64) from images/common/bench-entry.S and abench.c, when a source
# is newer. Called by images/build.sh, which holds the build lock.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
common="$here/../common"
out="$here/../out/ahci-bench.elf"
newest=$(ls -t "$here"/* "$common"/* "$here/../lib.sh" | head -1)
if [ -f "$out" ] && [ "$out" -nt "$newest" ]; then
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
. "$here/../lib.sh"
# shellcheck disable=SC2086
gcc -O2 $FREESTANDING_CFLAGS -c "$here/abench.c" -o "$tmp/abench.o"
gcc -m64 -c "$common/bench-entry.S" -o "$tmp/entry.o"
ld -m elf_x86_64 -nostdlib -z max-page-size=0x1000 -z noexecstack --build-id=none \
    --no-warn-rwx-segments -T "$common/bench.ld" -o "$tmp/abench.elf" "$tmp/entry.o" "$tmp/abench.o"
cp "$tmp/abench.elf" "$out"
