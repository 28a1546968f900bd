/*
 * ahci-bench: a polled AHCI driver that measures IOPS and latency from
 * inside the guest, so the same binary compares VMMs side by side; the
 * AHCI counterpart of images/virtio-bench, with the same workloads.
 *
 * Everything here runs in ring 3 (images/common/bench-entry.S drops
 * there), where guest code runs natively on the project's machines; ring
 * 0 is emulated and far too slow to time anything in. Port I/O works
 * from ring 3, and the identity map (first 4 GiB, the MMIO gigabyte
 * uncached) is user-accessible, ABAR included.
 *
 * Device (AHCI 1.3.1): the first PCI function on bus 0 with class code
 * 01.06.01 (the ICH9 AHCI at 00:1f.2 on `q35`). ABAR is BAR5; with no
 * firmware (Strata's direct boot) it is zero and gets ABAR_DEFAULT, one
 * SeaBIOS assigned is kept. Memory space and bus master on, GHC.AE on,
 * GHC.IE off: no interrupt is ever raised (IF is 0 anyway), the driver
 * polls. The first implemented port with PxSSTS.DET = 3 is used: stopped
 * (firmware may have left it running with its own lists), given this
 * program's command list and received-FIS area, then FRE and ST.
 *
 * Commands: IDENTIFY DEVICE for the capacity and NCQ support, then per
 * workload READ/WRITE DMA EXT (25h/35h), one at a time, issued through
 * PxCI and completed when its PxCI bit clears; or, for depths above 1
 * when CAP.SNCQ and IDENTIFY word 76 bit 8 are both set, READ/WRITE FPDMA
 * QUEUED (60h/61h) with tag = command slot, issued through PxSACT then
 * PxCI and completed when both bits clear (the Set Device Bits FIS
 * clears PxSACT). Without NCQ the deeper workloads run at depth 1, and
 * their lines say depth=1 ncq=0.
 *
 * A workload that makes no progress for 2 s (or sets PxIS.TFES, or an
 * HBA error) is abandoned: its line reports the error and the port's
 * registers, the port is stopped (clearing PxCI and PxSACT) and started
 * again, and the next workload runs. The guest never hangs.
 *
 * Time: rdtsc, calibrated once against PIT channel 2.
 *
 * Output on COM1, one line per workload:
 *   ABENCH <workload> iops=<n> lat_us=<n> reqs=<n> depth=<n> ncq=<0|1>
 *     polls=<n> errors=<n>
 * or, when it failed:
 *   ABENCH <workload> error=<timeout|tfes|hba> reqs=<n> ...registers
 * then ABENCH-DONE, then ACPI soft-off, so the VMM exits. Lines starting
 * ABENCH-INFO describe the set-up; ABENCH-ERROR and ABENCH-FAULT report
 * failures that end the run (then ABENCH-DONE is never printed).
 *
 * Multiboot command line (optional), as virtio-bench's: "secs=N" (default
 * 2), "only=PREFIX", "reqs=N"; "ncq=0" to run without NCQ, "ncq=1" to use
 * it when only the HBA reports it (CAP.SNCQ; for a VMM whose disk does
 * not set IDENTIFY word 76 bit 8 yet).
 */
#define BENCH_TAG "ABENCH"
#include "../common/bench.h"

/* Free on both VMMs' q35 below the I/O APIC (QEMU's SeaBIOS puts the
 * 32-bit BARs just below 0xfec00000 too). */
#define ABAR_DEFAULT 0xfebf0000u
#define MAX_SLOTS 32
#define BUF_SIZE 65536
#define SECTOR 512
#define STALL_SECS 2

/* Generic host control (AHCI 1.3.1 section 3.1). */
#define CAP 0x00
#define GHC 0x04
#define IS 0x08
#define PI 0x0c
#define VS 0x10
#define CAP_S64A (1u << 31)
#define CAP_SNCQ (1u << 30)
#define GHC_AE (1u << 31)

