/*
 * Strata's boot test kernel: reports on COM1 what the boot loader handed
 * over, so tests can compare it with what they passed. Freestanding: no
 * libc, no FPU/SSE (guest ring 0 is emulated instruction by instruction
 * on the project's machines, and x87/XSAVE instructions stop it there).
 *
 * Boot information read (offsets from each spec):
 * - Linux zero page (Documentation/arch/x86/zero-page.rst): e820_entries
 *   0x1e8, e820_table 0x2d0, acpi_rsdp_addr 0x070, ramdisk_image 0x218,
 *   ramdisk_size 0x21c, cmd_line_ptr 0x228.
 * - PVH hvm_start_info (Xen's arch-x86/hvm/start_info.h).
 * - Multiboot 0.6.96 information structure, section 3.3.
 *
 * Output lines, all starting "TK ":
 *   TK proto=<linux32|linux64|pvh|multiboot> magic=<hex>
 *   TK cmdline=<text>
 *   TK initrd size=<dec> fnv=<hex>          (Linux and PVH)
 *   TK module size=<dec> fnv=<hex> cmdline=<text>   (multiboot, each)
 *   TK e820 <addr hex> <size hex> <type>
 *   TK rsdp given=<hex> found=<hex>         (found: scanned in 0xe0000-0xfffff)
 *   TK DONE
 */
#include "../common/guest.h"

#define RD8(a) (*(volatile u8 *)(u64)(a))
#define RD16(a) (*(volatile u16 *)(u64)(a))
#define RD32(a) (*(volatile u32 *)(u64)(a))
#define RD64(a) (*(volatile u64 *)(u64)(a))

/* FNV-1a, 32-bit: a few instructions per byte, cheap under emulation. */
static u32 fnv(u64 addr, u64 len)
{
	u32 h = 2166136261u;
	for (u64 i = 0; i < len; i++) {
		h ^= RD8(addr + i);
		h *= 16777619u;
	}
	return h;
}

static void cmdline(u64 addr)
{
	puts("TK cmdline=");
	if (addr)
		for (u64 i = 0; i < 65536 && RD8(addr + i); i++)
			putc(RD8(addr + i));
	putc('\n');
}

static void initrd(u64 addr, u64 size)
{
	puts("TK initrd size=");
	putdec(size);
	puts(" fnv=");
	puthex(fnv(addr, size));
	putc('\n');
}

static void e820(u64 addr, u64 size, u32 type)
{
	puts("TK e820 ");
	puthex(addr);
	putc(' ');
	puthex(size);
	putc(' ');
	putdec(type);
	putc('\n');
}

static u64 scan_rsdp(void)
{
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (RD32(a) == 0x20445352 && RD32(a + 4) == 0x20525450) /* "RSD PTR " */
			return a;
	return 0;
}

void kmain(u32 kind, u64 info, u32 magic)
{
	static const char *names[] = { "?", "linux32", "linux64", "pvh", "multiboot" };
	u64 rsdp = 0;

	puts("\nTK proto=");
	puts(names[kind < 5 ? kind : 0]);
	puts(" magic=");
	puthex(magic);
	putc('\n');
	if (kind == 1 || kind == 2) {
		cmdline(RD32(info + 0x228));
		if (RD32(info + 0x21c))
			initrd(RD32(info + 0x218) | (u64)RD32(info + 0xc0) << 32,
			       RD32(info + 0x21c));
		for (u32 i = 0; i < RD8(info + 0x1e8); i++) {
			u64 e = info + 0x2d0 + 20 * i;
			e820(RD64(e), RD64(e + 8), RD32(e + 16));
		}
		rsdp = RD64(info + 0x70);
	} else if (kind == 3) {
		if (RD32(info) != 0x336ec578)
			puts("TK bad hvm_start_info magic\n");
		cmdline(RD64(info + 24));
		if (RD32(info + 12)) {
			u64 m = RD64(info + 16);
			initrd(RD64(m), RD64(m + 8));
		}
		u64 map = RD64(info + 40);
		for (u32 i = 0; i < RD32(info + 48); i++)
			e820(RD64(map + 24 * i), RD64(map + 24 * i + 8), RD32(map + 24 * i + 16));
		rsdp = RD64(info + 32);
	} else if (kind == 4) {
		u32 flags = RD32(info);
		cmdline(flags & 4 ? RD32(info + 16) : 0);
		if (flags & 8)
			for (u32 i = 0; i < RD32(info + 20); i++) {
				u64 m = RD32(info + 24) + 16 * i;
				u32 start = RD32(m), end = RD32(m + 4);
				puts("TK module size=");
				putdec(end - start);
				puts(" fnv=");
				puthex(fnv(start, end - start));
				puts(" cmdline=");
				for (u64 s = RD32(m + 8); s && RD8(s); s++)
					putc(RD8(s));
				putc('\n');
			}
		if (flags & 64) {
			u64 p = RD32(info + 48), end = p + RD32(info + 44);
			while (p < end) {
				e820(RD64(p + 4), RD64(p + 12), RD32(p + 20));
				p += RD32(p) + 4;
			}
		}
	}
	puts("TK rsdp given=");
	puthex(rsdp);
	puts(" found=");
	puthex(scan_rsdp());
	puts("\nTK DONE\n");
}
