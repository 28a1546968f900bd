//! Direct kernel boot (`-kernel`, `-initrd`, `-append`) without firmware.
//!
//! The VMM does what a boot loader would: it loads the kernel into guest
//! RAM, writes the boot information the kernel's boot protocol expects, and
//! builds the CPU state (GDT, page tables, registers) that protocol's entry
//! point requires. vCPU 0 starts at the kernel's entry, not at the reset
//! vector; the other vCPUs wait for INIT/SIPI from the kernel.
//!
//! Three protocols, recognised in QEMU's order (a multiboot header wins over
//! an ELF PVH note, since some multiboot kernels are ELF files too):
//! - Linux boot protocol 2.02+ (Documentation/x86/boot.rst): a bzImage with
//!   a setup header ("HdrS"); see [`linux`]. The 64-bit entry (2.12+,
//!   XLF_KERNEL_64) is used when the kernel offers it, the 32-bit one
//!   otherwise. An ELF vmlinux without a PVH note is entered through the
//!   64-bit Linux entry with a zero page, as Firecracker does.
//! - PVH (Xen's docs/misc/pvh.pandoc): an ELF whose PT_NOTE carries
//!   XEN_ELFNOTE_PHYS32_ENTRY; 32-bit protected mode, `hvm_start_info` in
//!   EBX; see [`pvh`].
//! - Multiboot 0.6.96: a header in the first 8 KiB; 32-bit protected mode,
//!   the multiboot information in EBX; see [`multiboot`].
//!
//! Kernel files are untrusted: every size and address read from them is
//! checked (`checked_*` arithmetic, bounds-checked guest-memory writes), and
//! each problem is one line naming the file.
//!
//! Low memory used by this path (all below 640 KiB, inside usable RAM except
//! the tables in the BIOS area, which the e820 map reserves):
//!
//! | address | what |
//! |---|---|
//! | 0x0500 | GDT |
//! | 0x1000-0x6fff | identity page tables for the 64-bit entry (4 GiB, 2 MiB pages) |
//! | 0x7000 | zero page / `hvm_start_info` / multiboot information |
//! | 0x8000-0x8fff | boot stack |
//! | 0x20000-0x2ffff | command lines |
//! | 0xe0000-0xfffff | ACPI tables, MP table (0xf0000), RSDP (0xf1000), SMBIOS entry point and tables (0xf8000); reserved |

pub mod cpu;
pub mod firmware;
pub mod linux;
pub mod multiboot;
pub mod pvh;

use devices::chipset::{
    ich9_lpc, ich9_lpc::Ich9Lpc, mch, mch::Mch, piix3, piix3::Piix3, piix4_pm, piix4_pm::Piix4Pm,
};
use devices::ide::PiixIde;
use devices::pci::PciFunction;
use devices::GuestMem;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use vm_memory::{Bytes, GuestAddress};

use crate::config::{KernelConfig, MachineConfig};
use crate::machine::ChipsetKind;
use crate::memory::{Layout, FOUR_GIB};
use crate::{acpi, mptable};

pub use cpu::{CpuMode, EntryState};

pub const GDT_ADDR: u64 = 0x500;
pub const PML4_ADDR: u64 = 0x1000;
pub const PDPT_ADDR: u64 = 0x2000;
pub const PD_ADDR: u64 = 0x3000;
pub const BOOT_INFO_ADDR: u64 = 0x7000;
pub const BOOT_INFO_SIZE: u64 = 0x1000;
pub const STACK_TOP: u64 = 0x8ff0;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_AREA: u64 = 0x10000;
/// The top of conventional memory handed to the guest as RAM; the last
/// KiB is reserved as an (empty) EBDA, where PC software expects one.
pub const EBDA_START: u64 = 0x9fc00;
/// The BIOS area that holds ACPI, MP and SMBIOS tables on this path.
pub const BIOS_AREA: u64 = 0xe0000;
pub const HIGH_MEMORY: u64 = 0x10_0000;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A problem with one of the files, named in the message.
    #[error("{0}")]
    File(String),
}