/* Port registers (section 3.3), at 0x100 + 0x80 * port. */
#define PxCLB 0x00
#define PxCLBU 0x04
#define PxFB 0x08
#define PxFBU 0x0c
#define PxIS 0x10
#define PxIE 0x14
#define PxCMD 0x18
#define PxTFD 0x20
#define PxSIG 0x24
#define PxSSTS 0x28
#define PxSCTL 0x2c
#define PxSERR 0x30
#define PxSACT 0x34
#define PxCI 0x38
#define CMD_ST (1u << 0)
#define CMD_SUD (1u << 1)
#define CMD_POD (1u << 2)
#define CMD_FRE (1u << 4)
#define CMD_FR (1u << 14)
#define CMD_CR (1u << 15)
#define IS_TFES (1u << 30)
/* Host bus data/fatal, interface fatal/non-fatal, overflow. */
#define IS_ERRORS (1u << 30 | 1u << 29 | 1u << 28 | 1u << 27 | 1u << 26 | 1u << 24)
#define TFD_BSY 0x80
#define TFD_DRQ 0x08
#define TFD_ERR 0x01

#define FIS_H2D 0x27
#define ATA_IDENTIFY 0xec
#define ATA_READ_DMA_EXT 0x25
#define ATA_WRITE_DMA_EXT 0x35
#define ATA_READ_FPDMA 0x60
#define ATA_WRITE_FPDMA 0x61

/* Command header (section 4.2.2): DW0 = PRDTL << 16 | flags | CFL. */
struct cmd_hdr {
	u32 dw0;
	u32 prdbc;
	u32 ctba;
	u32 ctbau;
	u32 rsv[4];
};
#define HDR_WRITE (1u << 6)
#define CFL_H2D 5 /* a register H2D FIS is 5 dwords */

struct prd {
	u32 dba;
	u32 dbau;
	u32 rsv;
	u32 dbc; /* byte count - 1, bit 31 = interrupt on completion */
};

/* Command table (section 4.2.3): CFIS, ACMD, reserved, PRDT at 0x80. One
 * PRD per command: each buffer is contiguous (identity map). */
struct cmd_table {
	u8 cfis[64];
	u8 acmd[16];
	u8 rsv[48];
	struct prd prdt[1];
} __attribute__((aligned(128)));

static struct cmd_hdr cmd_list[32] __attribute__((aligned(1024)));
static u8 rx_fis[256] __attribute__((aligned(256)));
static struct cmd_table tables[MAX_SLOTS];
static u8 bufs[MAX_SLOTS][BUF_SIZE] __attribute__((aligned(4096)));
static u16 ident[256] __attribute__((aligned(512)));
static u64 t_submit[MAX_SLOTS];

static volatile u32 *abar;
static volatile u32 *port; /* the port's registers */
static int port_no = -1;
static u32 cap, nslots, use_ncq, ncq_depth;
static int port_dead;
static u64 capacity; /* in 512-byte sectors */
static u64 hz;

static inline u32 hba_rd(u32 off) { return abar[off / 4]; }
static inline void hba_wr(u32 off, u32 v) { abar[off / 4] = v; }
static inline u32 p_rd(u32 off) { return port[off / 4]; }
static inline void p_wr(u32 off, u32 v) { port[off / 4] = v; }

/* Waits up to `ms` for (register & mask) == want; 1 if it got there. */
static int wait_reg(u32 off, u32 mask, u32 want, u64 ms)
{
	u64 end = rdtsc() + hz / 1000 * ms;
	do {
		if ((p_rd(off) & mask) == want)
			return 1;
		__asm__ volatile("pause");
	} while (rdtsc() < end);
	return (p_rd(off) & mask) == want;
}

static void put_regs(void)
{
	puts(" PxCMD=");
	puthex(p_rd(PxCMD));
	puts(" PxIS=");
	puthex(p_rd(PxIS));
	puts(" PxTFD=");
	puthex(p_rd(PxTFD));
	puts(" PxSERR=");
	puthex(p_rd(PxSERR));
	puts(" PxSACT=");
	puthex(p_rd(PxSACT));
	puts(" PxCI=");
	puthex(p_rd(PxCI));
	puts(" IS=");
	puthex(hba_rd(IS));
}

