//! SCSI SCRIPTS instructions (Technical Manual chapter 5, "SCSI SCRIPTS
//! Instruction Set"): the dwords the SCRIPTS processor fetches, decoded into
//! a typed [`Insn`] before anything executes, and the arithmetic of the
//! Read/Write instructions.
//!
//! Instruction classes, by bits 31..30 of the first dword (DCMD/DBC):
//! - 00: "Block Move Instruction": phase, byte count, direct, indirect or
//!   table indirect addressing;
//! - 01: "I/O Instruction" (SELECT, WAIT DISCONNECT, WAIT RESELECT, SET,
//!   CLEAR) when bits 29..27 are below 5, else "Read/Write Instructions"
//!   (register moves through SFBR with an ALU operator);
//! - 10: "Transfer Control Instructions" (JUMP, CALL, RETURN, INT, INTFLY
//!   with carry, phase and data compares, absolute or relative
//!   addresses);
//! - 11: "Memory Move Instructions" (three dwords) when bit 29 is clear,
//!   else "Load and Store Instructions" (DSA-relative with bit 28).
//!
//! The second dword is the address (DSPS). Only memory move has a third
//! dword (the destination); 64-bit direct block moves (CCNTL1 EN64DBMV),
//! which would have one too, are not offered: the 895A's own addressing is
//! 32 bits wide.

/// Where a block move's data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// The address in the second dword.
    Direct(u32),
    /// The second dword points at a dword holding the address.
    Indirect(u32),
    /// A signed 24-bit offset from DSA to an 8-byte table entry: byte
    /// count (bits 23..0), then the address.
    Table(i32),
}

/// Where an I/O instruction finds the SCSI id it selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdSource {
    /// Bits 19..16 of the instruction.
    Immediate(u8),
    /// A table entry at DSA plus this offset: SCNTL3 in bits 31..24, the
    /// id in 19..16, SXFER in 15..8.
    Table(i32),
}

/// A jump or alternate address: absolute, or relative to the next
/// instruction (signed 24 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Absolute(u32),
    Relative(i32),
}

impl Target {
    /// The address, given DSP (which already points past the instruction).
    pub fn resolve(self, dsp: u32) -> u32 {
        match self {
            Target::Absolute(a) => a,
            Target::Relative(d) => dsp.wrapping_add(d as u32),
        }
    }
}

/// The ALU operators of Read/Write instructions (bits 26..24).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluOp {
    Move,
    ShiftLeft,
    Or,
    Xor,
    And,
    ShiftRight,
    Add,
    AddWithCarry,
}

impl AluOp {
    fn from_bits(b: u32) -> AluOp {
        match b & 7 {
            0 => AluOp::Move,
            1 => AluOp::ShiftLeft,
            2 => AluOp::Or,
            3 => AluOp::Xor,
            4 => AluOp::And,
            5 => AluOp::ShiftRight,
            6 => AluOp::Add,
            _ => AluOp::AddWithCarry,
        }
    }

    /// `a op b` with the carry in; returns the result and the carry out
    /// (unchanged by the logical operators).
    pub fn apply(self, a: u8, b: u8, carry: bool) -> (u8, bool) {
        match self {
            AluOp::Move => (b, carry),
            AluOp::ShiftLeft => ((a << 1) | carry as u8, a & 0x80 != 0),
            AluOp::Or => (a | b, carry),
            AluOp::Xor => (a ^ b, carry),
            AluOp::And => (a & b, carry),
            AluOp::ShiftRight => ((a >> 1) | ((carry as u8) << 7), a & 1 != 0),
            AluOp::Add => {
                let (r, c) = a.overflowing_add(b);
                (r, c)
            }
            AluOp::AddWithCarry => {
                let (r1, c1) = a.overflowing_add(b);
                let (r2, c2) = r1.overflowing_add(carry as u8);
                (r2, c1 || c2)
            }
        }
    }
}

/// Which Read/Write instruction (bits 29..27).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegMove {
    /// 101: register = SFBR op data.
    FromSfbr,
    /// 110: SFBR = register op data.
    ToSfbr,
    /// 111: register = register op (data, or SFBR with bit 23).
    ReadModifyWrite,
}

/// What a transfer control instruction does when its condition holds
/// (bits 29..27).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Jump,
    Call,
    Return,
    /// INT, or INTFLY (interrupt on the fly: the SCRIPTS go on).
    Interrupt {
        on_the_fly: bool,
    },
}

