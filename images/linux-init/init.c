/*
 * /init for the Linux-driver lane (cli/tests/linux_lane.rs).
 *
 * The kernel's own storage drivers (ata_piix, sr, virtio_blk) read sectors
 * through Strata; this program checksums what they return so the test can
 * compare it with the bytes it wrote into the image.
 *
 * Kernel command line items it understands (from /proc/cmdline, so an item
 * may repeat; the kernel would collapse repeated name=value pairs in init's
 * environment):
 *   check=<dev>:<sectors>[,<dev>:<sectors>...]
 *       read the first <sectors> 512-byte sectors of /dev/<dev>, print
 *       "GUEST-SUM <dev> <16 hex digits>" (FNV-1a 64 of the bytes)
 *   checkwait=<seconds>  how long to wait for each node (default 15)
 *   show=<path>  print "GUEST-SHOW <path> <first line of the file>", e.g.
 *       a sysfs attribute that tells which driver path the kernel took
 *   rwloop=<dev>:<KiB>:<rounds>
 *       for each round, write <KiB> of a pattern that depends on the round
 *       and the offset to /dev/<dev> (O_DIRECT, 64 KiB per write), read it
 *       all back and compare; print "GUEST-RW <dev> <round> ok" after each
 *       round. Any error or mismatch prints GUEST-ERR and ends the loop.
 *   iops=<dev>:<KiB>:<count>
 *       a timed workload for benchmarks (bench/vhost-user.sh): <count>
 *       O_DIRECT writes of <KiB> each (at most 2048) at pseudo-random
 *       <KiB>-aligned offsets over the whole of /dev/<dev>, one at a time,
 *       then <count> reads the same way; after each phase print
 *       "GUEST-IOPS <dev> <write|read> <KiB> <count> <microseconds> <IOPS>"
 *       (guest monotonic clock). The data written is whatever the buffer
 *       holds: this measures the path, rwloop= checks the data.
 *   vfat=<dev>
 *       mount /dev/<dev> (vfat) on /mnt and play the user of a host directory
 *       exported by vvfat (cli/tests/vvfat_guest.rs): print
 *       "GUEST-VFAT-READ <bytes> <16 hex digits>" for /mnt/hello.txt (FNV-1a
 *       64), write /mnt/from-guest.bin (20000 bytes of the rwloop pattern,
 *       round 7), make the directory "/mnt/guest dir" with inner.txt
 *       ("inner\n"), rename /mnt/rename-me.txt to /mnt/renamed.txt, delete
 *       /mnt/delete-me.txt, fsync each (FAT's fsync flushes the disk), unmount
 *       and print "GUEST-VFAT-DONE"
 *   powerbutton
 *       after the checks, wait for the ACPI power button (the evdev device
 *       named "Power Button"), as a distribution's logind or acpid does:
 *       print "GUEST-POWERBUTTON-READY", and on the key press print
 *       "GUEST-POWERBUTTON" and power off (ACPI S5).
 * Then it prints "GUEST-DONE <uptime>" and powers off (halts where the
 * kernel has no way to power off, e.g. with acpi=off).
 *
 * Failures print "GUEST-ERR <dev> <what> <errno>" and go on: the test
 * reports the whole console, which says more than a hang would.
 *
 * Why it looks like this: under this host's KVM (kvm_pvm), guest ring 0 is
 * emulated instruction by instruction, so every system call and every byte
 * the kernel copies is expensive while user mode runs natively. Hence no
 * libc, few syscalls, one big O_DIRECT read per device (the driver DMAs
 * straight into our buffer: no page cache, no readahead, no copy_to_user),
 * and the checksum computed here in ring 3.
 *
 * Build: gcc -static -nostdlib -ffreestanding -O2 (see build.sh).
 */

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;