/* Section 10.3.2: clear ST and wait for CR, then clear FRE and wait for
 * FR. 1 if the port is idle. */
static int port_stop(void)
{
	u32 cmd = p_rd(PxCMD);
	if (cmd & (CMD_ST | CMD_CR)) {
		p_wr(PxCMD, cmd & ~CMD_ST);
		if (!wait_reg(PxCMD, CMD_CR, 0, 500))
			return 0;
	}
	cmd = p_rd(PxCMD);
	if (cmd & (CMD_FRE | CMD_FR)) {
		p_wr(PxCMD, cmd & ~CMD_FRE);
		if (!wait_reg(PxCMD, CMD_FR, 0, 500))
			return 0;
	}
	return 1;
}

/* Lists in place, errors cleared, FIS receive on, then (once the device
 * is not busy: its signature FIS has arrived) ST. 1 if running. */
static int port_start(void)
{
	p_wr(PxCLB, (u32)(u64)cmd_list);
	p_wr(PxCLBU, 0);
	p_wr(PxFB, (u32)(u64)rx_fis);
	p_wr(PxFBU, 0);
	p_wr(PxSERR, ~0u);
	p_wr(PxIS, ~0u);
	hba_wr(IS, 1u << port_no);
	p_wr(PxCMD, p_rd(PxCMD) | CMD_FRE | CMD_SUD | CMD_POD);
	if (!wait_reg(PxCMD, CMD_FR, CMD_FR, 500))
		return 0;
	if (!wait_reg(PxTFD, TFD_BSY | TFD_DRQ, 0, 1000))
		return 0;
	p_wr(PxCMD, p_rd(PxCMD) | CMD_ST);
	return wait_reg(PxCMD, CMD_CR, CMD_CR, 500) || (p_rd(PxCMD) & CMD_ST);
}

/* COMRESET (section 10.4.2): PxSCTL.DET = 1 for at least 1 ms, then 0,
 * and the link comes back (PxSSTS.DET = 3); the device then sends a new
 * signature FIS, which port_start waits for. */
static void port_comreset(void)
{
	u32 sctl = p_rd(PxSCTL) & ~0xfu;
	p_wr(PxSCTL, sctl | 1);
	u64 end = rdtsc() + hz / 1000 * 2;
	while (rdtsc() < end)
		__asm__ volatile("pause");
	p_wr(PxSCTL, sctl);
	wait_reg(PxSSTS, 0xf, 3, 500);
	p_wr(PxSERR, ~0u);
}

/* After an error or a stall: stop the port (which clears PxCI and
 * PxSACT) and start it again (section 6.2.2). A device still showing
 * ERR, BSY or DRQ gets a COMRESET first: after a failed NCQ command a
 * SATA device refuses commands until it is reset or its NCQ error log is
 * read. */
static void port_recover(void)
{
	int ok = port_stop();
	if (ok && p_rd(PxTFD) & (TFD_BSY | TFD_DRQ | TFD_ERR))
		port_comreset();
	if (!ok || !port_start()) {
		port_dead = 1;
		puts(BENCH_TAG "-INFO port did not restart, skipping the remaining workloads:");
		put_regs();
		putc('\n');
	}
}

