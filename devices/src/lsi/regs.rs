//! The LSI53C895A operating registers (Technical Manual chapter 4
//! "Registers", "SCSI Registers"): offsets, bit names and the plain
//! storage of the register file.
//!
//! The same 256 bytes appear in I/O space (BAR0) and memory space (BAR1);
//! every access is split into byte accesses, lowest address first, which
//! is how the chip's byte lanes see a wider access. Registers with side
//! effects on read or write (DSTAT, SIST0/1, ISTAT0, CTEST2, DSP, DCNTL,
//! SCNTL1) are handled by the chip ([`super::chip`]); this module only
//! stores values and knows where they live.

/// Register offsets.
pub mod off {
    pub const SCNTL0: u8 = 0x00;
    pub const SCNTL1: u8 = 0x01;
    pub const SCNTL2: u8 = 0x02;
    pub const SCNTL3: u8 = 0x03;
    pub const SCID: u8 = 0x04;
    pub const SXFER: u8 = 0x05;
    pub const SDID: u8 = 0x06;
    pub const GPREG: u8 = 0x07;
    pub const SFBR: u8 = 0x08;
    pub const SOCL: u8 = 0x09;
    pub const SSID: u8 = 0x0a;
    pub const SBCL: u8 = 0x0b;
    pub const DSTAT: u8 = 0x0c;
    pub const SSTAT0: u8 = 0x0d;
    pub const SSTAT1: u8 = 0x0e;
    pub const SSTAT2: u8 = 0x0f;
    pub const DSA: u8 = 0x10;
    pub const ISTAT0: u8 = 0x14;
    pub const ISTAT1: u8 = 0x15;
    pub const MBOX0: u8 = 0x16;
    pub const MBOX1: u8 = 0x17;
    pub const CTEST0: u8 = 0x18;
    pub const CTEST1: u8 = 0x19;
    pub const CTEST2: u8 = 0x1a;
    pub const CTEST3: u8 = 0x1b;
    pub const TEMP: u8 = 0x1c;
    pub const DFIFO: u8 = 0x20;
    pub const CTEST4: u8 = 0x21;
    pub const CTEST5: u8 = 0x22;
    pub const CTEST6: u8 = 0x23;
    pub const DBC: u8 = 0x24;
    pub const DCMD: u8 = 0x27;
    pub const DNAD: u8 = 0x28;
    pub const DSP: u8 = 0x2c;
    pub const DSPS: u8 = 0x30;
    pub const SCRATCHA: u8 = 0x34;
    pub const DMODE: u8 = 0x38;
    pub const DIEN: u8 = 0x39;
    pub const SBR: u8 = 0x3a;
    pub const DCNTL: u8 = 0x3b;
    pub const ADDER: u8 = 0x3c;
    pub const SIEN0: u8 = 0x40;
    pub const SIEN1: u8 = 0x41;
    pub const SIST0: u8 = 0x42;
    pub const SIST1: u8 = 0x43;
    pub const SLPAR: u8 = 0x44;
    pub const SWIDE: u8 = 0x45;
    pub const MACNTL: u8 = 0x46;
    pub const GPCNTL: u8 = 0x47;
    pub const STIME0: u8 = 0x48;
    pub const STIME1: u8 = 0x49;
    pub const RESPID0: u8 = 0x4a;
    pub const RESPID1: u8 = 0x4b;
    pub const STEST0: u8 = 0x4c;
    pub const STEST1: u8 = 0x4d;
    pub const STEST2: u8 = 0x4e;
    pub const STEST3: u8 = 0x4f;
    pub const SIDL: u8 = 0x50;
    pub const STEST4: u8 = 0x52;
    pub const SODL: u8 = 0x54;
    pub const CCNTL0: u8 = 0x56;
    pub const CCNTL1: u8 = 0x57;
    pub const SBDL: u8 = 0x58;
    /// SCRATCHB, then SCRATCHC..SCRATCHJ (0x60..0x7f) and the further
    /// scratch dwords QEMU keeps up to 0x9f: 17 dwords.
    pub const SCRATCHB: u8 = 0x5c;
    pub const SCRATCH_END: u8 = 0xa0;
    pub const MMRS: u8 = 0xa0;
    pub const MMWS: u8 = 0xa4;
    pub const SFS: u8 = 0xa8;
    pub const DRS: u8 = 0xac;
    pub const SBMS: u8 = 0xb0;
    pub const DBMS: u8 = 0xb4;
    pub const DNAD64: u8 = 0xb8;
    pub const PMJAD1: u8 = 0xc0;
    pub const PMJAD2: u8 = 0xc4;
    pub const RBC: u8 = 0xc8;
    pub const UA: u8 = 0xcc;
    pub const ESA: u8 = 0xd0;
    pub const IA: u8 = 0xd4;
    pub const SBC: u8 = 0xd8;
    pub const CSBC: u8 = 0xdc;
}