/* x86-64 syscall numbers and flags (asm/unistd_64.h, fcntl.h, reboot.h). */
enum {
    SYS_read = 0,
    SYS_write = 1,
    SYS_open = 2,
    SYS_close = 3,
    SYS_nanosleep = 35,
    SYS_exit = 60,
    SYS_mount = 165,
    SYS_reboot = 169,
    SYS_clock_gettime = 228,
    SYS_pause = 34,
    SYS_pwrite64 = 18,
    SYS_pread64 = 17,
    SYS_fsync = 74,
    SYS_rename = 82,
    SYS_mkdir = 83,
    SYS_unlink = 87,
    SYS_umount2 = 166,
    SYS_ioctl = 16,
};
#define O_RDONLY 0
#define O_WRONLY 1
#define O_RDWR 2
#define O_CREAT 0100
#define O_TRUNC 01000
#define O_DIRECTORY 0200000
#define O_DIRECT 040000
#define EINTR 4
#define EINVAL 22
#define CLOCK_MONOTONIC 1
#define CLOCK_BOOTTIME 7
#define BLKGETSIZE64 0x80081272UL
#define REBOOT_MAGIC1 0xfee1dead
#define REBOOT_MAGIC2 0x28121969
#define REBOOT_CMD_HALT 0xcdef0123
#define REBOOT_CMD_POWER_OFF 0x4321fedc

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e)
{
    i64 ret;
    register i64 r10 __asm__("r10") = d;
    register i64 r8 __asm__("r8") = e;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return ret;
}
#define sys3(n, a, b, c) sys6(n, (i64)(a), (i64)(b), (i64)(c), 0, 0)