static void ahci_init(void)
{
	int bdf = pci_find_by(0x08, 0xffffff00, 0x01060100);
	if (bdf < 0)
		fail("no AHCI controller (class 01.06.01) on bus 0");
	u32 bar = cfg_read32(bdf, 0x24);
	const char *how = "firmware";
	if ((bar & ~0xfu) == 0) {
		cfg_write32(bdf, 0x24, ABAR_DEFAULT);
		bar = cfg_read32(bdf, 0x24);
		how = "assigned";
	}
	u32 base = bar & ~0xfu;
	if (bar & 1 || base < 0xc0000000u)
		fail("ABAR is not a memory BAR in the identity-mapped MMIO gigabyte (3-4 GiB)");
	abar = (volatile u32 *)(u64)base;
	/* Memory space and bus master on; INTx off as well. */
	u16 cmd = cfg_read32(bdf, 0x04) & 0xffff;
	cfg_write16(bdf, 0x04, cmd | 0x2 | 0x4 | 0x400);

	hba_wr(GHC, GHC_AE);
	hba_wr(GHC, GHC_AE); /* interrupts (GHC.IE) stay off */
	cap = hba_rd(CAP);
	nslots = (cap >> 8 & 31) + 1;
	u32 pi = hba_rd(PI);
	for (int i = 0; i < 32; i++) {
		if (!(pi & 1u << i))
			continue;
		volatile u32 *p = abar + (0x100 + 0x80 * i) / 4;
		if ((p[PxSSTS / 4] & 0xf) == 3) {
			port_no = i;
			port = p;
			break;
		}
	}
	puts(BENCH_TAG "-INFO ahci at 00:");
	put_bdf(bdf);
	puts(" abar=");
	puthex(base);
	puts(" (");
	puts(how);
	puts(") cap=");
	puthex(cap);
	puts(" pi=");
	puthex(pi);
	puts(" vs=");
	puthex(hba_rd(VS));
	puts(" slots=");
	putdec(nslots);
	puts(" port=");
	if (port_no < 0) {
		puts("none\n");
		fail("no port with a device (PxSSTS.DET = 3)");
	}
	putdec(port_no);
	puts(" sig=");
	puthex(p_rd(PxSIG));
	putc('\n');
	if (!port_stop())
		fail("the port does not stop (PxCMD.CR or FR stays set)");
	if (!port_start()) {
		puts(BENCH_TAG "-INFO");
		put_regs();
		putc('\n');
		fail("the port does not start (no FR, BSY/DRQ stays set, or no CR)");
	}
}

/* --- commands ----------------------------------------------------------- */

/* Fills slot s's header and table for one H2D command on `len` bytes of
 * bufs[s] (or `buf`). The FIS's LBA, count and features are set by the
 * callers. */
static u8 *prepare(u32 s, u8 command, void *buf, u32 len, int write)
{
	struct cmd_table *t = &tables[s];
	u8 *f = t->cfis;
	for (int i = 0; i < 20; i++)
		f[i] = 0;
	f[0] = FIS_H2D;
	f[1] = 0x80; /* C: a command, not device control */
	f[2] = command;
	f[7] = 0x40; /* device: LBA mode */
	t->prdt[0].dba = (u32)(u64)buf;
	t->prdt[0].dbau = 0;
	t->prdt[0].rsv = 0;
	t->prdt[0].dbc = len - 1;
	cmd_list[s].dw0 = 1u << 16 | (write ? HDR_WRITE : 0) | CFL_H2D;
	cmd_list[s].prdbc = 0;
	cmd_list[s].ctba = (u32)(u64)t;
	cmd_list[s].ctbau = 0;
	return f;
}

static void set_lba(u8 *f, u64 lba)
{
	f[4] = lba;
	f[5] = lba >> 8;
	f[6] = lba >> 16;
	f[8] = lba >> 24;
	f[9] = lba >> 32;
	f[10] = lba >> 40;
}

static void identify(void)
{
	prepare(0, ATA_IDENTIFY, ident, sizeof(ident), 0);
	barrier();
	p_wr(PxCI, 1);
	if (!wait_reg(PxCI, 1, 0, 2000) || p_rd(PxIS) & IS_ERRORS) {
		puts(BENCH_TAG "-INFO");
		put_regs();
		putc('\n');
		fail("IDENTIFY DEVICE failed");
	}
	/* Words 100-103: LBA48 sectors; 60-61 if LBA48 is missing. */
	capacity = ident[100] | (u64)ident[101] << 16 | (u64)ident[102] << 32 | (u64)ident[103] << 48;
	if (!(ident[83] & (1 << 10)))
		fail("the disk has no 48-bit LBA (IDENTIFY word 83 bit 10)");
	/* Word 76 bit 8: NCQ; word 75 bits 4:0: queue depth - 1. */
	u32 dev_ncq = ident[76] != 0xffff && (ident[76] & (1 << 8));
	ncq_depth = dev_ncq ? (ident[75] & 31) + 1 : 1;
	if (ncq_depth > nslots)
		ncq_depth = nslots;
	use_ncq = dev_ncq && (cap & CAP_SNCQ);
	puts(BENCH_TAG "-INFO disk capacity_sectors=");
	putdec(capacity);
	puts(" ncq: hba=");
	putdec(!!(cap & CAP_SNCQ));
	puts(" device=");
	putdec(dev_ncq);
	puts(" depth=");
	putdec(ncq_depth);
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
	int write;
	u32 bs;
	u32 depth;
	int seq;
};

