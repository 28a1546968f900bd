# Shared by the image build scripts (sourced with `.`).

# stale TARGET INPUT...: true when TARGET is missing or older than an input.
stale() {
    t=$1
    shift
    [ -f "$t" ] || return 0
    for i in "$@"; do
        [ "$i" -nt "$t" ] && return 0
    done
    return 1
}

# Flags for the freestanding 64-bit guest programs (images/testkernel,
# images/virtio-bench): no libc, no PIC, and no x87/SSE (guest ring 0
# cannot emulate them here, PLATFORM.md; CR4.OSFXSR stays off, so they
# would fault in ring 3 too).
FREESTANDING_CFLAGS="-m64 -ffreestanding -nostdlib -fno-pic -fno-pie -fno-stack-protector -fno-builtin
    -mno-red-zone -mgeneral-regs-only -mno-sse -mno-mmx -mno-80387
    -fno-asynchronous-unwind-tables -Wall -Werror"
