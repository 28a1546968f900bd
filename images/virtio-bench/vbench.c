/*
 * virtio-bench: a polled virtio-blk driver that measures IOPS and latency
 * from inside the guest, so the same binary compares VMMs side by side
 * (issue 7, benchmark part 2).
 *
 * Everything here runs in ring 3 (images/common/bench-entry.S drops
 * there), where guest code runs natively on the project's machines; ring
 * 0 is emulated and far too slow to time anything in. Port I/O works from
 * ring 3 through IOPL 3 or the TSS I/O bitmap (see bench-entry.S), and
 * the identity map is user-accessible. The TSC, PCI, command-line and
 * soft-off code is images/common/bench.h, shared with ahci-bench.
 *
 * Device: the first virtio-blk PCI function on bus 0, driven through the
 * LEGACY interface (I/O BAR0, virtio 1.2 section 4.1.4.10): it is the
 * simplest, and both Strata and QEMU offer it on transitional devices.
 * No firmware runs under Strata's direct boot, so BARs may be zero: an
 * unprogrammed I/O BAR is assigned IO_BAR_DEFAULT; one SeaBIOS assigned
 * is kept. Only FLUSH is negotiated (see virtio_init): one split queue,
 * header / data / status descriptors per request,
 * VRING_AVAIL_F_NO_INTERRUPT set (the driver polls the used ring;
 * interrupts stay off, IF = 0), and the queue is kicked after each batch
 * of submissions unless the device has set VRING_USED_F_NO_NOTIFY.
 *
 * Time: rdtsc, calibrated once against PIT channel 2 (both VMMs use the
 * in-kernel KVM PIT, so the reference is the same).
 *
 * Output on COM1, one line per workload:
 *   VBENCH <workload> iops=<n> lat_us=<n> reqs=<n> kicks=<n> errors=<n>
 * then VBENCH-DONE, then ACPI soft-off (PIIX4 PM), so the VMM exits.
 * Lines starting VBENCH-INFO describe the set-up; VBENCH-ERROR and
 * VBENCH-FAULT report failures (then VBENCH-DONE is never printed).
 *
 * Multiboot command line (optional): "secs=N" sets the seconds per
 * workload (default 2); "only=PREFIX" runs the workloads whose name
 * starts with PREFIX; "reqs=N" also ends each workload after N requests
 * (whichever comes first), so that a run under an instruction counter
 * (bench/virtio-instr.sh) does the same work every time.
 */
#define BENCH_TAG "VBENCH"
#include "../common/bench.h"

#define IO_BAR_DEFAULT 0xc000
#define MAX_DEPTH 32
#define BUF_SIZE 65536

/* --- virtio-blk, legacy interface ------------------------------------ */

#define L_HOST_FEATURES 0x00
#define L_GUEST_FEATURES 0x04
#define L_QUEUE_PFN 0x08
#define L_QUEUE_NUM 0x0c
#define L_QUEUE_SEL 0x0e
#define L_QUEUE_NOTIFY 0x10
#define L_STATUS 0x12
#define L_CONFIG 0x14 /* MSI-X is never enabled, so no vector registers */

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4

#define VIRTIO_BLK_F_FLUSH (1u << 9)

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

#define T_IN 0
#define T_OUT 1

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
struct used_elem {
	u32 id;
	u32 len;
};
struct blk_req {
	u32 type;
	u32 ioprio;
	u64 sector;
};

/* Legacy rings need one physically contiguous, page-aligned area: room
 * for the largest queue (1024 entries) either VMM may offer. */
static u8 ring_mem[32768] __attribute__((aligned(4096)));
static u8 bufs[MAX_DEPTH][BUF_SIZE] __attribute__((aligned(4096)));
static struct blk_req hdrs[MAX_DEPTH];
static volatile u8 stats[MAX_DEPTH];
static u64 t_submit[MAX_DEPTH];

static u16 io;		/* legacy BAR0 */
static u32 qsize;
static volatile struct desc *desc;
static volatile u16 *avail; /* flags, idx, ring[qsize], used_event */
static volatile u16 *used_hdr; /* flags, idx; the ring follows */
static volatile struct used_elem *used_ring;
static u16 avail_idx, last_used;
static u64 capacity; /* in 512-byte sectors */
static u64 hz;

