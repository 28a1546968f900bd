# Shared by the SeaBIOS boot benchmarks (ide-boot.sh, ahci-boot.sh,
# fdc-boot.sh); sourced after `qemu` is set.
#
# boot_race MARKER RUNS ARGS...: process start to MARKER on the serial
# console, the release strata (and STRATA_BEFORE, if set) against QEMU
# with the same ARGS, alternating runs (bench/startbench.py).
boot_race() {
    marker=$1
    n=$2
    shift 2
    python3 bench/startbench.py --marker "$marker" --runs "$n" \
        "strata=target/release/strata $*" \
        ${STRATA_BEFORE:+"before=$STRATA_BEFORE $*"} \
        "qemu=$qemu -enable-kvm -nographic $*"
}
