/*
 * Shared by the benchmark guests (images/virtio-bench, images/ahci-bench),
 * which run in ring 3 after images/common/bench-entry.S: the TSC and its
 * calibration, PCI configuration mechanism #1 on bus 0, the multiboot
 * command line, fault reports and ACPI soft-off on both machines.
 *
 * Define BENCH_TAG ("VBENCH", "ABENCH") before including: the prefix of
 * the -FAULT and -ERROR lines.
 */
#ifndef STRATA_BENCH_H
#define STRATA_BENCH_H

#include "guest.h"

#ifndef BENCH_TAG
#error "define BENCH_TAG before including bench.h"
#endif

#define PMBASE_DEFAULT 0x600 /* what SeaBIOS picks, and QEMU's DSDTs */

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}
/* Stores to shared memory must be visible to the device in program order
 * (x86 keeps stores ordered, so the compiler is the only reorderer); a
 * locked instruction is a full barrier without SSE. */
#define barrier() __asm__ volatile("" ::: "memory")
static inline void mb(void) { __asm__ volatile("lock; addl $0, (%%rsp)" ::: "memory", "cc"); }

/* Called from bench-entry.S in ring 0 for any exception. */
void fault_report(u64 vec, u64 err, u64 rip, u64 rflags)
{
	puts("\n" BENCH_TAG "-FAULT vec=");
	putdec(vec);
	puts(" err=");
	puthex(err);
	puts(" rip=");
	puthex(rip);
	puts(" rflags=");
	puthex(rflags);
	putc('\n');
}

static inline void halt(void)
{
	for (;;)
		__asm__ volatile("int $0x80");
}

static void poweroff(void);

/* Reports and powers off, so the harness sees the error at once. */
static inline void fail(const char *msg)
{
	puts(BENCH_TAG "-ERROR ");
	puts(msg);
	putc('\n');
	poweroff();
}

/* --- PCI configuration mechanism #1 --------------------------------- */

static inline u32 cfg_addr(u32 bdf, u32 off) { return 0x80000000u | bdf << 8 | (off & 0xfc); }

static inline u32 cfg_read32(u32 bdf, u32 off)
{
	outl(0xcf8, cfg_addr(bdf, off));
	return inl(0xcfc);
}

static inline void cfg_write32(u32 bdf, u32 off, u32 v)
{
	outl(0xcf8, cfg_addr(bdf, off));
	outl(0xcfc, v);
}

static inline void cfg_write16(u32 bdf, u32 off, u16 v)
{
	outl(0xcf8, cfg_addr(bdf, off));
	outw(0xcfc + (off & 2), v);
}

static inline void cfg_write8(u32 bdf, u32 off, u8 v)
{
	outl(0xcf8, cfg_addr(bdf, off));
	outb(0xcfc + (off & 3), v);
}

/* Bus 0 only: both machines put every device there. The first function
 * whose dword at config offset `off`, masked with `mask`, is `want`
 * (offset 0: vendor and device; offset 8: class code and revision), or
 * -1. */
static int pci_find_by(u32 off, u32 mask, u32 want)
{
	for (u32 dev = 0; dev < 32; dev++) {
		for (u32 fn = 0; fn < 8; fn++) {
			u32 bdf = dev << 3 | fn;
			u32 id = cfg_read32(bdf, 0);
			if ((id & 0xffff) == 0xffff) {
				if (fn == 0)
					break;
				continue;
			}
			if ((cfg_read32(bdf, off) & mask) == want)
				return bdf;
			/* Only multi-function devices have functions 1-7. */
			if (fn == 0 && !(cfg_read32(bdf, 0x0c) >> 16 & 0x80))
				break;
		}
	}
	return -1;
}

static inline int pci_find(u16 vendor, u16 device)
{
	return pci_find_by(0, ~0u, (u32)device << 16 | vendor);
}