static void virtio_init(void)
{
	int bdf = pci_find(0x1af4, 0x1001);
	if (bdf < 0) {
		if (pci_find(0x1af4, 0x1042) >= 0)
			fail("virtio-blk is modern-only: this driver needs the legacy interface (disable-legacy=off)");
		fail("no virtio-blk PCI device on bus 0");
	}
	u32 bar = cfg_read32(bdf, 0x10);
	if (!(bar & 1))
		fail("virtio-blk BAR0 is not an I/O BAR");
	const char *how = "firmware";
	if ((bar & ~3u) == 0) {
		cfg_write32(bdf, 0x10, IO_BAR_DEFAULT);
		bar = cfg_read32(bdf, 0x10);
		how = "assigned";
	}
	io = bar & 0xfffc;
	/* I/O space on (the legacy registers and the notify port), bus
	 * master on (the device reads and writes the rings). */
	u16 cmd = cfg_read32(bdf, 0x04) & 0xffff;
	cfg_write16(bdf, 0x04, cmd | 0x1 | 0x4);

	outb(io + L_STATUS, 0); /* reset: SeaBIOS may have used the device */
	outb(io + L_STATUS, S_ACK);
	outb(io + L_STATUS, S_ACK | S_DRIVER);
	u32 host = inl(io + L_HOST_FEATURES);
	/* FLUSH only: a driver that cannot flush gets a write-through disk
	 * (virtio 1.2, 5.2.6.3; both VMMs do this), while a real guest (Linux
	 * negotiates FLUSH) writes into the host's cache and flushes when it
	 * must. The workloads never flush, as fio without fsync. */
	u32 guest = host & VIRTIO_BLK_F_FLUSH;
	outl(io + L_GUEST_FEATURES, guest);
	capacity = inl(io + L_CONFIG) | (u64)inl(io + L_CONFIG + 4) << 32;

	outw(io + L_QUEUE_SEL, 0);
	qsize = inw(io + L_QUEUE_NUM);
	/* Section 2.7.2 (legacy layout): descriptors, then the available
	 * ring, then the used ring at the next 4 KiB boundary. */
	u64 avail_off = 16 * (u64)qsize;
	u64 used_off = (avail_off + 6 + 2 * (u64)qsize + 4095) & ~4095ull;
	if (qsize < 3 || used_off + 6 + 8 * (u64)qsize > sizeof(ring_mem))
		fail("unexpected queue size");
	for (u64 i = 0; i < sizeof(ring_mem); i++)
		ring_mem[i] = 0;
	desc = (volatile struct desc *)ring_mem;
	avail = (volatile u16 *)(ring_mem + avail_off);
	used_hdr = (volatile u16 *)(ring_mem + used_off);
	used_ring = (volatile struct used_elem *)(ring_mem + used_off + 4);
	avail[0] = VRING_AVAIL_F_NO_INTERRUPT;
	outl(io + L_QUEUE_PFN, (u32)((u64)ring_mem >> 12));
	outb(io + L_STATUS, S_ACK | S_DRIVER | S_DRIVER_OK);

	puts("VBENCH-INFO virtio-blk at 00:");
	put_bdf(bdf);
	puts(" io=");
	puthex(io);
	puts(" (");
	puts(how);
	puts(") host_features=");
	puthex(host);
	puts(" guest_features=");
	puthex(guest);
	puts(" queue_size=");
	putdec(qsize);
	puts(" capacity_sectors=");
	putdec(capacity);
	putc('\n');
}

/* --- workloads -------------------------------------------------------- */

static u64 rng = 0x9e3779b97f4a7c15ull;