/// One e820 / PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The physical memory map a directly booted kernel sees: RAM below the
/// EBDA, the reserved EBDA and BIOS area, RAM from 1 MiB to the PCI hole,
/// and RAM above 4 GiB.
pub fn e820(layout: &Layout) -> Vec<E820Entry> {
    let mut v = Vec::new();
    let low_end = layout.below_4g.min(EBDA_START);
    v.push(E820Entry {
        addr: 0,
        size: low_end,
        kind: E820_RAM,
    });
    if layout.below_4g > EBDA_START {
        v.push(E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820_RESERVED,
        });
    }
    v.push(E820Entry {
        addr: BIOS_AREA,
        size: HIGH_MEMORY - BIOS_AREA,
        kind: E820_RESERVED,
    });
    if layout.below_4g > HIGH_MEMORY {
        v.push(E820Entry {
            addr: HIGH_MEMORY,
            size: layout.below_4g - HIGH_MEMORY,
            kind: E820_RAM,
        });
    }
    if layout.above_4g > 0 {
        v.push(E820Entry {
            addr: FOUR_GIB,
            size: layout.above_4g,
            kind: E820_RAM,
        });
    }
    v
}

/// The kernel formats this loader understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    BzImage,
    Multiboot,
    Elf,
}

/// Everything the loaders need besides the kernel file.
pub struct BootContext<'a> {
    pub ram: &'a GuestMem,
    pub layout: &'a Layout,
    pub cfg: &'a KernelConfig,
    /// Where the ACPI RSDP is (0 if there is none).
    pub rsdp: u64,
}

impl BootContext<'_> {
    pub fn kernel_name(&self) -> String {
        self.cfg.kernel.display().to_string()
    }

    /// An error about the kernel file.
    pub fn kernel_err(&self, msg: impl std::fmt::Display) -> BootError {
        BootError::File(format!("-kernel {}: {msg}", self.kernel_name()))
    }

    /// The highest usable RAM address + 1 below 4 GiB.
    pub fn low_ram_top(&self) -> u64 {
        self.layout.below_4g
    }

    /// Writes `data` at `addr`, failing (never writing partially outside
    /// RAM) if the range is not guest RAM.
    pub fn write(&self, addr: u64, data: &[u8], what: &str) -> Result<(), BootError> {
        let end = addr.checked_add(data.len() as u64);
        if end.is_none() || end > Some(self.layout.below_4g) && addr < FOUR_GIB {
            return Err(self.kernel_err(format!(
                "{what} ({} bytes at {addr:#x}) does not fit in guest RAM (-m {}M)",
                data.len(),
                (self.layout.below_4g + self.layout.above_4g) >> 20
            )));
        }
        self.ram.write_slice(data, GuestAddress(addr)).map_err(|_| {
            self.kernel_err(format!(
                "{what} ({} bytes at {addr:#x}) is outside guest RAM",
                data.len()
            ))
        })
    }

    /// Writes the kernel command line (NUL-terminated) at [`CMDLINE_ADDR`],
    /// checking it against the kernel's limit (without the NUL).
    pub fn write_cmdline(&self, cmdline: &str, limit: u64) -> Result<u64, BootError> {
        let len = cmdline.len() as u64;
        let limit = limit.min(CMDLINE_AREA - 1);
        if len > limit {
            return Err(BootError::File(format!(
                "-append: the command line is {len} bytes, longer than the kernel's cmdline_size ({limit})"
            )));
        }
        let mut b = cmdline.as_bytes().to_vec();
        b.push(0);
        self.write(CMDLINE_ADDR, &b, "the command line")?;
        Ok(CMDLINE_ADDR)
    }
}

