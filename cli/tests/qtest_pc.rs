//! The `pc` chipset through the qtest protocol: PCI config space, CMOS/RTC,
//! fw_cfg over I/O and DMA, the PM device and the protocol itself. No KVM.

mod support;

use support::qtest::{fw_cfg_dir_lookup, Qtest};

/// Reads an fw_cfg item over DMA, with a descriptor at 0x1000 and the buffer at 0x2000.
fn fw_cfg_read_dma(q: &mut Qtest, key: u16, len: u32) -> Vec<u8> {
    let control: u32 = (key as u32) << 16 | 0x08 | 0x02; // select + read
    let mut desc = Vec::new();
    desc.extend_from_slice(&control.to_be_bytes());
    desc.extend_from_slice(&len.to_be_bytes());
    desc.extend_from_slice(&0x2000u64.to_be_bytes());
    q.memwrite(0x1000, &desc);
    q.memwrite(0x2000, &vec![0xaa; len as usize]);
    // The address is written big-endian: high half at 0x514, low at 0x518.
    q.outl(0x514, 0);
    q.outl(0x518, u32::from_be_bytes(0x1000u32.to_le_bytes()));
    let ctl = q.memread(0x1000, 4);
    assert_eq!(ctl, [0, 0, 0, 0], "DMA control word after completion");
    q.memread(0x2000, len as usize)
}

#[test]
fn fw_cfg_signature_over_io_and_dma() {
    support::require_bios();
    let mut q = Qtest::start(&["-m", "512", "-smp", "3"]);
    assert_eq!(q.fw_cfg_read(0, 4), b"QEMU");
    let id = q.fw_cfg_read(1, 4);
    assert_eq!(
        u32::from_le_bytes(id.try_into().unwrap()) & 2,
        2,
        "DMA feature bit"
    );
    assert_eq!(fw_cfg_read_dma(&mut q, 0, 4), b"QEMU");
    // The DMA register reads back as the "QEMU CFG" signature.
    assert_eq!(q.inl(0x514).to_le_bytes(), *b"QEMU");
    assert_eq!(q.fw_cfg_read(0x05, 2), [3, 0], "NB_CPUS");
    assert_eq!(q.fw_cfg_read(0x0f, 2), [3, 0], "MAX_CPUS");
    assert_eq!(q.fw_cfg_read(0x04, 2), [1, 0], "NOGRAPHIC");
    assert_eq!(
        u64::from_le_bytes(q.fw_cfg_read(0x03, 8).try_into().unwrap()),
        512 << 20,
        "RAM_SIZE"
    );

    // The file directory, read over DMA, lists what SeaBIOS needs.
    let count = u32::from_be_bytes(fw_cfg_read_dma(&mut q, 0x19, 4).try_into().unwrap());
    let dir = fw_cfg_read_dma(&mut q, 0x19, 4 + 64 * count);
    for f in [
        "etc/e820",
        "bootorder",
        "etc/boot-fail-wait",
        "etc/show-boot-menu",
    ] {
        assert!(
            fw_cfg_dir_lookup(&dir, f).is_some(),
            "fw_cfg file {f} missing"
        );
    }
    let (key, size) = fw_cfg_dir_lookup(&dir, "etc/e820").unwrap();
    assert_eq!(size, 20, "one RAM entry for 512 MiB");
    let e820 = q.fw_cfg_read(key, 20);
    assert_eq!(u64::from_le_bytes(e820[0..8].try_into().unwrap()), 0);
    assert_eq!(
        u64::from_le_bytes(e820[8..16].try_into().unwrap()),
        512 << 20
    );
    assert_eq!(u32::from_le_bytes(e820[16..20].try_into().unwrap()), 1);
    let (key, _) = fw_cfg_dir_lookup(&dir, "etc/boot-fail-wait").unwrap();
    assert_eq!(q.fw_cfg_read(key, 4), [0xff; 4], "never retry by default");

    // A DMA descriptor pointing outside RAM sets the error bit.
    let mut desc = Vec::new();
    desc.extend_from_slice(&0x000a_u32.to_be_bytes()); // select key 0 + read
    desc.extend_from_slice(&16u32.to_be_bytes());
    desc.extend_from_slice(&0xffff_ff00_0000u64.to_be_bytes());
    q.memwrite(0x1000, &desc);
    q.outl(0x514, 0);
    q.outl(0x518, u32::from_be_bytes(0x1000u32.to_le_bytes()));
    assert_eq!(q.memread(0x1000, 4), [0, 0, 0, 1]);
}

