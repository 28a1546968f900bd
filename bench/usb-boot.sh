#!/bin/sh
# USB benchmark (issue 21): process start to the project's boot sector
# printing its marker on COM1, booting from a usb-storage through
# SeaBIOS's USB mass storage driver (which loads it and serves its
# 256-sector INT 13h reads as Bulk-Only Transport commands) on `-usb`'s
# UHCI, on qemu-xhci and on q35's EHCI; then GRUB's rescue USB image on
# the UHCI to "Welcome to GRUB". Strata vs QEMU 7.2, same SeaBIOS
# (bios-256k.bin, for its xHCI driver), same image, same options.
# Env: STRATA_BEFORE=/path/to/an/older/strata runs it too; GRUB=0 skips
#      the GRUB case (about 35 s a boot).
# usage: bench/usb-boot.sh [runs]
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --bin strata >/dev/null
qemu=$(bench/qemu-local.sh)
. bench/boot-lib.sh
sh images/ide/build.sh >/dev/null
mkdir -p bench/out
img=bench/out/usb-boot.img
cp images/out/ide-disk.img "$img"
bios=/usr/share/seabios/bios-256k.bin
base="-m 512 -nodefaults -serial stdio -bios $bios -drive file=$img,format=raw,if=none,id=stick"
echo "== usb-storage on -usb (UHCI)"
boot_race "STRATA-BOOT-OK" "$runs" $base -usb -device usb-storage,drive=stick,bootindex=0
echo "== usb-storage on qemu-xhci"
boot_race "STRATA-BOOT-OK" "$runs" $base -device qemu-xhci,id=xhci \
    -device usb-storage,bus=xhci.0,drive=stick,bootindex=0
echo "== usb-storage on q35 -usb (EHCI)"
boot_race "STRATA-BOOT-OK" "$runs" -machine q35 $base -usb \
    -device usb-storage,bus=usb-bus.0,drive=stick,bootindex=0
grub=/usr/lib/grub-rescue/grub-rescue-usb.img
if [ -f "$grub" ] && [ "${GRUB:-1}" = 1 ]; then
    cp "$grub" bench/out/grub-usb.img
    echo "== grub-rescue-usb.img on -usb (UHCI)"
    boot_race "Welcome to GRUB" "$runs" -m 512 -nodefaults -serial stdio -bios $bios \
        -drive file=bench/out/grub-usb.img,format=raw,if=none,id=g -usb \
        -device usb-storage,drive=g,bootindex=0
fi