/// An initrd file, read whole.
pub fn read_initrd(path: &str) -> Result<Vec<u8>, BootError> {
    std::fs::read(path).map_err(|e| BootError::File(format!("-initrd {path}: {e}")))
}

/// The Linux initrd: every `-initrd` file, each but the last padded to 4
/// bytes so that concatenated cpio archives stay aligned (the kernel's
/// initramfs unpacker skips the zero padding between them).
pub fn linux_initrd(cfg: &KernelConfig) -> Result<Vec<u8>, BootError> {
    let mut out = Vec::new();
    for (i, f) in cfg.initrd.iter().enumerate() {
        out.extend(read_initrd(f)?);
        if i + 1 < cfg.initrd.len() {
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        }
    }
    Ok(out)
}

/// Places `size` bytes page-aligned as high as possible below `limit`
/// (exclusive) and not below `floor`; the Linux way of placing an initrd.
pub fn place_high(size: u64, floor: u64, limit: u64) -> Option<u64> {
    let addr = limit.checked_sub(size)? & !0xfff;
    (addr >= floor).then_some(addr)
}

/// Loads the kernel named in `ctx.cfg` and writes its boot information.
/// Returns the state vCPU 0 must start in.
pub fn load(ctx: &BootContext) -> Result<EntryState, BootError> {
    let path = &ctx.cfg.kernel;
    let mut f = File::open(path).map_err(|e| ctx.kernel_err(e))?;
    let len = f.metadata().map_err(|e| ctx.kernel_err(e))?.len();
    let mut head = vec![0u8; len.min(multiboot::SEARCH_LEN as u64) as usize];
    f.read_exact(&mut head).map_err(|e| ctx.kernel_err(e))?;
    f.seek(SeekFrom::Start(0)).map_err(|e| ctx.kernel_err(e))?;
    let kind = probe(&head).ok_or_else(|| {
        ctx.kernel_err("not a kernel: no bzImage setup header, multiboot header or ELF header")
    })?;
    log::info!("-kernel {}: {kind:?}", path.display());
    cpu::write_gdt_and_page_tables(ctx.ram).map_err(|e| ctx.kernel_err(e))?;
    match kind {
        KernelKind::BzImage => linux::load_bzimage(ctx, &mut f),
        KernelKind::Multiboot => multiboot::load(ctx, &mut f, len),
        KernelKind::Elf => load_elf(ctx, &mut f),
    }
}

/// Recognises the kernel format from the file's first bytes.
pub fn probe(head: &[u8]) -> Option<KernelKind> {
    if head.get(0x202..0x206) == Some(b"HdrS") {
        return Some(KernelKind::BzImage);
    }
    if multiboot::find_header(head).is_some() {
        return Some(KernelKind::Multiboot);
    }
    if head.starts_with(b"\x7fELF") {
        return Some(KernelKind::Elf);
    }
    None
}

fn load_elf(ctx: &BootContext, f: &mut File) -> Result<EntryState, BootError> {
    use linux_loader::loader::{elf::Elf, elf::PvhBootCapability, KernelLoader};
    let mut class = [0u8; 5];
    f.read_exact(&mut class).map_err(|e| ctx.kernel_err(e))?;
    if class[4] != 2 {
        return Err(ctx.kernel_err(
            "a 32-bit ELF file without a multiboot header: not a bootable kernel (need a 64-bit vmlinux or a multiboot header)",
        ));
    }
    let r = Elf::load(ctx.ram, None, f, Some(GuestAddress(HIGH_MEMORY)))
        .map_err(|e| ctx.kernel_err(e))?;
    match r.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => pvh::boot(ctx, entry.0, r.kernel_end),
        _ => linux::boot_elf_64(ctx, r.kernel_load.0, r.kernel_end),
    }
}

/// Reads a whole file region for loaders that parse headers themselves.
pub fn read_at(f: &mut File, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(buf)
}