/// SCNTL1 bits.
pub mod scntl1 {
    pub const SST: u8 = 0x01;
    pub const IARB: u8 = 0x02;
    /// Assert SCSI RST/: a bus reset.
    pub const RST: u8 = 0x08;
    /// Connected.
    pub const CON: u8 = 0x10;
}

/// SCNTL2 bits that are status, written as ones to clear.
pub mod scntl2 {
    pub const WSR: u8 = 0x01;
    pub const WSS: u8 = 0x08;
}

/// SCID: bits 3..0 the chip's own SCSI id; RRE/SRE enable responses to
/// reselection and selection.
pub mod scid {
    pub const ID: u8 = 0x0f;
}

/// SOCL/SBCL: the SCSI control lines.
pub mod sbcl {
    pub const ATN: u8 = 0x08;
    pub const BSY: u8 = 0x20;
    pub const ACK: u8 = 0x40;
    pub const REQ: u8 = 0x80;
}

/// ISTAT0.
pub mod istat0 {
    /// DMA interrupt pending (DSTAT non-zero).
    pub const DIP: u8 = 0x01;
    /// SCSI interrupt pending (SIST0/1 non-zero).
    pub const SIP: u8 = 0x02;
    /// Interrupt on the fly; written as one to clear.
    pub const INTF: u8 = 0x04;
    /// Connected to the SCSI bus (read only).
    pub const CON: u8 = 0x08;
    pub const SEM: u8 = 0x10;
    /// Signal process: wakes WAIT RESELECT.
    pub const SIGP: u8 = 0x20;
    /// Software reset.
    pub const SRST: u8 = 0x40;
    /// Abort the SCRIPTS operation.
    pub const ABRT: u8 = 0x80;
}

/// ISTAT1.
pub mod istat1 {
    /// SCRIPTS running.
    pub const SRUN: u8 = 0x02;
}

/// SSTAT0.
pub mod sstat0 {
    pub const RST: u8 = 0x02;
    /// Won arbitration.
    pub const WOA: u8 = 0x04;
}

/// SSTAT2: last disconnect.
pub mod sstat2 {
    pub const LDSC: u8 = 0x02;
}

/// DSTAT: the DMA interrupt causes.
pub mod dstat {
    /// Illegal instruction detected.
    pub const IID: u8 = 0x01;
    /// SCRIPTS interrupt instruction received.
    pub const SIR: u8 = 0x04;
    /// Single-step interrupt.
    pub const SSI: u8 = 0x08;
    /// Aborted (ISTAT0 ABRT).
    pub const ABRT: u8 = 0x10;
    /// PCI bus fault: a DMA access the bus did not complete.
    pub const BF: u8 = 0x20;
    /// DMA FIFO empty: always reads as set, the emulation keeps no FIFO.
    pub const DFE: u8 = 0x80;
}

/// SIST0: SCSI interrupt causes.
pub mod sist0 {
    pub const PAR: u8 = 0x01;
    /// SCSI RST/ received.
    pub const RST: u8 = 0x02;
    /// Unexpected disconnect.
    pub const UDC: u8 = 0x04;
    pub const SGE: u8 = 0x08;
    /// Reselected.
    pub const RSL: u8 = 0x10;
    /// Selected.
    pub const SEL: u8 = 0x20;
    /// Function complete.
    pub const CMP: u8 = 0x40;
    /// Phase mismatch.
    pub const MA: u8 = 0x80;
}

/// SIST1.
pub mod sist1 {
    /// Handshake-to-handshake timer expired.
    pub const HTH: u8 = 0x01;
    /// General purpose timer expired.
    pub const GEN: u8 = 0x02;
    /// Selection or reselection timeout.
    pub const STO: u8 = 0x04;
}

