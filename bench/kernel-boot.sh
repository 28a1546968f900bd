#!/bin/sh
# Direct kernel boot: time from VMM process start to the kernel's first
# instruction (the test kernel's first instruction writes '!' to COM1) and
# to its "TK DONE" marker (after it has read and checksummed everything it
# was given), for Strata and, when available, QEMU with the same -kernel.
#
# Usage: bench/kernel-boot.sh [runs]      (default 5 runs per case)
# QEMU is Debian's qemu-system-x86 7.2, unpacked privately by
# bench/qemu-local.sh (the machine's qemu-utils stay as they are); set
# QEMU=/path/to/qemu-system-x86_64 to use another one.
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
sh images/build.sh
kdir=$(pwd)/images/out
strata=${STRATA:-target/release/strata}
[ -x "$strata" ] || cargo build --release --bin strata >&2
qemu=${QEMU:-$(sh bench/qemu-local.sh || true)}
head -c 4096 /dev/urandom > "${TMPDIR:-/tmp}/kb-initrd.bin"
python3 - "$runs" "$strata" "$kdir" "${TMPDIR:-/tmp}/kb-initrd.bin" "$qemu" <<'PY'
import os, shutil, statistics, subprocess, sys, tempfile, time
runs, strata, kdir, initrd = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
qemu = sys.argv[5] or None

def once(cmd, log):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = done = None
    while time.monotonic() - t0 < 60:
        try:
            data = open(log, "rb").read()
        except FileNotFoundError:
            data = b""
        now = time.monotonic() - t0
        if first is None and b"!" in data:
            first = now
        if b"TK DONE" in data:
            done = now
            break
        if p.poll() is not None:
            break
        time.sleep(0.0005)
    p.kill()
    err = p.communicate()[1].decode(errors="replace")
    if done is None:
        sys.exit(f"no 'TK DONE' from {' '.join(cmd)}:\n{err}")
    return first * 1000, done * 1000

def case(vmm, kernel):
    res = []
    for _ in range(runs):
        d = tempfile.mkdtemp()
        log = os.path.join(d, "serial.log")
        k = os.path.join(kdir, kernel)
        common = ["-m", "128", "-nodefaults", "-serial", f"file:{log}", "-kernel", k,
                  "-initrd", initrd, "-append", "bench"]
        if vmm == "strata":
            cmd = [strata] + common
        else:
            cmd = [qemu, "-machine", "pc,accel=kvm", "-display", "none",
                   "-bios", "/usr/share/seabios/bios-256k.bin"] + common
        res.append(once(cmd, log))
        shutil.rmtree(d)
    f = statistics.median(r[0] for r in res)
    t = statistics.median(r[1] for r in res)
    return f, t

rows = []
for kernel in ["testkernel-pvh.elf", "testkernel.bzImage", "testkernel-mb.elf"]:
    s = case("strata", kernel)
    # QEMU enters a bzImage through its real-mode setup code, which the
    # test kernel does not have (it halts there): no QEMU column for it.
    q = case("qemu", kernel) if qemu and not kernel.endswith("bzImage") else None
    rows.append((kernel, s, q))
ver = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0] if qemu else "not installed"
print(f"median of {runs} runs, ms from process start; QEMU: {ver}")
print("| kernel | Strata: first instruction | Strata: TK DONE | QEMU: first instruction | QEMU: TK DONE |")
print("|---|---|---|---|---|")
for k, s, q in rows:
    qs = f"{q[0]:.1f} | {q[1]:.1f}" if q else "n/a | n/a"
    print(f"| {k} | {s[0]:.1f} | {s[1]:.1f} | {qs} |")
PY
