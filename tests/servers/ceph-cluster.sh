#!/bin/sh
# A throwaway single-node Ceph cluster on loopback, as Ceph's developer
# clusters run: one monitor and one OSD on memstore (RAM, no block
# device), no systemd, everything under DIR, without authentication, or
# with cephx when AUTH=cephx (the client.admin key is then in
# DIR/admin.key). For the rbd block driver's tests; Debian's ceph-mon and
# ceph-osd packages (make deps).
#
#   ceph-cluster.sh start DIR   prints the ceph.conf path once the OSD is
#                               up and pool `rbd` exists
#   ceph-cluster.sh stop DIR
set -eu
cmd=$1 dir=$(realpath -m "$2")
conf=$dir/ceph.conf

stop() {
    for p in "$dir"/run/*.pid; do
        [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true
    done
    sleep 0.5
    for p in "$dir"/run/*.pid; do
        [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null || true
    done
    return 0
}

if [ "$cmd" = stop ]; then
    stop
    exit 0
fi

rm -rf "$dir"
mkdir -p "$dir/run" "$dir/log" "$dir/mon" "$dir/osd"
# Free ports from the kernel: bind port 0 and keep the number.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
v2=$(port); v1=$(port)
fsid=$(cat /proc/sys/kernel/random/uuid)
cat > "$conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
auth cluster required = ${AUTH:-none}
auth service required = ${AUTH:-none}
auth client required = ${AUTH:-none}
ms bind ipv6 = false
public addr = 127.0.0.1
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd objectstore = memstore
memstore device bytes = 2147483648
osd max object name len = 460
osd max object namespace len = 64
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
mon data = $dir/mon/\$name
osd data = $dir/osd/\$name
keyring = $dir/keyring
[osd]
keyring = $dir/osd/\$name/keyring
CONF
ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring"
ceph-mon -c "$conf" -i a 2>>"$dir/log/mon-start.log"
id=$(timeout 60 ceph -c "$conf" osd create)
mkdir -p "$dir/osd/osd.$id"
if [ "${AUTH:-none}" = cephx ]; then
    timeout 60 ceph -c "$conf" auth get-or-create "osd.$id" mon 'allow profile osd' osd 'allow *' \
        mgr 'allow profile osd' -o "$dir/osd/osd.$id/keyring" >/dev/null
    ceph-authtool -p -n client.admin "$dir/keyring" > "$dir/admin.key"
fi
ceph-osd -c "$conf" -i "$id" --mkfs >/dev/null 2>&1
ceph-osd -c "$conf" -i "$id" 2>>"$dir/log/osd-start.log"
# Up when the OSD map says so.
i=0
until timeout 10 ceph -c "$conf" osd stat 2>/dev/null | grep -q "1 up"; do
    i=$((i + 1))
    if [ $i -gt 60 ]; then
        echo "ceph-cluster.sh: the OSD did not come up; see $dir/log" >&2
        stop
        exit 1
    fi
    sleep 1
done
timeout 60 ceph -c "$conf" osd pool create rbd 8 >/dev/null 2>&1
timeout 60 rbd -c "$conf" pool init rbd
echo "$conf"
