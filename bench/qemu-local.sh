#!/bin/sh
# Fetches Debian's qemu-system-x86 (7.2) and the libraries it needs into
# bench/out/qemu without installing them, so that benchmarks can run QEMU
# side by side with Strata without replacing the machine's qemu-utils.
# Prints the path of a wrapper script that runs qemu-system-x86_64.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest="$here/out/qemu"
wrapper="$dest/qemu-system-x86_64"
if [ -x "$wrapper" ]; then echo "$wrapper"; exit 0; fi
mkdir -p "$dest/debs" "$dest/root"
cd "$dest/debs"
apt-get download -q qemu-system-x86 qemu-system-data libcapstone4 libfdt1 libpmem1 librdmacm1 \
    libibverbs1 libslirp0 libvdeplug2 libnl-3-200 libnl-route-3-200 libndctl6 libdaxctl1 >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null 2>&1
    apt-get download -q qemu-system-x86 qemu-system-data libcapstone4 libfdt1 libpmem1 librdmacm1 \
        libibverbs1 libslirp0 libvdeplug2 libnl-3-200 libnl-route-3-200 libndctl6 libdaxctl1 >/dev/null
}
for f in *.deb; do dpkg -x "$f" "$dest/root"; done
cat > "$wrapper" <<EOW
#!/bin/sh
export LD_LIBRARY_PATH="$dest/root/usr/lib/x86_64-linux-gnu:$dest/root/lib/x86_64-linux-gnu"
exec "$dest/root/usr/bin/qemu-system-x86_64" -L "$dest/root/usr/share/qemu" "\$@"
EOW
chmod +x "$wrapper"
echo "$wrapper"