static u64 seq_sector;

/* Prepares slot s for its next request (not issued until the caller
 * writes PxSACT/PxCI). */
static void submit(const struct workload *w, u32 s, int ncq, u64 now)
{
	u64 sectors = w->bs / SECTOR, lba;
	if (w->seq) {
		if (seq_sector + sectors > capacity)
			seq_sector = 0;
		lba = seq_sector;
		seq_sector += sectors;
	} else {
		lba = xorshift() % (capacity / sectors) * sectors;
	}
	u8 *f;
	if (ncq) {
		f = prepare(s, w->write ? ATA_WRITE_FPDMA : ATA_READ_FPDMA, bufs[s], w->bs, w->write);
		/* The count is in the feature registers, the tag in count
		 * bits 7:3 (ATA8-ACS 7.23, 7.72). */
		f[3] = sectors;
		f[11] = sectors >> 8;
		f[12] = s << 3;
	} else {
		f = prepare(s, w->write ? ATA_WRITE_DMA_EXT : ATA_READ_DMA_EXT, bufs[s], w->bs, w->write);
		f[12] = sectors;
		f[13] = sectors >> 8;
	}
	set_lba(f, lba);
	t_submit[s] = now;
}

static void report_error(const struct workload *w, const char *what, u64 done, u32 inflight)
{
	puts(BENCH_TAG " ");
	puts(w->name);
	puts(" error=");
	puts(what);
	puts(" reqs=");
	putdec(done);
	puts(" inflight=");
	puthex(inflight);
	put_regs();
	putc('\n');
	port_recover();
}

/* Keeps `depth` requests in flight for `ticks` TSC ticks, then drains.
 * Each look at the port's registers reaps every request that finished
 * and issues their replacements with one PxSACT and one PxCI write, as a
 * real driver does. Latency is submit to the look that found the
 * completion. */
static void run(const struct workload *w, u64 ticks, u64 max_reqs)
{
	u32 depth = w->depth, ncq = 0;
	if (depth > 1 && use_ncq) {
		ncq = 1;
		if (depth > ncq_depth)
			depth = ncq_depth;
	} else {
		depth = 1;
	}
	/* The register that shows a request in flight: PxSACT under NCQ
	 * (cleared by the Set Device Bits FIS), PxCI otherwise. */
	u32 busy_reg = ncq ? PxSACT : PxCI;
	u64 done = 0, lat = 0, polls = 0, submitted = 0, errors = 0;
	u32 inflight = 0, batch = 0;
	u64 start = rdtsc(), deadline = start + ticks, now = start;
	u64 stall = hz * STALL_SECS, last_progress = start, last_check = start;
	for (u32 s = 0; s < depth && (!max_reqs || submitted < max_reqs); s++, submitted++) {
		submit(w, s, ncq, start);
		batch |= 1u << s;
	}
	barrier();
	if (ncq)
		p_wr(PxSACT, batch);
	p_wr(PxCI, batch);
	inflight = batch;
	while (inflight) {
		u32 busy = p_rd(busy_reg);
		polls++;
		u32 fin = inflight & ~busy;
		if (fin && ncq)
			fin &= ~p_rd(PxCI); /* the slot is free once both are clear */
		now = rdtsc();
		if (!fin) {
			/* Errors stop the port without completing anything:
			 * look for them when nothing completes for 1 ms. */
			if (now - last_check > hz / 1000) {
				last_check = now;
				u32 is = p_rd(PxIS);
				if (is & IS_ERRORS) {
					report_error(w, is & IS_TFES ? "tfes" : "hba", done, inflight);
					return;
				}
				if (now - last_progress > stall) {
					report_error(w, "timeout", done, inflight);
					return;
				}
			}
			__asm__ volatile("pause");
			continue;
		}
		last_progress = last_check = now;
		batch = 0;
		for (u32 s = 0; s < depth; s++) {
			if (!(fin & 1u << s))
				continue;
			lat += now - t_submit[s];
			done++;
			if (cmd_list[s].prdbc != w->bs && !ncq)
				errors++;
			inflight &= ~(1u << s);
			if (now < deadline && (!max_reqs || submitted < max_reqs)) {
				submit(w, s, ncq, now);
				batch |= 1u << s;
				submitted++;
			}
		}
		if (batch) {
			barrier();
			if (ncq)
				p_wr(PxSACT, batch);
			p_wr(PxCI, batch);
			inflight |= batch;
		}
	}
	u32 is = p_rd(PxIS);
	if (is & IS_ERRORS) {
		report_error(w, is & IS_TFES ? "tfes" : "hba", done, inflight);
		return;
	}
	p_wr(PxIS, is); /* clear the completion bits (DHRS, SDBS, DPS) */
	u64 elapsed = now - start;
	puts(BENCH_TAG " ");
	puts(w->name);
	puts(" iops=");
	putdec(elapsed ? done * hz / elapsed : 0);
	puts(" lat_us=");
	putdec(done ? lat * 1000000 / hz / done : 0);
	puts(" reqs=");
	putdec(done);
	puts(" depth=");
	putdec(depth);
	puts(" ncq=");
	putdec(ncq);
	puts(" polls=");
	putdec(polls);
	puts(" errors=");
	putdec(errors);
	putc('\n');
}

