#!/bin/sh
# IDE benchmark (issue 6): process start to the project's boot sector
# printing its marker on COM1, booting from an IDE disk through SeaBIOS
# (which loads it and serves its 256-sector INT 13h reads over PIO).
# Strata vs QEMU 7.2, same SeaBIOS, same image, same options.
# Env: STRATA_BEFORE=/path/to/an/older/strata runs it too, in the same
#      alternation, for before/after comparisons.
# usage: bench/ide-boot.sh [runs]
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --bin strata >/dev/null
qemu=$(bench/qemu-local.sh)
. bench/boot-lib.sh
sh images/ide/build.sh >/dev/null
mkdir -p bench/out
img=bench/out/ide-boot.img
cp images/out/ide-disk.img "$img"
bios=/usr/share/seabios/bios-256k.bin
common="-m 512 -nodefaults -serial stdio -bios $bios -drive file=$img,format=raw,if=ide,index=0"
boot_race "STRATA-BOOT-OK" "$runs" $common
# The GRUB rescue CD as a live CD (ATAPI PIO reads through SeaBIOS and GRUB's
# own INT 13h use): process start to "Welcome to GRUB".
grub=/usr/lib/grub-rescue/grub-rescue-cdrom.iso
if [ -f "$grub" ]; then
    cd_common="-m 512 -nodefaults -serial stdio -bios $bios -drive file=$grub,format=raw,if=ide,index=2,media=cdrom -boot d"
    boot_race "Welcome to GRUB" "$runs" $cd_common
fi
