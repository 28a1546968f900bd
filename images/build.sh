#!/bin/sh
# Builds the project's test media from source into images/out/ (cached:
# a file is rebuilt only when its sources are newer). Needs gcc and binutils.
set -eu
cd "$(dirname "$0")"
mkdir -p out
# Tests run this in parallel: one build at a time.
exec 9>out/.lock
flock 9
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
# The IDE boot program, disk image and El Torito CD (images/ide/).
sh ide/build.sh >/dev/null