#[test]
fn fw_cfg_e820_covers_ram_above_4g() {
    support::require_bios();
    let mut q = Qtest::start(&["-m", "6G"]);
    let count = u32::from_be_bytes(q.fw_cfg_read(0x19, 4).try_into().unwrap());
    let dir = q.fw_cfg_read(0x19, 4 + 64 * count as usize);
    let (key, size) = fw_cfg_dir_lookup(&dir, "etc/e820").unwrap();
    assert_eq!(size, 40);
    let e = q.fw_cfg_read(key, 40);
    let entry = |i: usize| {
        let b = &e[i * 20..];
        (
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            u64::from_le_bytes(b[8..16].try_into().unwrap()),
        )
    };
    assert_eq!(entry(0), (0, 3 << 30));
    assert_eq!(entry(1), (4 << 30, 3 << 30));
    // CMOS: 0x5b-0x5d count 64 KiB units above 4 GiB; 0x34-0x35 count 64 KiB
    // units between 16 MiB and the top of low RAM.
    let above = q.cmos(0x5b) as u64 | (q.cmos(0x5c) as u64) << 8 | (q.cmos(0x5d) as u64) << 16;
    assert_eq!(above << 16, 3 << 30);
    let mid = q.cmos(0x34) as u64 | (q.cmos(0x35) as u64) << 8;
    assert_eq!((mid << 16) + (16 << 20), 3 << 30);
    // Guest RAM above 4 GiB is reachable.
    q.writel(0x1_8000_0000, 0xdead_beef);
    assert_eq!(q.readl(0x1_8000_0000), 0xdead_beef);
}

#[test]
fn pci_ids_through_cf8_cfc() {
    support::require_bios();
    let mut q = Qtest::start(&[]);
    assert_eq!(q.pci_read32(0, 0, 0), 0x1237_8086, "i440FX host bridge");
    assert_eq!(q.pci_read32(1, 0, 0), 0x7000_8086, "PIIX3 ISA bridge");
    assert_eq!(q.pci_read32(1, 3, 0), 0x7113_8086, "PIIX4 PM");
    assert_eq!(q.pci_read32(1, 0, 8) >> 8, 0x060100, "ISA bridge class");
    assert_eq!(q.pci_read8(1, 0, 0x0e) & 0x80, 0x80, "multi-function");
    assert_eq!(q.pci_read32(2, 0, 0), 0xffff_ffff, "empty slot");
    // IDs are read-only.
    q.pci_write32(0, 0, 0, 0);
    assert_eq!(q.pci_read32(0, 0, 0), 0x1237_8086);
    // CONFIG_ADDRESS reads back; byte 0xcf9 is the reset control register.
    q.outl(0xcf8, 0x8000_0800);
    assert_eq!(q.inl(0xcf8), 0x8000_0800);
    // PAM registers are plain storage.
    q.pci_write8(0, 0, 0x59, 0x30);
    assert_eq!(q.pci_read8(0, 0, 0x59), 0x30);
    // PIRQ routing registers default to disabled and are writable.
    assert_eq!(q.pci_read32(1, 0, 0x60), 0x8080_8080);
    q.pci_write8(1, 0, 0x61, 0x0b);
    assert_eq!(q.pci_read8(1, 0, 0x61), 0x0b);
    // ELCR: IRQ 0-2 are always edge.
    q.outb(0x4d0, 0xff);
    assert_eq!(q.inb(0x4d0), 0xf8);
    q.outb(0x4d1, 0x0c);
    assert_eq!(q.inb(0x4d1), 0x0c);
}