/// DCNTL.
pub mod dcntl {
    /// 53C700 compatibility (SFBR on reselection).
    pub const COM: u8 = 0x01;
    /// IRQ pin disable.
    pub const IRQD: u8 = 0x02;
    /// Start DMA operation (manual start mode).
    pub const STD: u8 = 0x04;
    /// Single-step mode.
    pub const SSM: u8 = 0x10;
    /// Prefetch flush, self-clearing.
    pub const PFF: u8 = 0x40;
}

/// DMODE.
pub mod dmode {
    /// Manual start mode: a DSP write does not start SCRIPTS.
    pub const MAN: u8 = 0x01;
}

/// CTEST2.
pub mod ctest2 {
    pub const DACK: u8 = 0x01;
    pub const PCICIE: u8 = 0x08;
    pub const CM: u8 = 0x10;
    /// Reads as ISTAT0 SIGP, and reading clears SIGP.
    pub const SIGP: u8 = 0x40;
}

/// CCNTL0: phase mismatch jump control (the 895A's successor feature, kept
/// as QEMU keeps it).
pub mod ccntl0 {
    pub const PMJCTL: u8 = 0x40;
    pub const ENPMJ: u8 = 0x80;
}

/// SCSI bus phases, as MSG/ C/D / I/O in SSTAT1 bits 2..0 and in the
/// phase field of block move and transfer control instructions.
pub mod phase {
    pub const DATA_OUT: u8 = 0;
    pub const DATA_IN: u8 = 1;
    pub const COMMAND: u8 = 2;
    pub const STATUS: u8 = 3;
    pub const MSG_OUT: u8 = 6;
    pub const MSG_IN: u8 = 7;
    pub const MASK: u8 = 7;
}

/// Number of 32-bit scratch registers: SCRATCHA at 0x34 and 17 more from
/// 0x5c.
pub const SCRATCH: usize = 18;

/// The stored register values. Fields are what software can read back;
/// state that registers merely reflect (connected, the bus phase) is the
/// chip's.
#[derive(Clone, Debug)]
pub struct Regs {
    pub scntl0: u8,
    pub scntl1: u8,
    pub scntl2: u8,
    pub scntl3: u8,
    pub scid: u8,
    pub sxfer: u8,
    pub sdid: u8,
    pub sfbr: u8,
    pub socl: u8,
    pub ssid: u8,
    pub sbcl: u8,
    pub dstat: u8,
    pub sstat0: u8,
    pub sstat1: u8,
    pub dsa: u32,
    pub istat0: u8,
    pub istat1: u8,
    pub mbox0: u8,
    pub mbox1: u8,
    pub ctest2: u8,
    pub ctest3: u8,
    pub temp: u32,
    pub dfifo: u8,
    pub ctest4: u8,
    pub ctest5: u8,
    /// 24 bits.
    pub dbc: u32,
    pub dcmd: u8,
    pub dnad: u32,
    pub dsp: u32,
    pub dsps: u32,
    /// SCRATCHA, SCRATCHB, SCRATCHC.. in that order.
    pub scratch: [u32; SCRATCH],
    pub dmode: u8,
    pub dien: u8,
    pub sbr: u8,
    pub dcntl: u8,
    pub adder: u32,
    pub sien0: u8,
    pub sien1: u8,
    pub sist0: u8,
    pub sist1: u8,
    pub slpar: u8,
    pub stime0: u8,
    pub stime1: u8,
    pub respid0: u8,
    pub respid1: u8,
    pub stest1: u8,
    pub stest2: u8,
    pub stest3: u8,
    pub sidl: u8,
    pub sodl: u8,
    pub ccntl0: u8,
    pub ccntl1: u8,
    pub mmrs: u32,
    pub mmws: u32,
    pub sfs: u32,
    pub drs: u32,
    pub sbms: u32,
    pub dbms: u32,
    pub dnad64: u32,
    pub pmjad1: u32,
    pub pmjad2: u32,
    pub rbc: u32,
    pub ua: u32,
    pub esa: u32,
    pub ia: u32,
    pub sbc: u32,
    pub csbc: u32,
}

