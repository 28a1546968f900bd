#!/bin/sh
# AHCI boot benchmark (issue 18): process start to the project's boot
# sector printing its marker on COM1, booting through SeaBIOS from a disk
# on q35's built-in AHCI (`-hda`: SeaBIOS's AHCI driver loads it and serves
# its 256-sector INT 13h reads by DMA through a command slot), and GRUB's
# rescue CD as a live CD on the same controller (`-cdrom -boot d`: ATAPI
# packets). Strata vs QEMU 7.2, same SeaBIOS, same images, same options;
# runs alternate (bench/startbench.py), median and spread.
# Env: STRATA_BEFORE=/path/to/an/older/strata runs it too, in the same
#      alternation, for before/after comparisons.
# usage: bench/ahci-boot.sh [runs]
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --bin strata >/dev/null
qemu=$(bench/qemu-local.sh)
. bench/boot-lib.sh
sh images/ide/build.sh >/dev/null
mkdir -p bench/out
img=bench/out/ahci-boot.img
cp images/out/ide-disk.img "$img"
bios=/usr/share/seabios/bios-256k.bin
common="-M q35 -m 512 -nodefaults -serial stdio -bios $bios -drive file=$img,format=raw,if=ide,index=0"
boot_race "STRATA-BOOT-OK" "$runs" $common
grub=/usr/lib/grub-rescue/grub-rescue-cdrom.iso
if [ -f "$grub" ]; then
    cd_common="-M q35 -m 512 -nodefaults -serial stdio -bios $bios -drive file=$grub,format=raw,if=ide,index=2,media=cdrom -boot d"
    boot_race "Welcome to GRUB" "$runs" $cd_common
fi