/// Whether `-kernel` boots directly (no firmware). An explicit `-bios` or
/// `-boot menu=on` asks for the firmware route instead, as the user wants
/// the firmware to run.
pub fn is_direct(cfg: &MachineConfig) -> bool {
    cfg.kernel.is_some() && !cfg.bios_explicit && !cfg.boot.menu
}

/// The ACPI PM I/O base SeaBIOS programs on the PIIX4 (PORT_ACPI_PM_BASE),
/// which the FADT describes.
pub const PM_BASE: u16 = 0x600;

/// Programs what firmware would: the PIIX3 PIRQ routes (as SeaBIOS sets
/// them) and the PIIX4 PM I/O base, enabled.
pub fn init_chipset(piix3: &mut Piix3, pm: &mut Piix4Pm) {
    for (i, irq) in mptable::PIRQ_IRQS.iter().enumerate() {
        piix3.config_write(piix3::PIRQ_ROUTE + i as u16, &[*irq]);
    }
    pm.config_write(piix4_pm::PMBASE, &(PM_BASE as u32 | 1).to_le_bytes());
    pm.config_write(piix4_pm::PMREGMISC, &[1]);
}

/// The `q35` chipset as SeaBIOS programs it (its `mch_isa_bridge_setup`
/// and `mch_mem_addr_setup`): PIRQA-H routed as on `pc`, the ACPI PM
/// block at [`PM_BASE`] and the ECAM window at its usual place.
pub fn init_q35(mch: &mut Mch, lpc: &mut Ich9Lpc) {
    for i in 0..8u16 {
        let reg = if i < 4 {
            ich9_lpc::PIRQA_ROUT + i
        } else {
            ich9_lpc::PIRQE_ROUT + i - 4
        };
        lpc.config_write(reg, &[mptable::PIRQ_IRQS[i as usize % 4]]);
    }
    lpc.config_write(ich9_lpc::PMBASE, &(PM_BASE as u32 | 1).to_le_bytes());
    lpc.config_write(ich9_lpc::ACPI_CNTL, &[ich9_lpc::ACPI_EN]);
    let bar = mch::ECAM_BASE | mch::PCIEXBAR_EN;
    mch.config_write(mch::PCIEXBAR, &bar.to_le_bytes());
}

/// PIIX3 IDE timing registers IDETIM (40h primary, 42h secondary).
const IDETIM: [u16; 2] = [0x40, 0x42];
/// IDETIM bit 15, "IDE decode enable".
const IDETIM_DECODE: u16 = 0x8000;

/// Enables both IDE channels, as SeaBIOS and qboot do (they write 8000h to
/// IDETIM). The register resets to 0, and Linux's ata_piix treats a channel
/// whose decode bit is clear as switched off in the BIOS: it skips the
/// port without a message, so no disk or CD would ever appear.
pub fn init_ide(ide: &mut PiixIde) {
    for reg in IDETIM {
        ide.config_write(reg, &IDETIM_DECODE.to_le_bytes());
    }
}

/// Where the MP floating pointer (followed by its table) goes.
pub const MPTABLE_ADDR: u64 = 0xf0000;
/// The ACPI RSDP: in the BIOS area, where PC operating systems search.
pub const RSDP_ADDR: u64 = 0xf1000;
/// The ACPI tables blob, up to the MP table.
pub const ACPI_TABLES_ADDR: u64 = 0xe0000;
pub const ACPI_TABLES_MAX: u64 = MPTABLE_ADDR - ACPI_TABLES_ADDR;
/// The SMBIOS 3.0 entry point, 16-byte aligned in 0xf0000-0xfffff where
/// an OS without UEFI searches (SMBIOS 3.x section 5.2.2), with the
/// structure table right after it, up to 1 MiB.
pub const SMBIOS_ANCHOR_ADDR: u64 = 0xf8000;
pub const SMBIOS_TABLES_ADDR: u64 = SMBIOS_ANCHOR_ADDR + 0x20;
pub const SMBIOS_TABLES_MAX: u64 = HIGH_MEMORY - SMBIOS_TABLES_ADDR;