static u64 xorshift(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

struct workload {
	const char *name;
	u32 type;
	u32 bs;
	u32 depth;
	int seq;
};

static u64 seq_sector;

/* Slot s owns descriptors 3s (header), 3s+1 (data), 3s+2 (status); the
 * chain's head, 3s, comes back as the used element's id. */
static void setup_slots(const struct workload *w)
{
	for (u32 s = 0; s < w->depth; s++) {
		volatile struct desc *d = &desc[3 * s];
		d[0].addr = (u64)&hdrs[s];
		d[0].len = sizeof(struct blk_req);
		d[0].flags = VRING_DESC_F_NEXT;
		d[0].next = 3 * s + 1;
		d[1].addr = (u64)bufs[s];
		d[1].len = w->bs;
		d[1].flags = VRING_DESC_F_NEXT | (w->type == T_IN ? VRING_DESC_F_WRITE : 0);
		d[1].next = 3 * s + 2;
		d[2].addr = (u64)&stats[s];
		d[2].len = 1;
		d[2].flags = VRING_DESC_F_WRITE;
		d[2].next = 0;
	}
}

/* Puts slot s on the available ring; not visible until publish(). */
static void submit(const struct workload *w, u32 s, u64 now)
{
	u64 sectors = w->bs / 512;
	if (w->seq) {
		if (seq_sector + sectors > capacity)
			seq_sector = 0;
		hdrs[s].sector = seq_sector;
		seq_sector += sectors;
	} else {
		hdrs[s].sector = xorshift() % (capacity / sectors) * sectors;
	}
	hdrs[s].type = w->type;
	hdrs[s].ioprio = 0;
	stats[s] = 0xff;
	t_submit[s] = now;
	avail[2 + avail_idx % qsize] = 3 * s;
	avail_idx++;
}

static u64 kicks;

/* The avail->idx store must be visible before used->flags is read to
 * decide on a kick: hence mb(), not just barrier(). */
static void publish(void)
{
	barrier();
	avail[1] = avail_idx;
	mb();
	if (!(used_hdr[0] & VRING_USED_F_NO_NOTIFY)) {
		outw(io + L_QUEUE_NOTIFY, 0);
		kicks++;
	}
}

/* Keeps w->depth requests in flight for `ticks` TSC ticks, then drains.
 * Completions are reaped in batches: every request found completed in
 * one look at the used ring is replaced, and the batch is published with
 * at most one kick, as a real driver does. Latency is submit to the look
 * that found the completion. */
static void run(const struct workload *w, u64 ticks, u64 max_reqs)
{
	u64 done = 0, lat = 0, errors = 0, submitted = 0;
	u32 inflight = 0;
	kicks = 0;
	setup_slots(w);
	u64 start = rdtsc(), deadline = start + ticks, now = start;
	for (u32 s = 0; s < w->depth && (!max_reqs || submitted < max_reqs); s++, inflight++, submitted++)
		submit(w, s, start);
	publish();
	while (inflight) {
		u16 idx = used_hdr[1];
		if (idx == last_used) {
			__asm__ volatile("pause");
			continue;
		}
		barrier();
		now = rdtsc();
		int more = 0;
		while (last_used != idx) {
			u32 s = used_ring[last_used % qsize].id / 3;
			last_used++;
			if (stats[s] != 0)
				errors++;
			lat += now - t_submit[s];
			done++;
			inflight--;
			if (now < deadline && (!max_reqs || submitted < max_reqs)) {
				submit(w, s, now);
				inflight++;
				submitted++;
				more = 1;
			}
		}
		if (more)
			publish();
	}
	u64 elapsed = now - start;
	puts("VBENCH ");
	puts(w->name);
	puts(" iops=");
	putdec(done * hz / elapsed);
	puts(" lat_us=");
	putdec(done ? lat * 1000000 / hz / done : 0);
	puts(" reqs=");
	putdec(done);
	puts(" kicks=");
	putdec(kicks);
	puts(" errors=");
	putdec(errors);
	putc('\n');
}

/* --- main --------------------------------------------------------------- */

void bench_main(u64 info)
{
	static const struct workload loads[] = {
		{ "randread-4k-qd1", T_IN, 4096, 1, 0 },
		{ "randread-4k-qd32", T_IN, 4096, 32, 0 },
		{ "randwrite-4k-qd1", T_OUT, 4096, 1, 0 },
		{ "randwrite-4k-qd32", T_OUT, 4096, 32, 0 },
		{ "seqread-64k-qd8", T_IN, 65536, 8, 1 },
	};
	const char *cl = cmdline(info), *only = option(cl, "only=");
	u64 secs = option_num(cl, "secs="), max_reqs = option_num(cl, "reqs=");
	if (!secs)
		secs = 2;
	u64 fl, cs;
	__asm__ volatile("pushfq; popq %0; movq %%cs, %1" : "=r"(fl), "=r"(cs));
	puts("\nVBENCH-INFO cpl=");
	putdec(cs & 3);
	puts(" iopl=");
	putdec(fl >> 12 & 3);
	putc('\n');
	hz = tsc_hz();
	puts("VBENCH-INFO tsc_khz=");
	putdec(hz / 1000);
	puts(" secs=");
	putdec(secs);
	putc('\n');
	virtio_init();
	if (capacity < 2 * BUF_SIZE / 512)
		fail("disk too small");
	for (u32 i = 0; i < sizeof(loads) / sizeof(loads[0]); i++) {
		if (!selected(only, loads[i].name))
			continue;
		if (loads[i].depth * 3 > qsize)
			fail("queue too small for the depth");
		run(&loads[i], secs * hz, max_reqs);
	}
	puts("VBENCH-DONE\n");
	poweroff();
}
