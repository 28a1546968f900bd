#!/bin/sh
# CORE benchmark: process start to SeaBIOS's "No bootable device." on COM1,
# and resident memory at that point, Strata vs QEMU 7.2 on the same SeaBIOS.
# Env: STRATA_BEFORE=/path/to/an/older/strata runs it too, in the same
#      alternation, for before/after comparisons.
# usage: bench/boot.sh [runs]
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --bin strata >/dev/null
qemu=$(bench/qemu-local.sh)
bios=/usr/share/seabios/bios-256k.bin
common="-m 512 -smp 2 -nodefaults -serial stdio -bios $bios"
python3 bench/startbench.py --marker "No bootable device." --runs "$runs" \
    "strata=target/release/strata $common" \
    ${STRATA_BEFORE:+"before=$STRATA_BEFORE $common"} \
    "qemu=$qemu -enable-kvm -nographic $common"