/// CONFIG_ADDRESS bits 1:0 are kept and OR-ed into the register number, as
/// in QEMU: libqtest reads a word at register 2 with `outl 0xcf8, ...02;
/// inw 0xcfc`.
#[test]
fn cf8_bits_1_0_pick_the_register() {
    support::require_bios();
    let mut q = Qtest::start(&[]);
    // 00:01.1 is the PIIX3 IDE function: register 2 is its device ID.
    q.outl(0xcf8, 0x8000_0902);
    assert_eq!(q.inw(0xcfc), 0x7010, "device ID, not vendor ID");
    assert_eq!(q.inl(0xcf8), 0x8000_0902, "CONFIG_ADDRESS reads back whole");

    // IDETIM of the secondary channel (registers 0x42-0x43, the upper
    // half of the dword at 0x40) is a writable 16-bit register.
    q.outl(0xcf8, 0x8000_0942);
    q.outw(0xcfc, 0x8123);
    assert_eq!(q.inw(0xcfc), 0x8123);
    // The same register through the data port's own offset.
    q.outl(0xcf8, 0x8000_0940);
    q.outw(0xcfe, 0x8456);
    assert_eq!(q.inw(0xcfe), 0x8456);
    q.outl(0xcf8, 0x8000_0942);
    assert_eq!(q.inw(0xcfc), 0x8456);
    assert_eq!(q.pci_read32(1, 1, 0x40) >> 16, 0x8456);
}

#[test]
fn pm_device_and_timer() {
    support::require_bios();
    let mut q = Qtest::start(&[]);
    // SMM is reported as already set up.
    assert_eq!(q.pci_read8(1, 3, 0x5b), 0x02);
    // Program PMBASE as SeaBIOS does and enable the PM I/O space.
    q.pci_write32(1, 3, 0x40, 0x601);
    q.pci_write8(1, 3, 0x80, 0x01);
    assert_eq!(q.pci_read32(1, 3, 0x40), 0x601);
    let t0 = q.inl(0x608);
    q.clock_step(1_000_000); // 1 ms
    let t1 = q.inl(0x608);
    assert_eq!(
        t1.wrapping_sub(t0) & 0xff_ffff,
        3579,
        "PM timer ticks at 3.579545 MHz"
    );
    // APM: 0xf1 to port 0xb2 switches to ACPI mode (SCI_EN).
    assert_eq!(q.inw(0x604) & 1, 0);
    q.outb(0xb2, 0xf1);
    assert_eq!(q.inw(0x604) & 1, 1);
    q.outb(0xb3, 0x5a);
    assert_eq!(q.inb(0xb3), 0x5a);
}

#[test]
fn cmos_memory_size_matches_m() {
    support::require_bios();
    let mut q = Qtest::start(&["-m", "512", "-smp", "2"]);
    let base = q.cmos(0x15) as u32 | (q.cmos(0x16) as u32) << 8;
    assert_eq!(base, 640);
    let ext = q.cmos(0x30) as u32 | (q.cmos(0x31) as u32) << 8;
    assert_eq!(ext, 0xffff, "extended memory saturates at 64 MiB");
    let mid = q.cmos(0x34) as u64 | (q.cmos(0x35) as u64) << 8;
    assert_eq!((mid << 16) + (16 << 20), 512 << 20);
    assert_eq!(q.cmos(0x5b), 0);
    assert_eq!(q.cmos(0x5f), 1, "CPU count - 1");
    // Default boot order "cad": disk first, then floppy, then CD.
    assert_eq!(q.cmos(0x3d), 0x12);
    assert_eq!(q.cmos(0x38) >> 4, 3);

    let mut q = Qtest::start(&["-m", "20"]);
    let ext = q.cmos(0x17) as u32 | (q.cmos(0x18) as u32) << 8;
    assert_eq!(ext, 19 * 1024);
    let mid = q.cmos(0x34) as u32 | (q.cmos(0x35) as u32) << 8;
    assert_eq!(mid, 64, "4 MiB above 16 MiB in 64 KiB units");
}

#[test]
fn rtc_runs_with_the_qtest_clock() {
    support::require_bios();
    let mut q = Qtest::start(&["-boot", "order=dc"]);
    assert_eq!(q.cmos(0x3d), 0x23);
    assert_eq!(q.cmos(0x0d), 0x80, "valid RAM and time");
    assert_eq!(q.cmos(0x0b) & 0x02, 0x02, "24-hour mode");
    let bcd = |v: u8| (v >> 4) * 10 + (v & 0xf);
    let s0 = bcd(q.cmos(0));
    q.clock_step(5_000_000_000);
    let s1 = bcd(q.cmos(0));
    assert_eq!((s0 + 5) % 60, s1);
    let century = bcd(q.cmos(0x32));
    assert!(century >= 20, "century {century}");
}