/* --- main --------------------------------------------------------------- */

void bench_main(u64 info)
{
	static const struct workload loads[] = {
		{ "randread-4k-qd1", 0, 4096, 1, 0 },
		{ "randread-4k-qd32", 0, 4096, 32, 0 },
		{ "randwrite-4k-qd1", 1, 4096, 1, 0 },
		{ "randwrite-4k-qd32", 1, 4096, 32, 0 },
		{ "seqread-64k-qd8", 0, 65536, 8, 1 },
	};
	const char *cl = cmdline(info), *only = option(cl, "only="), *nv = option(cl, "ncq=");
	u64 secs = option_num(cl, "secs="), max_reqs = option_num(cl, "reqs=");
	if (!secs)
		secs = 2;
	u64 fl, cs;
	__asm__ volatile("pushfq; popq %0; movq %%cs, %1" : "=r"(fl), "=r"(cs));
	puts("\n" BENCH_TAG "-INFO cpl=");
	putdec(cs & 3);
	puts(" iopl=");
	putdec(fl >> 12 & 3);
	putc('\n');
	hz = tsc_hz();
	puts(BENCH_TAG "-INFO tsc_khz=");
	putdec(hz / 1000);
	puts(" secs=");
	putdec(secs);
	putc('\n');
	ahci_init();
	identify();
	if (nv && *nv == '0')
		use_ncq = 0;
	if (nv && *nv == '1' && (cap & CAP_SNCQ) && !use_ncq) {
		/* Forced: NCQ on the HBA's word alone, at its slot count. */
		use_ncq = 1;
		ncq_depth = nslots;
		puts(BENCH_TAG "-INFO ncq=1: NCQ forced although the disk does not report it\n");
	}
	if (!use_ncq)
		puts(BENCH_TAG "-INFO no NCQ: the deeper workloads run at depth 1 (READ/WRITE DMA EXT)\n");
	if (capacity < 2 * BUF_SIZE / SECTOR)
		fail("disk too small");
	for (u32 i = 0; i < sizeof(loads) / sizeof(loads[0]); i++) {
		if (!selected(only, loads[i].name))
			continue;
		if (port_dead) {
			puts(BENCH_TAG " ");
			puts(loads[i].name);
			puts(" error=port-dead\n");
			continue;
		}
		run(&loads[i], secs * hz, max_reqs);
	}
	puts(BENCH_TAG "-DONE\n");
	poweroff();
}