/* gcc may emit calls to these even with -ffreestanding. */
void *memset(void *d, int c, u64 n)
{
    unsigned char *p = d;
    while (n--)
        *p++ = (unsigned char)c;
    return d;
}
void *memcpy(void *d, const void *s, u64 n)
{
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

/* ---- output: build a line in a buffer, then one write() per line ---- */
static char line[512];
static u64 len;

static void put(const char *s)
{
    while (*s && len < sizeof(line) - 1)
        line[len++] = *s++;
}
static void putn(const char *s, u64 n)
{
    while (n-- && len < sizeof(line) - 1)
        line[len++] = *s++;
}
static void putu(u64 v)
{
    char t[24];
    int i = 0;
    do
        t[i++] = (char)('0' + v % 10);
    while ((v /= 10) && i < 24);
    while (i)
        putn(&t[--i], 1);
}
static void puthex(u64 v)
{
    for (int s = 60; s >= 0; s -= 4)
        putn(&"0123456789abcdef"[(v >> s) & 15], 1);
}
static void flush(void)
{
    line[len++] = '\n';
    sys3(SYS_write, 1, line, len);
    len = 0;
}

struct timespec {
    i64 sec, nsec;
};
static u64 uptime_ms(void)
{
    struct timespec t = {0, 0};
    sys3(SYS_clock_gettime, CLOCK_BOOTTIME, &t, 0);
    return (u64)t.sec * 1000 + (u64)t.nsec / 1000000;
}
static void putuptime(void)
{
    u64 ms = uptime_ms();
    putu(ms / 1000);
    put(".");
    putn(&"0123456789"[ms / 100 % 10], 1);
    putn(&"0123456789"[ms / 10 % 10], 1);
    putn(&"0123456789"[ms % 10], 1);
}

static void err(const char *dev, u64 devlen, const char *what, i64 e)
{
    put("GUEST-ERR ");
    putn(dev, devlen);
    put(" ");
    put(what);
    put(" ");
    putu((u64)-e);
    flush();
}

/* ---- the data buffer: page aligned for O_DIRECT (sr needs 2048) ---- */
/* 2 MiB: the largest check is a whole 1.44 MB diskette (2880 sectors). */
#define BUF_SECTORS 4096
static unsigned char buf[BUF_SECTORS * 512] __attribute__((aligned(4096)));
static char text[4096];  /* /proc/cmdline, parsed while checks run */
static char parts[4096]; /* /proc/partitions or a show= file */

static i64 read_full(i64 fd, unsigned char *p, u64 want)
{
    u64 got = 0;
    while (got < want) {
        i64 r = sys3(SYS_read, fd, p + got, want - got);
        if (r == -EINTR)
            continue;
        if (r < 0)
            return r;
        if (r == 0)
            break;
        got += (u64)r;
    }
    return (i64)got;
}

static i64 slurp(const char *path, char *out, u64 cap)
{
    i64 fd = sys3(SYS_open, path, O_RDONLY, 0);
    if (fd < 0)
        return fd;
    i64 n = read_full(fd, (unsigned char *)out, cap - 1);
    sys3(SYS_close, fd, 0, 0);
    out[n < 0 ? 0 : n] = 0;
    return n;
}

static u64 fnv1a64(const unsigned char *p, u64 n)
{
    u64 h = 0xcbf29ce484222325UL;
    while (n--) {
        h ^= *p++;
        h *= 0x100000001b3UL;
    }
    return h;
}

static u64 parse_u(const char **s)
{
    u64 v = 0;
    while (**s >= '0' && **s <= '9')
        v = v * 10 + (u64)(*(*s)++ - '0');
    return v;
}

static int starts(const char *s, const char *p)
{
    while (*p)
        if (*s++ != *p++)
            return 0;
    return 1;
}

static u64 wait_s = 15;

static void show(const char *path, u64 pathlen)
{
    char p[256];
    if (pathlen >= sizeof(p)) {
        err(path, pathlen, "path-too-long", -EINVAL);
        return;
    }
    memcpy(p, path, pathlen);
    p[pathlen] = 0;
    i64 n = slurp(p, parts, sizeof(parts));
    if (n < 0) {
        err(path, pathlen, "show", n);
        return;
    }
    u64 end = 0;
    while (parts[end] && parts[end] != '\n')
        end++;
    put("GUEST-SHOW ");
    putn(path, pathlen);
    put(" ");
    putn(parts, end);
    flush();
}

/* Opens /dev/<dev>, polling until the driver has registered it. */
static i64 open_dev(const char *dev, u64 devlen, i64 flags)
{
    char path[64] = "/dev/";
    if (devlen > sizeof(path) - 6)
        return -EINVAL;
    memcpy(path + 5, dev, devlen);
    path[5 + devlen] = 0;
    u64 deadline = uptime_ms() + wait_s * 1000;
    for (;;) {
        i64 fd = sys3(SYS_open, path, O_RDONLY | flags, 0);
        /* ENOENT: not probed yet; ENXIO/ENOMEDIUM: not ready yet. */
        if (fd >= 0 || uptime_ms() >= deadline)
            return fd;
        struct timespec t = {0, 50 * 1000 * 1000};
        sys3(SYS_nanosleep, &t, 0, 0);
    }
}

static void check(const char *dev, u64 devlen, u64 sectors)
{
    if (sectors == 0 || sectors > BUF_SECTORS) {
        err(dev, devlen, "bad-sector-count", -EINVAL);
        return;
    }
    u64 want = sectors * 512;
    i64 fd = open_dev(dev, devlen, O_DIRECT);
    if (fd < 0) {
        err(dev, devlen, "open", fd);
        /* Show what the kernel did find. */
        i64 n = slurp("/proc/partitions", parts, sizeof(parts));
        if (n > 0)
            sys3(SYS_write, 1, parts, n);
        return;
    }
    i64 n = read_full(fd, buf, want);
    if (n == -EINVAL) {
        /* O_DIRECT refused (length not a multiple of the device's logical
         * block size, e.g. 2048 on a CD): fall back to the page cache. */
        sys3(SYS_close, fd, 0, 0);
        fd = open_dev(dev, devlen, 0);
        n = fd < 0 ? fd : read_full(fd, buf, want);
    }
    if (fd >= 0)
        sys3(SYS_close, fd, 0, 0);
    if (n < 0) {
        err(dev, devlen, "read", n);
        return;
    }
    if ((u64)n != want) {
        err(dev, devlen, "short-read-bytes", -n);
        return;
    }
    put("GUEST-SUM ");
    putn(dev, devlen);
    put(" ");
    puthex(fnv1a64(buf, want));
    flush();
}

/* The rwloop pattern: a 64-bit word from the round and the byte offset,
 * so a block written in an earlier round, or at another offset, differs. */
static u64 pattern(u64 round, u64 off)
{
    u64 x = (round << 40) ^ off ^ 0x9e3779b97f4a7c15UL;
    x ^= x >> 31;
    x *= 0xbf58476d1ce4e5b9UL;
    return x ^ (x >> 29);
}

#define RW_CHUNK (64 * 1024)

static int rw_round(i64 fd, const char *dev, u64 devlen, u64 round, u64 bytes)
{
    u64 *w = (u64 *)buf;
    for (u64 off = 0; off < bytes; off += RW_CHUNK) {
        for (u64 i = 0; i < RW_CHUNK / 8; i++)
            w[i] = pattern(round, off + i * 8);
        i64 r;
        do
            r = sys6(SYS_pwrite64, fd, (i64)buf, RW_CHUNK, (i64)off, 0);
        while (r == -EINTR);
        if (r != RW_CHUNK) {
            err(dev, devlen, "write", r < 0 ? r : -EINVAL);
            return 0;
        }
    }
    for (u64 off = 0; off < bytes; off += RW_CHUNK) {
        i64 r;
        do
            r = sys6(SYS_pread64, fd, (i64)buf, RW_CHUNK, (i64)off, 0);
        while (r == -EINTR);
        if (r != RW_CHUNK) {
            err(dev, devlen, "read", r < 0 ? r : -EINVAL);
            return 0;
        }
        for (u64 i = 0; i < RW_CHUNK / 8; i++) {
            if (w[i] != pattern(round, off + i * 8)) {
                put("GUEST-ERR ");
                putn(dev, devlen);
                put(" mismatch round ");
                putu(round);
                put(" offset ");
                putu(off + i * 8);
                flush();
                return 0;
            }
        }
    }
    put("GUEST-RW ");
    putn(dev, devlen);
    put(" ");
    putu(round);
    put(" ok");
    flush();
    return 1;
}

static void rwloop(const char *dev, u64 devlen, u64 kib, u64 rounds)
{
    u64 bytes = kib * 1024;
    if (bytes == 0 || bytes % RW_CHUNK) {
        err(dev, devlen, "rwloop-size-not-64k-multiple", -EINVAL);
        return;
    }
    char path[64] = "/dev/";
    if (devlen > sizeof(path) - 6) {
        err(dev, devlen, "name-too-long", -EINVAL);
        return;
    }
    /* open_dev polls until the driver has registered the disk. */
    i64 fd = open_dev(dev, devlen, O_DIRECT);
    if (fd >= 0)
        sys3(SYS_close, fd, 0, 0);
    memcpy(path + 5, dev, devlen);
    path[5 + devlen] = 0;
    fd = sys3(SYS_open, path, O_RDWR | O_DIRECT, 0);
    if (fd < 0) {
        err(dev, devlen, "open-rw", fd);
        return;
    }
    for (u64 round = 1; round <= rounds; round++)
        if (!rw_round(fd, dev, devlen, round, bytes))
            break;
    sys3(SYS_close, fd, 0, 0);
}

/* ---- iops=: a timed random-offset workload ---- */

static u64 now_us(void)
{
    struct timespec t = {0, 0};
    sys3(SYS_clock_gettime, CLOCK_MONOTONIC, &t, 0);
    return (u64)t.sec * 1000000 + (u64)t.nsec / 1000;
}

/* One phase: <count> requests of <bytes> at offsets drawn from a
 * xorshift64 sequence (the same one for writes and reads, so the reads
 * find what was written). Returns 0 after an error. */
static int iops_phase(i64 fd, const char *dev, u64 devlen, int write, u64 bytes, u64 count,
                      u64 slots)
{
    u64 x = 0x2545f4914f6cdd1dUL;
    u64 t0 = now_us();
    for (u64 i = 0; i < count; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        i64 off = (i64)((x % slots) * bytes);
        i64 r;
        do
            r = sys6(write ? SYS_pwrite64 : SYS_pread64, fd, (i64)buf, (i64)bytes, off, 0);
        while (r == -EINTR);
        if (r != (i64)bytes) {
            err(dev, devlen, write ? "iops-write" : "iops-read", r < 0 ? r : -EINVAL);
            return 0;
        }
    }
    u64 us = now_us() - t0;
    put("GUEST-IOPS ");
    putn(dev, devlen);
    put(write ? " write " : " read ");
    putu(bytes / 1024);
    put(" ");
    putu(count);
    put(" ");
    putu(us);
    put(" ");
    putu(count * 1000000 / (us ? us : 1));
    flush();
    return 1;
}

static void iops(const char *dev, u64 devlen, u64 kib, u64 count)
{
    u64 bytes = kib * 1024;
    if (bytes == 0 || bytes > sizeof(buf) || count == 0) {
        err(dev, devlen, "iops-bad-arguments", -EINVAL);
        return;
    }
    i64 fd = open_dev(dev, devlen, O_DIRECT);
    if (fd >= 0)
        sys3(SYS_close, fd, 0, 0);
    char path[64] = "/dev/";
    if (devlen > sizeof(path) - 6) {
        err(dev, devlen, "name-too-long", -EINVAL);
        return;
    }
    memcpy(path + 5, dev, devlen);
    path[5 + devlen] = 0;
    fd = sys3(SYS_open, path, O_RDWR | O_DIRECT, 0);
    if (fd < 0) {
        err(dev, devlen, "open-rw", fd);
        return;
    }
    u64 size = 0;
    i64 r = sys3(SYS_ioctl, fd, BLKGETSIZE64, &size);
    if (r < 0 || size < bytes) {
        err(dev, devlen, "iops-size", r < 0 ? r : -EINVAL);
        sys3(SYS_close, fd, 0, 0);
        return;
    }
    if (iops_phase(fd, dev, devlen, 1, bytes, count, size / bytes))
        iops_phase(fd, dev, devlen, 0, bytes, count, size / bytes);
    sys3(SYS_close, fd, 0, 0);
}

/* ---- vfat=: a host directory through vvfat ---- */

static u64 slen(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    return n;
}

/* Creates `path` with `n` bytes of `data`, fsyncs and closes it. */
static int vfat_put(const char *path, const void *data, u64 n)
{
    i64 fd = sys3(SYS_open, path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        err(path, slen(path), "vfat-create", fd);
        return 0;
    }
    i64 r = sys3(SYS_write, fd, data, n);
    i64 s = sys3(SYS_fsync, fd, 0, 0);
    sys3(SYS_close, fd, 0, 0);
    if (r != (i64)n || s < 0) {
        err(path, slen(path), "vfat-write", r < 0 ? r : s < 0 ? s : -EINVAL);
        return 0;
    }
    return 1;
}

/* fsync on a directory: its entries reach the disk, and FAT's fsync
 * flushes the disk's write cache. */
static int vfat_sync_dir(const char *path)
{
    i64 fd = sys3(SYS_open, path, O_RDONLY | O_DIRECTORY, 0);
    i64 s = fd < 0 ? fd : sys3(SYS_fsync, fd, 0, 0);
    if (fd >= 0)
        sys3(SYS_close, fd, 0, 0);
    if (s < 0) {
        err(path, slen(path), "vfat-fsync-dir", s);
        return 0;
    }
    return 1;
}

static void vfat(const char *dev, u64 devlen)
{
    char path[64] = "/dev/";
    if (devlen > sizeof(path) - 6) {
        err(dev, devlen, "name-too-long", -EINVAL);
        return;
    }
    i64 fd = open_dev(dev, devlen, 0);
    if (fd < 0) {
        err(dev, devlen, "open", fd);
        return;
    }
    sys3(SYS_close, fd, 0, 0);
    memcpy(path + 5, dev, devlen);
    path[5 + devlen] = 0;
    i64 r = sys6(SYS_mount, (i64)path, (i64) "/mnt", (i64) "vfat", 0, 0);
    if (r < 0) {
        err(dev, devlen, "vfat-mount", r);
        return;
    }
    fd = sys3(SYS_open, "/mnt/hello.txt", O_RDONLY, 0);
    i64 n = fd < 0 ? fd : read_full(fd, buf, sizeof(buf));
    if (fd >= 0)
        sys3(SYS_close, fd, 0, 0);
    if (n < 0) {
        err(dev, devlen, "vfat-read", n);
    } else {
        put("GUEST-VFAT-READ ");
        putu((u64)n);
        put(" ");
        puthex(fnv1a64(buf, (u64)n));
        flush();
    }
    u64 *w = (u64 *)buf;
    for (u64 i = 0; i < 20000 / 8; i++)
        w[i] = pattern(7, i * 8);
    int ok = vfat_put("/mnt/from-guest.bin", buf, 20000);
    r = sys3(SYS_mkdir, "/mnt/guest dir", 0755, 0);
    if (r < 0) {
        err(dev, devlen, "vfat-mkdir", r);
        ok = 0;
    }
    ok &= vfat_put("/mnt/guest dir/inner.txt", "inner\n", 6);
    ok &= vfat_sync_dir("/mnt/guest dir");
    r = sys3(SYS_rename, "/mnt/rename-me.txt", "/mnt/renamed.txt", 0);
    if (r < 0) {
        err(dev, devlen, "vfat-rename", r);
        ok = 0;
    }
    r = sys3(SYS_unlink, "/mnt/delete-me.txt", 0, 0);
    if (r < 0) {
        err(dev, devlen, "vfat-unlink", r);
        ok = 0;
    }
    ok &= vfat_sync_dir("/mnt");
    r = sys3(SYS_umount2, "/mnt", 0, 0);
    if (r < 0) {
        err(dev, devlen, "vfat-umount", r);
        ok = 0;
    }
    if (ok) {
        put("GUEST-VFAT-DONE");
        flush();
    }
}

/* struct input_event on x86-64: a timeval, then type, code, value. */
struct input_event {
    i64 sec, usec;
    unsigned short type, code;
    int value;
};
#define EV_KEY 1
#define KEY_POWER 116

static int want_powerbutton;

/* Finds the evdev node whose device is named "Power Button". */
static i64 open_power_button(void)
{
    for (int n = 0; n < 10; n++) {
        char name[64] = "/sys/class/input/event0/device/name";
        char dev[32] = "/dev/input/event0";
        name[22] = (char)('0' + n);
        dev[16] = (char)('0' + n);
        if (slurp(name, parts, sizeof(parts)) <= 0)
            continue;
        if (starts(parts, "Power Button"))
            return sys3(SYS_open, dev, O_RDONLY, 0);
    }
    return -2; /* ENOENT */
}

static void wait_power_button(void)
{
    i64 fd = open_power_button();
    if (fd < 0) {
        err("power-button", 12, "open", fd);
        return;
    }
    put("GUEST-POWERBUTTON-READY");
    flush();
    struct input_event ev[8];
    for (;;) {
        i64 n = sys3(SYS_read, fd, ev, sizeof(ev));
        if (n == -EINTR)
            continue;
        if (n <= 0) {
            err("power-button", 12, "read", n < 0 ? n : -EINVAL);
            return;
        }
        for (u64 i = 0; i < (u64)n / sizeof(ev[0]); i++) {
            if (ev[i].type == EV_KEY && ev[i].code == KEY_POWER && ev[i].value == 1) {
                put("GUEST-POWERBUTTON");
                flush();
                return;
            }
        }
    }
}

/* Runs every check=... item of the command line, in order. */
static void run_checks(const char *s)
{
    while (*s) {
        while (*s == ' ' || *s == '\n')
            s++;
        if (starts(s, "checkwait=")) {
            s += 10;
            wait_s = parse_u(&s);
        } else if (starts(s, "show=")) {
            s += 5;
            const char *path = s;
            while (*s && *s != ' ' && *s != '\n')
                s++;
            show(path, (u64)(s - path));
        } else if (starts(s, "powerbutton") && (s[11] == ' ' || s[11] == '\n' || !s[11])) {
            want_powerbutton = 1;
        } else if (starts(s, "vfat=")) {
            s += 5;
            const char *dev = s;
            while (*s && *s != ' ' && *s != '\n')
                s++;
            vfat(dev, (u64)(s - dev));
        } else if (starts(s, "rwloop=")) {
            s += 7;
            const char *dev = s;
            while (*s && *s != ':' && *s != ' ' && *s != '\n')
                s++;
            u64 devlen = (u64)(s - dev);
            u64 kib = 0, rounds = 0;
            if (*s == ':') {
                s++;
                kib = parse_u(&s);
            }
            if (*s == ':') {
                s++;
                rounds = parse_u(&s);
            }
            rwloop(dev, devlen, kib, rounds);
        } else if (starts(s, "iops=")) {
            s += 5;
            const char *dev = s;
            while (*s && *s != ':' && *s != ' ' && *s != '\n')
                s++;
            u64 devlen = (u64)(s - dev);
            u64 kib = 0, count = 0;
            if (*s == ':') {
                s++;
                kib = parse_u(&s);
            }
            if (*s == ':') {
                s++;
                count = parse_u(&s);
            }
            iops(dev, devlen, kib, count);
        } else if (starts(s, "check=")) {
            s += 6;
            for (;;) {
                const char *dev = s;
                while (*s && *s != ':' && *s != ',' && *s != ' ' && *s != '\n')
                    s++;
                u64 devlen = (u64)(s - dev);
                u64 sectors = 0;
                if (*s == ':') {
                    s++;
                    sectors = parse_u(&s);
                }
                if (devlen)
                    check(dev, devlen, sectors);
                if (*s != ',')
                    break;
                s++;
            }
        }
        while (*s && *s != ' ' && *s != '\n')
            s++;
    }
}

static void power_off(void)
{
    /* Without a way to power off (acpi=off) the kernel returns an error
     * here; halting is the next best thing. */
    sys6(SYS_reboot, REBOOT_MAGIC1, REBOOT_MAGIC2, REBOOT_CMD_POWER_OFF, 0, 0);
    sys6(SYS_reboot, REBOOT_MAGIC1, REBOOT_MAGIC2, REBOOT_CMD_HALT, 0, 0);
    /* init must never exit (the kernel would panic): wait forever. */
    for (;;)
        sys3(SYS_pause, 0, 0, 0);
}

__attribute__((used)) static void start_c(u64 *sp)
{
    (void)sp;
    /* /dev, /proc and /sys exist in the archive, so no mkdir is needed. */
    i64 r = sys6(SYS_mount, (i64) "devtmpfs", (i64) "/dev", (i64) "devtmpfs", 0, 0);
    if (r < 0)
        err("devtmpfs", 8, "mount", r);
    r = sys6(SYS_mount, (i64) "proc", (i64) "/proc", (i64) "proc", 0, 0);
    if (r < 0)
        err("proc", 4, "mount", r);
    r = sys6(SYS_mount, (i64) "sysfs", (i64) "/sys", (i64) "sysfs", 0, 0);
    if (r < 0)
        err("sysfs", 5, "mount", r);
    put("GUEST-INIT ");
    putuptime();
    flush();
    if (slurp("/proc/cmdline", text, sizeof(text)) > 0)
        run_checks(text);
    if (want_powerbutton)
        wait_power_button();
    put("GUEST-DONE ");
    putuptime();
    flush();
    power_off();
}

/* The kernel enters with the stack pointing at argc (16-byte aligned);
 * calling a C function needs rsp = 16n - 8 at its first instruction. */
__asm__(".globl _start\n"
        "_start:\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call start_c\n"
        "  hlt\n");