#[test]
fn protocol_errors_and_memory() {
    support::require_bios();
    let mut q = Qtest::start(&[]);
    assert!(q.cmd("frobnicate 1 2").starts_with("FAIL"));
    assert!(q.cmd("outb").starts_with("FAIL"));
    assert!(q.cmd("read 0 99999999999").starts_with("FAIL"));
    assert_eq!(q.cmd("endianness"), "OK little");
    q.memwrite(0x5000, b"strata");
    assert_eq!(q.memread(0x5000, 6), b"strata");
    assert_eq!(q.cmd("b64read 0x5000 6"), "OK c3RyYXRh");
    assert_eq!(q.cmd("b64write 0x6000 3 YWJj"), "OK");
    assert_eq!(q.memread(0x6000, 3), b"abc");
    assert_eq!(q.cmd("memset 0x6000 2 0x7a"), "OK");
    assert_eq!(q.memread(0x6000, 3), b"zzc");
    q.writeq(0x7000, 0x0102_0304_0506_0708);
    assert_eq!(q.cmd("readq 0x7000"), "OK 0x0102030405060708");
    // The BIOS is mapped just below 4 GiB, and its top is shadowed at 0xf0000.
    assert_eq!(q.readb(0xffff_fff0), q.readb(0xffff0));
    // Unclaimed ports float high; unclaimed MMIO reads as zeroes, as
    // QEMU's unassigned memory does.
    assert_eq!(q.inb(0x2ff), 0xff);
    assert_eq!(q.readl(0xfeb0_0000), 0);
    assert_eq!(q.clock_step(10), 10);
    assert_eq!(q.cmd("clock_set 100"), "OK 100");
}

#[test]
fn irq_intercept_reports_i8042_interrupt() {
    support::require_bios();
    let mut q = Qtest::start(&[]);
    assert_eq!(q.cmd("irq_intercept_in ioapic"), "OK");
    assert!(q.cmd("irq_intercept_in ioapic").starts_with("FAIL"));
    // Controller self-test puts 0x55 in the output buffer; with the keyboard
    // interrupt enabled (the power-on command byte) IRQ 1 rises.
    q.outb(0x64, 0xaa);
    assert_eq!(q.inb(0x64) & 1, 1);
    assert_eq!(q.inb(0x60), 0x55);
    // The raise and lower arrive before the OK of the inb that drained it.
    let events: Vec<_> = q.irqs.drain(..).collect();
    assert_eq!(events, vec![(1, true), (1, false)]);
}

#[test]
fn guest_resets_rebuild_the_machine() {
    support::require_bios();
    let mut q = Qtest::start(&[]);
    // PAM0 is plain storage until the machine resets, which restores it.
    type Reset = fn(&mut Qtest);
    let reset_by: [(&str, Reset); 4] = [
        ("0xcf9 RCPU", |q| q.outb(0xcf9, 0x06)),
        ("port 0x92 bit 0", |q| q.outb(0x92, 0x01)),
        ("i8042 pulse", |q| q.outb(0x64, 0xfe)),
        ("i8042 output port", |q| {
            q.outb(0x64, 0xd1);
            q.outb(0x60, 0x00)
        }),
    ];
    for (what, reset) in reset_by {
        q.pci_write8(0, 0, 0x59, 0x30);
        assert_eq!(q.pci_read8(0, 0, 0x59), 0x30);
        reset(&mut q);
        assert_eq!(
            q.pci_read8(0, 0, 0x59),
            0x00,
            "{what} did not reset the machine"
        );
    }
    // Writing 0x02 (SRST only) to 0xcf9 is not a reset.
    q.pci_write8(0, 0, 0x59, 0x30);
    q.outb(0xcf9, 0x02);
    assert_eq!(q.inb(0xcf9), 0x02);
    assert_eq!(q.pci_read8(0, 0, 0x59), 0x30);
}