static inline void put_bdf(u32 bdf)
{
	putdec(bdf >> 3);
	putc('.');
	putdec(bdf & 7);
}

/* --- time ------------------------------------------------------------ */

/* TSC ticks per second, from PIT channel 2 in mode 0 counting down from
 * 0xffff (1193182 Hz, about 55 ms): the gate is port 0x61 bit 0, and bit
 * 5 reads the channel's output, which goes high when the count reaches
 * zero. Each poll of port 0x61 is a VM exit, so the edge is seen within
 * tens of microseconds: well under 0.1 % of the window. The fastest of
 * three runs is kept (a delay can only lengthen a run). */
static u64 tsc_hz(void)
{
	u64 best = ~0ull;
	for (int i = 0; i < 3; i++) {
		outb(0x61, (inb(0x61) & ~0x02) | 0x01);
		outb(0x43, 0xb0); /* channel 2, lo/hi byte, mode 0, binary */
		outb(0x42, 0xff);
		u64 t0 = rdtsc();
		outb(0x42, 0xff);
		while (!(inb(0x61) & 0x20))
			;
		u64 t = rdtsc() - t0;
		if (t < best)
			best = t;
	}
	return best * 1193182 / 0xffff;
}

/* --- the multiboot command line ---------------------------------------- */

/* The multiboot command line, or "". */
static const char *cmdline(u64 info)
{
	const u32 *mbi = (const u32 *)info;
	if (!info || !(mbi[0] & 4) || !mbi[4])
		return "";
	return (const char *)(u64)mbi[4];
}

/* The text after `key` ("secs=") in the command line, up to a space. */
static const char *option(const char *cl, const char *key)
{
	for (const char *p = cl; *p; p++) {
		if (p != cl && p[-1] != ' ')
			continue;
		const char *k = key, *q = p;
		while (*k && *q == *k)
			k++, q++;
		if (!*k)
			return q;
	}
	return 0;
}

/* The decimal number after `key`, or 0. */
static u64 option_num(const char *cl, const char *key)
{
	u64 n = 0;
	for (const char *v = option(cl, key); v && *v >= '0' && *v <= '9'; v++)
		n = n * 10 + (*v - '0');
	return n;
}

/* Does workload `name` start with the "only=" value? */
static int selected(const char *only, const char *name)
{
	if (!only)
		return 1;
	for (; *only && *only != ' '; only++, name++)
		if (*only != *name)
			return 0;
	return 1;
}

/* --- power ------------------------------------------------------------- */

/* ACPI soft-off: SLP_TYP 0 + SLP_EN in PM1a_CNT (PMBASE + 4) is S5 on
 * both chipsets. `pc`: the PIIX4 PM function (00:01.3), PMBASE at config
 * 0x40, PMIOSE at 0x80. `q35`: the ICH9 LPC bridge (00:1f.0), PMBASE at
 * 0x40 (128-byte aligned), ACPI_EN in ACPI_CNTL (0x44) bit 7. With no
 * firmware PMBASE may be unprogrammed, so it is set here first. */
static void poweroff(void)
{
	int pm = pci_find(0x8086, 0x7113);
	int lpc = pci_find(0x8086, 0x2918);
	u32 base = 0;
	if (pm >= 0) {
		base = cfg_read32(pm, 0x40) & 0xffc0;
		if (!base) {
			base = PMBASE_DEFAULT;
			cfg_write32(pm, 0x40, base | 1);
		}
		cfg_write8(pm, 0x80, 1); /* PMIOSE: PM I/O space on */
	} else if (lpc >= 0) {
		base = cfg_read32(lpc, 0x40) & 0xff80;
		if (!base) {
			base = PMBASE_DEFAULT;
			cfg_write32(lpc, 0x40, base | 1);
		}
		cfg_write8(lpc, 0x44, cfg_read32(lpc, 0x44) | 0x80);
	}
	if (base)
		outw(base + 4, 1 << 13);
	halt();
}

#endif