/// The condition of a transfer control instruction. With `if_true` the
/// instruction acts when every enabled compare matches; without it, when
/// none does. No compare at all acts only with `if_true` (an
/// unconditional jump; the other form never acts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cond {
    pub if_true: bool,
    pub carry: bool,
    pub phase: Option<u8>,
    /// `(value, mask)`: SFBR & mask == value & mask, mask bits set where
    /// the instruction does not mask the bit out.
    pub data: Option<(u8, u8)>,
}

impl Cond {
    /// Evaluates the condition. `phase` is the bus phase, `None` when the
    /// chip is not connected (a phase compare then never matches).
    pub fn holds(&self, carry: bool, phase: Option<u8>, sfbr: u8) -> bool {
        // The compares are evaluated in the manual's order (carry, phase,
        // data), each only while the result so far is still `if_true`:
        // AND for jump-if-true, "all false" for jump-if-false.
        let mut r = self.if_true;
        if r == self.if_true && self.carry {
            r = carry;
        }
        if r == self.if_true {
            if let Some(p) = self.phase {
                r = phase == Some(p);
            }
        }
        if r == self.if_true {
            if let Some((v, m)) = self.data {
                r = sfbr & m == v & m;
            }
        }
        let any = self.carry || self.phase.is_some() || self.data.is_some();
        (any || self.if_true) && r == self.if_true
    }
}

/// One decoded SCRIPTS instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insn {
    /// Block move in `phase` of `count` bytes (24 bits).
    BlockMove {
        phase: u8,
        count: u32,
        addr: Addressing,
    },
    Select {
        atn: bool,
        id: IdSource,
        /// Where to go if the chip is reselected first (already
        /// connected).
        alt: Target,
    },
    WaitDisconnect,
    WaitReselect {
        /// Where to go when SIGP is set.
        alt: Target,
    },
    /// SET (`set`) or CLEAR of the ATN, ACK and target mode lines and the
    /// carry bit.
    SetClear {
        set: bool,
        atn: bool,
        ack: bool,
        target_mode: bool,
        carry: bool,
    },
    RegisterMove {
        kind: RegMove,
        reg: u8,
        op: AluOp,
        data: u8,
        /// Read-modify-write takes SFBR instead of `data`.
        use_sfbr: bool,
    },
    Transfer {
        flow: Flow,
        cond: Cond,
        to: Target,
    },
    /// A transfer control instruction with no condition that can act:
    /// nothing happens.
    Nop,
    MemoryMove {
        count: u32,
        src: u32,
        dst: u32,
    },
    LoadStore {
        load: bool,
        reg: u8,
        count: u8,
        addr: u32,
        dsa_relative: bool,
    },
    /// An encoding the chip does not define: DSTAT IID.
    Illegal,
}

/// Sign-extends the low 24 bits.
pub fn sext24(v: u32) -> i32 {
    ((v << 8) as i32) >> 8
}

/// Whether the instruction whose first dword is `w0` has a third dword.
pub fn has_third_dword(w0: u32) -> bool {
    w0 >> 29 == 0b110
}