impl Default for Regs {
    /// The values after a chip (software) reset, chapter 4's "default"
    /// column as QEMU models it: SCNTL0 arbitration bits set, own id 7,
    /// RESPID0 answering as id 7, CTEST2 DACK, DCMD 40h.
    fn default() -> Self {
        Regs {
            scntl0: 0xc0,
            scntl1: 0,
            scntl2: 0,
            scntl3: 0,
            scid: 7,
            sxfer: 0,
            sdid: 0,
            sfbr: 0,
            socl: 0,
            ssid: 0,
            sbcl: 0,
            dstat: 0,
            sstat0: 0,
            sstat1: 0,
            dsa: 0,
            istat0: 0,
            istat1: 0,
            mbox0: 0,
            mbox1: 0,
            ctest2: ctest2::DACK,
            ctest3: 0,
            temp: 0,
            dfifo: 0,
            ctest4: 0,
            ctest5: 0,
            dbc: 0,
            dcmd: 0x40,
            dnad: 0,
            dsp: 0,
            dsps: 0,
            scratch: [0; SCRATCH],
            dmode: 0,
            dien: 0,
            sbr: 0,
            dcntl: 0,
            adder: 0,
            sien0: 0,
            sien1: 0,
            sist0: 0,
            sist1: 0,
            slpar: 0,
            stime0: 0,
            stime1: 0,
            respid0: 0x80,
            respid1: 0,
            stest1: 0,
            stest2: 0,
            stest3: 0,
            sidl: 0,
            sodl: 0,
            ccntl0: 0,
            ccntl1: 0,
            mmrs: 0,
            mmws: 0,
            sfs: 0,
            drs: 0,
            sbms: 0,
            dbms: 0,
            dnad64: 0,
            pmjad1: 0,
            pmjad2: 0,
            rbc: 0,
            ua: 0,
            esa: 0,
            ia: 0,
            sbc: 0,
            csbc: 0,
        }
    }
}

/// The 32-bit register (and the byte within it) that `offset` falls in,
/// for the registers with no side effects beyond storage: `None` for byte
/// registers and for offsets the chip handles itself.
pub fn dword_mut(r: &mut Regs, offset: u8) -> Option<(&mut u32, u32)> {
    let byte = (offset & 3) as u32;
    let reg = match offset & !3 {
        off::DSA => &mut r.dsa,
        off::TEMP => &mut r.temp,
        off::DNAD => &mut r.dnad,
        off::DSPS => &mut r.dsps,
        off::SCRATCHA => &mut r.scratch[0],
        off::ADDER => &mut r.adder,
        off::MMRS => &mut r.mmrs,
        off::MMWS => &mut r.mmws,
        off::SFS => &mut r.sfs,
        off::DRS => &mut r.drs,
        off::SBMS => &mut r.sbms,
        off::DBMS => &mut r.dbms,
        off::DNAD64 => &mut r.dnad64,
        off::PMJAD1 => &mut r.pmjad1,
        off::PMJAD2 => &mut r.pmjad2,
        off::RBC => &mut r.rbc,
        off::UA => &mut r.ua,
        off::ESA => &mut r.esa,
        off::IA => &mut r.ia,
        off::SBC => &mut r.sbc,
        off::CSBC => &mut r.csbc,
        o if (off::SCRATCHB..off::SCRATCH_END).contains(&o) => {
            &mut r.scratch[1 + ((o - off::SCRATCHB) / 4) as usize]
        }
        _ => return None,
    };
    Some((reg, byte))
}

/// Byte `byte` of `v`.
pub fn get_byte(v: u32, byte: u32) -> u8 {
    (v >> (8 * byte)) as u8
}

/// `v` with byte `byte` replaced by `b`.
pub fn set_byte(v: u32, byte: u32, b: u8) -> u32 {
    let shift = 8 * byte;
    (v & !(0xff << shift)) | ((b as u32) << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dword_registers_cover_their_bytes() {
        let mut r = Regs::default();
        let (v, b) = dword_mut(&mut r, off::DSA + 2).unwrap();
        *v = set_byte(*v, b, 0xab);
        assert_eq!(r.dsa, 0x00ab_0000);
        let (v, b) = dword_mut(&mut r, 0x9f).unwrap();
        *v = set_byte(*v, b, 0x12);
        assert_eq!(r.scratch[SCRATCH - 1], 0x1200_0000);
        let (v, _) = dword_mut(&mut r, off::SCRATCHB).unwrap();
        *v = 5;
        assert_eq!(r.scratch[1], 5);
        assert!(dword_mut(&mut r, off::DSP).is_none());
        assert!(dword_mut(&mut r, off::ISTAT0).is_none());
        assert_eq!(get_byte(0x1234_5678, 3), 0x12);
    }
}
