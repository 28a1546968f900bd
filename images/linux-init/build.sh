#!/bin/sh
# Builds the Linux-driver lane's initramfs into images/out/ (git-ignored),
# with gcc and perl only (the cpio tool may be absent). Rebuilds only when
# a source is newer than the output.
#
#   images/out/linux-init          the static, libc-free /init (init.c)
#   images/out/linux-lane.cpio     newc archive: /, /dev, /dev/console,
#                                  /proc, /sys, /mnt, /init (uncompressed: the guest
#                                  unpacks at ~0.5 MB/s, so keep it tiny)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../out"
mkdir -p "$out"
# images/build.sh and tests may run this at the same time.
exec 7>"$out/.linux-init-lock"
flock 7

. "$here/../lib.sh" # stale()

init="$out/linux-init"
if stale "$init" "$here/init.c" "$0"; then
    # -mgeneral-regs-only: no SSE state to worry about in a program this
    # small; -s: every byte of the archive is copied by a slow ring 0.
    gcc -static -nostdlib -ffreestanding -O2 -Wall -Wextra -Werror \
        -fno-pie -no-pie -fno-stack-protector -fno-asynchronous-unwind-tables \
        -mgeneral-regs-only -s -Wl,--build-id=none -Wl,-z,noexecstack \
        -o "$init.tmp" "$here/init.c"
    mv "$init.tmp" "$init"
fi

cpio="$out/linux-lane.cpio"
if stale "$cpio" "$init" "$0"; then
    # newc format: "070701", 13 8-digit hex fields, the name with its NUL,
    # padded to 4 bytes, then the data, padded to 4 bytes.
    # /dev/console must be in the archive: the kernel opens it for init's
    # stdin/stdout/stderr before init can mount devtmpfs.
    perl -e '
        use strict;
        my ($init, $out) = @ARGV;
        open(my $f, "<:raw", $init) or die "$init: $!";
        local $/; my $data = <$f>;
        my $ino = 300000;
        my $pad = sub { "\0" x ((4 - ($_[0] % 4)) % 4) };
        my $ent = sub {
            my ($name, $mode, $rmaj, $rmin, $body) = @_;
            my $h = sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
                $ino++, $mode, 0, 0, 1, 0, length $body, 0, 0, $rmaj, $rmin,
                length($name) + 1, 0);
            my $s = $h . $name . "\0";
            return $s . $pad->(length $s) . $body . $pad->(length $body);
        };
        my $a = $ent->(".", 040755, 0, 0, "")
            . $ent->("dev", 040755, 0, 0, "")
            . $ent->("dev/console", 020600, 5, 1, "")
            . $ent->("proc", 040755, 0, 0, "")
            . $ent->("sys", 040755, 0, 0, "")
            . $ent->("mnt", 040755, 0, 0, "")
            . $ent->("init", 0100755, 0, 0, $data)
            . $ent->("TRAILER!!!", 0, 0, 0, "");
        $a .= "\0" x ((512 - length($a) % 512) % 512);
        open(my $o, ">:raw", $out) or die "$out: $!";
        print $o $a;
    ' "$init" "$cpio.tmp"
    mv "$cpio.tmp" "$cpio"
fi
echo "$cpio"
