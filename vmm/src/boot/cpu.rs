//! The CPU state a directly booted kernel starts in: a flat GDT, identity
//! page tables for the 64-bit entry, and the register values of each boot
//! protocol's entry (Intel SDM vol. 3A 3.4.5 for descriptor formats, 4.5
//! for 4-level paging). The KVM side applies [`EntryState`] to vCPU 0 in
//! `vcpu::set_boot_state`.

use devices::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use super::{GDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};

/// Selectors of the boot GDT. 0x10/0x18 are the Linux boot protocol's
/// __BOOT_CS/__BOOT_DS, which a 32-bit Linux entry requires.
pub const CODE_SEL: u16 = 0x10;
pub const DATA_SEL: u16 = 0x18;
pub const TSS_SEL: u16 = 0x20;
/// The 64-bit code segment used for the long-mode entry.
pub const CODE64_SEL: u16 = 0x28;

/// Flat descriptors: base 0, limit 4 GiB, granularity 4 KiB.
pub const GDT: [u64; 6] = [
    0,
    0,
    0x00cf_9b00_0000_ffff, // 0x10: 32-bit code, execute/read, accessed
    0x00cf_9300_0000_ffff, // 0x18: data, read/write, accessed
    0x0000_8b00_0000_0067, // 0x20: 32-bit TSS (busy), base 0, limit 0x67
    0x00af_9b00_0000_ffff, // 0x28: 64-bit code (L=1)
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// 32-bit protected mode, paging off (PVH, multiboot, Linux 32-bit).
    Protected32,
    /// 64-bit long mode on the identity page tables (Linux 64-bit entry).
    Long64,
}

/// Registers vCPU 0 starts with; everything else is zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryState {
    pub mode: CpuMode,
    pub rip: u64,
    pub rsp: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rsi: u64,
}

/// Writes the GDT and the identity page tables (PML4 -> one PDPT -> four
/// page directories of 2 MiB pages, covering 0-4 GiB).
pub fn write_gdt_and_page_tables(ram: &GuestMem) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, d) in GDT.iter().enumerate() {
        ram.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    // Present | writable.
    ram.write_obj(PDPT_ADDR | 3, GuestAddress(PML4_ADDR))?;
    for g in 0..4u64 {
        let pd = PD_ADDR + g * 0x1000;
        ram.write_obj(pd | 3, GuestAddress(PDPT_ADDR + 8 * g))?;
        for i in 0..512u64 {
            let page = (g << 30) | (i << 21);
            // Present | writable | page size (2 MiB).
            ram.write_obj(page | 0x83, GuestAddress(pd + 8 * i))?;
        }
    }
    Ok(())
}

/// Decodes a GDT entry into the fields KVM's segment registers want:
/// (base, limit in bytes, type, s, dpl, present, avl, l, db, g).
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub type_: u8,
    pub s: u8,
    pub dpl: u8,
    pub present: u8,
    pub avl: u8,
    pub l: u8,
    pub db: u8,
    pub g: u8,
}

pub fn segment(desc: u64) -> Segment {
    let g = ((desc >> 55) & 1) as u8;
    let raw_limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    Segment {
        base: ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        type_: ((desc >> 40) & 0xf) as u8,
        s: ((desc >> 44) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        present: ((desc >> 47) & 1) as u8,
        avl: ((desc >> 52) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        db: ((desc >> 54) & 1) as u8,
        g,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode() {
        let c = segment(GDT[2]);
        assert_eq!(
            (c.base, c.limit, c.type_, c.db, c.l),
            (0, 0xffff_ffff, 0xb, 1, 0)
        );
        let c = segment(GDT[5]);
        assert_eq!((c.l, c.db), (1, 0));
        let t = segment(GDT[4]);
        assert_eq!((t.type_, t.s, t.limit, t.present), (0xb, 0, 0x67, 1));
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let ram = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_gdt_and_page_tables(&ram).unwrap();
        let pml4: u64 = ram.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let last: u64 = ram
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, (3 << 30) | (511 << 21) | 0x83);
    }
}