/// The direct-boot path: firmware tables into the BIOS area, then the
/// kernel. Returns vCPU 0's entry state.
pub fn setup(
    cfg: &MachineConfig,
    ram: &GuestMem,
    layout: &Layout,
    chipset: ChipsetKind,
) -> Result<EntryState, BootError> {
    let kcfg = cfg
        .kernel
        .as_ref()
        .ok_or_else(|| BootError::File("-kernel: missing".into()))?;
    let tables_err = |e: vm_memory::GuestMemoryError| {
        BootError::File(format!("cannot write the firmware tables: {e}"))
    };
    ram.write_slice(
        &vec![0u8; (HIGH_MEMORY - BIOS_AREA) as usize],
        GuestAddress(BIOS_AREA),
    )
    .map_err(tables_err)?;
    let mp = mptable::build(MPTABLE_ADDR as u32, cfg.cpus, chipset);
    ram.write_slice(&mp, GuestAddress(MPTABLE_ADDR))
        .map_err(tables_err)?;
    let acpi = acpi::build(&acpi::AcpiConfig::new(cfg, layout, chipset));
    let (rsdp, tables) = acpi.place(ACPI_TABLES_ADDR);
    if tables.len() as u64 > ACPI_TABLES_MAX {
        return Err(BootError::File(format!(
            "the ACPI tables ({} bytes) do not fit in the BIOS area",
            tables.len()
        )));
    }
    ram.write_slice(&tables, GuestAddress(ACPI_TABLES_ADDR))
        .map_err(tables_err)?;
    ram.write_slice(&rsdp, GuestAddress(RSDP_ADDR))
        .map_err(tables_err)?;
    let smbios = crate::smbios::for_machine(cfg, layout, true).map_err(BootError::File)?;
    if smbios.tables.len() as u64 > SMBIOS_TABLES_MAX {
        return Err(BootError::File(format!(
            "the SMBIOS tables ({} bytes) do not fit in the BIOS area",
            smbios.tables.len()
        )));
    }
    ram.write_slice(&smbios.tables, GuestAddress(SMBIOS_TABLES_ADDR))
        .map_err(tables_err)?;
    ram.write_slice(
        &smbios.anchor(SMBIOS_TABLES_ADDR),
        GuestAddress(SMBIOS_ANCHOR_ADDR),
    )
    .map_err(tables_err)?;
    let ctx = BootContext {
        ram,
        layout,
        cfg: kcfg,
        rsdp: RSDP_ADDR,
    };
    load(&ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_map() {
        let m = e820(&Layout::new(128 << 20));
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: 1
            }
        );
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(
            m[2],
            E820Entry {
                addr: 0xe0000,
                size: 0x20000,
                kind: 2
            }
        );
        assert_eq!(
            m[3],
            E820Entry {
                addr: 0x100000,
                size: (128 << 20) - 0x100000,
                kind: 1
            }
        );
        assert_eq!(m.len(), 4);
        let m = e820(&Layout::new(4 << 30));
        assert_eq!(m.last().unwrap().addr, FOUR_GIB);
    }

    #[test]
    fn placement() {
        assert_eq!(place_high(0x1800, 0x100000, 0x800000), Some(0x7fe000));
        assert_eq!(place_high(0x800000, 0x100000, 0x800000), None);
        assert_eq!(place_high(u64::MAX, 0, 0x1000), None);
    }

    #[test]
    fn probing() {
        let mut b = vec![0u8; 0x400];
        assert_eq!(probe(&b), None);
        b[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(probe(&b), Some(KernelKind::BzImage));
        let mut e = b"\x7fELF".to_vec();
        e.resize(64, 0);
        assert_eq!(probe(&e), Some(KernelKind::Elf));
        assert_eq!(probe(&[]), None);
    }
}
