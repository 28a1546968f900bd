#!/bin/sh
# Floppy boot benchmark (issue 19): process start to the project's floppy
# boot program printing its marker on COM1: SeaBIOS boots from `-fda`
# (the i82078 and ISA DMA behind its floppy driver) and the program reads
# the whole 1.44 MB diskette back through INT 13h CHS reads, checking
# every dword. Then GRUB's rescue floppy to "Welcome to GRUB". Strata vs
# QEMU 7.2, same SeaBIOS, same images, same options; runs alternate
# (bench/startbench.py), median and spread.
# Env: STRATA_BEFORE=/path/to/an/older/strata runs it too.
# usage: bench/fdc-boot.sh [runs]
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --bin strata >/dev/null
qemu=$(bench/qemu-local.sh)
. bench/boot-lib.sh
sh images/ide/build.sh >/dev/null
mkdir -p bench/out
img=bench/out/fdc-boot.img
cp images/out/floppy.img "$img"
bios=/usr/share/seabios/bios-256k.bin
common="-m 512 -nodefaults -serial stdio -bios $bios -drive file=$img,format=raw,if=floppy,readonly=on -boot a"
boot_race "STRATA-BOOT-OK" "$runs" $common
grub=/usr/lib/grub-rescue/grub-rescue-floppy.img
if [ -f "$grub" ]; then
    g_common="-m 512 -nodefaults -serial stdio -bios $bios -drive file=$grub,format=raw,if=floppy,readonly=on -boot a"
    boot_race "Welcome to GRUB" "$runs" $g_common
fi