impl Insn {
    /// Decodes the instruction in `w0` (DCMD/DBC), `w1` (DSPS) and, for a
    /// memory move, `w2`.
    pub fn decode(w0: u32, w1: u32, w2: u32) -> Insn {
        let low24 = w0 & 0x00ff_ffff;
        match w0 >> 30 {
            0 => {
                let addr = if w0 & (1 << 29) != 0 {
                    Addressing::Indirect(w1)
                } else if w0 & (1 << 28) != 0 {
                    Addressing::Table(sext24(w1))
                } else {
                    Addressing::Direct(w1)
                };
                // Bit 27 (block move versus chained block move) only
                // matters for wide transfers' odd bytes, which a byte
                // stream without a FIFO does not have.
                Insn::BlockMove {
                    phase: ((w0 >> 24) & 7) as u8,
                    count: low24,
                    addr,
                }
            }
            1 => {
                let opcode = (w0 >> 27) & 7;
                if opcode >= 5 {
                    let kind = match opcode {
                        5 => RegMove::FromSfbr,
                        6 => RegMove::ToSfbr,
                        _ => RegMove::ReadModifyWrite,
                    };
                    // A7 of the register address sits in bit 7.
                    let reg = (((w0 >> 16) & 0x7f) | (w0 & 0x80)) as u8;
                    return Insn::RegisterMove {
                        kind,
                        reg,
                        op: AluOp::from_bits(w0 >> 24),
                        data: (w0 >> 8) as u8,
                        use_sfbr: w0 & (1 << 23) != 0,
                    };
                }
                let alt = if w0 & (1 << 26) != 0 {
                    Target::Relative(sext24(w1))
                } else {
                    Target::Absolute(w1)
                };
                match opcode {
                    0 => Insn::Select {
                        atn: w0 & (1 << 24) != 0,
                        id: if w0 & (1 << 25) != 0 {
                            IdSource::Table(sext24(w0))
                        } else {
                            IdSource::Immediate(((w0 >> 16) & 0xf) as u8)
                        },
                        alt,
                    },
                    1 => Insn::WaitDisconnect,
                    2 => Insn::WaitReselect { alt },
                    _ => Insn::SetClear {
                        set: opcode == 3,
                        atn: w0 & (1 << 3) != 0,
                        ack: w0 & (1 << 6) != 0,
                        target_mode: w0 & (1 << 9) != 0,
                        carry: w0 & (1 << 10) != 0,
                    },
                }
            }
            2 => {
                let flow = match (w0 >> 27) & 7 {
                    0 => Flow::Jump,
                    1 => Flow::Call,
                    2 => Flow::Return,
                    3 => Flow::Interrupt {
                        on_the_fly: w0 & (1 << 20) != 0,
                    },
                    _ => return Insn::Illegal,
                };
                let cond = Cond {
                    if_true: w0 & (1 << 19) != 0,
                    carry: w0 & (1 << 21) != 0,
                    phase: (w0 & (1 << 17) != 0).then_some(((w0 >> 24) & 7) as u8),
                    // Mask bits set in the instruction exclude SFBR bits.
                    data: (w0 & (1 << 18) != 0).then_some((w0 as u8, !(w0 >> 8) as u8)),
                };
                let acts =
                    cond.if_true || cond.carry || cond.phase.is_some() || cond.data.is_some();
                if !acts {
                    return Insn::Nop;
                }
                let to = if w0 & (1 << 23) != 0 {
                    Target::Relative(sext24(w1))
                } else {
                    Target::Absolute(w1)
                };
                Insn::Transfer { flow, cond, to }
            }
            _ => {
                if w0 & (1 << 29) == 0 {
                    Insn::MemoryMove {
                        count: low24,
                        src: w1,
                        dst: w2,
                    }
                } else {
                    Insn::LoadStore {
                        load: w0 & (1 << 24) != 0,
                        reg: (w0 >> 16) as u8,
                        count: (w0 & 7) as u8,
                        addr: w1,
                        dsa_relative: w0 & (1 << 28) != 0,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_seabios_script() {
        // SeaBIOS's lsi-scsi.c: select target 3, msgout, command.
        assert_eq!(
            Insn::decode(0x4000_0000 | 3 << 16, 0, 0),
            Insn::Select {
                atn: false,
                id: IdSource::Immediate(3),
                alt: Target::Absolute(0)
            }
        );
        assert_eq!(
            Insn::decode(0x0600_0001, 0x1234, 0),
            Insn::BlockMove {
                phase: 6,
                count: 1,
                addr: Addressing::Direct(0x1234)
            }
        );
        // "phase == msgin ?": jump relative +0x18 if not MSG IN.
        let Insn::Transfer { flow, cond, to } = Insn::decode(0x8782_0000, 0x18, 0) else {
            panic!()
        };
        assert_eq!(flow, Flow::Jump);
        assert_eq!(to, Target::Relative(0x18));
        assert!(cond.holds(false, Some(1), 0), "data in: not msg in, jump");
        assert!(!cond.holds(false, Some(7), 0));
        assert_eq!(
            Insn::decode(0x5000_0000, 0, 0),
            Insn::WaitReselect {
                alt: Target::Absolute(0)
            }
        );
        // The final INT.
        assert_eq!(
            Insn::decode(0x9808_0000, 0, 0),
            Insn::Transfer {
                flow: Flow::Interrupt { on_the_fly: false },
                cond: Cond {
                    if_true: true,
                    carry: false,
                    phase: None,
                    data: None
                },
                to: Target::Absolute(0)
            }
        );
    }

    #[test]
    fn decodes_linux_forms() {
        // SCR_SEL_TBL_ATN ^ offset: table indirect select with ATN.
        assert_eq!(
            Insn::decode(0x4300_0000 | 0x40, 0x100, 0),
            Insn::Select {
                atn: true,
                id: IdSource::Table(0x40),
                alt: Target::Absolute(0x100)
            }
        );
        // SCR_MOVE_TBL ^ SCR_DATA_IN, offset -8.
        assert_eq!(
            Insn::decode(0x1900_0000, 0x00ff_fff8, 0),
            Insn::BlockMove {
                phase: 1,
                count: 0,
                addr: Addressing::Table(-8)
            }
        );
        // SCR_LOAD_REL(scratcha, 4).
        assert_eq!(
            Insn::decode(0xf134_0004, 0x10, 0),
            Insn::LoadStore {
                load: true,
                reg: 0x34,
                count: 4,
                addr: 0x10,
                dsa_relative: true
            }
        );
        // SCR_COPY(4): memory move.
        assert!(has_third_dword(0xc000_0004));
        assert_eq!(
            Insn::decode(0xc000_0004, 1, 2),
            Insn::MemoryMove {
                count: 4,
                src: 1,
                dst: 2
            }
        );
        // MOVE SFBR TO SCRATCHA0 (OR with 0), MOVE 0x12 TO SCRATCHA0.
        assert_eq!(
            Insn::decode(0x6a34_0000, 0, 0),
            Insn::RegisterMove {
                kind: RegMove::FromSfbr,
                reg: 0x34,
                op: AluOp::Or,
                data: 0,
                use_sfbr: false
            }
        );
        assert!(matches!(
            Insn::decode(0x7834_1200, 0, 0),
            Insn::RegisterMove {
                kind: RegMove::ReadModifyWrite,
                op: AluOp::Move,
                data: 0x12,
                ..
            }
        ));
        // CLEAR ACK, SET ATN.
        assert_eq!(
            Insn::decode(0x6000_0040, 0, 0),
            Insn::SetClear {
                set: false,
                atn: false,
                ack: true,
                target_mode: false,
                carry: false
            }
        );
        assert!(matches!(
            Insn::decode(0x5800_0008, 0, 0),
            Insn::SetClear {
                set: true,
                atn: true,
                ..
            }
        ));
        // Jump-if-false with no compare: never acts.
        assert_eq!(Insn::decode(0x8000_0000, 0, 0), Insn::Nop);
        // Transfer control opcodes 4..7 are illegal.
        assert_eq!(Insn::decode(0xa008_0000, 0, 0), Insn::Illegal);
    }

    #[test]
    fn conditions_and_alu() {
        // JUMP if data == 0x22 and mask 0x0f (compare the low nibble).
        let c = Cond {
            if_true: true,
            carry: false,
            phase: None,
            data: Some((0x22, 0x0f)),
        };
        assert!(c.holds(false, None, 0x72));
        assert!(!c.holds(false, None, 0x23));
        // Jump if not (carry): acts when carry is clear.
        let c = Cond {
            if_true: false,
            carry: true,
            phase: None,
            data: None,
        };
        assert!(c.holds(false, None, 0));
        assert!(!c.holds(true, None, 0));
        // Phase compare against a free bus never matches.
        let c = Cond {
            if_true: true,
            carry: false,
            phase: Some(0),
            data: None,
        };
        assert!(!c.holds(false, None, 0));
        assert_eq!(AluOp::Add.apply(0xff, 2, false), (1, true));
        assert_eq!(AluOp::AddWithCarry.apply(0xff, 0, true), (0, true));
        assert_eq!(AluOp::AddWithCarry.apply(1, 1, true), (3, false));
        assert_eq!(AluOp::ShiftLeft.apply(0x81, 0, true), (0x03, true));
        assert_eq!(AluOp::ShiftRight.apply(0x01, 0, true), (0x80, true));
        assert_eq!(AluOp::Move.apply(9, 7, false), (7, false));
        assert_eq!(sext24(0x00ff_fffc), -4);
        assert_eq!(Target::Relative(-8).resolve(0x100), 0xf8);
    }
}
