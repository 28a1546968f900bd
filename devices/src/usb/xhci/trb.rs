//! Transfer Request Blocks (xHCI 1.2, 6.4): the 16-byte records of every
//! ring, parsed into typed values before anything acts on them.
//!
//! - Transfer TRBs (6.4.1): Normal, Setup Stage, Data Stage, Status Stage,
//!   Isoch, Link (6.4.4.1), Event Data (6.4.4.2), No Op.
//! - Command TRBs (6.4.3): the ones this controller carries out, and the
//!   rest kept as [`Command::Unsupported`].
//! - Event TRBs (6.4.2) are only built: Transfer, Command Completion, Port
//!   Status Change, Host Controller.
//! - Completion codes (6.4.5).

/// Size of every TRB.
pub const TRB_SIZE: u64 = 16;

/// TRB types (6.4.6, table 6-91).
pub mod ty {
    pub const NORMAL: u8 = 1;
    pub const SETUP: u8 = 2;
    pub const DATA: u8 = 3;
    pub const STATUS: u8 = 4;
    pub const ISOCH: u8 = 5;
    pub const LINK: u8 = 6;
    pub const EVENT_DATA: u8 = 7;
    pub const NOOP: u8 = 8;
    pub const ENABLE_SLOT: u8 = 9;
    pub const DISABLE_SLOT: u8 = 10;
    pub const ADDRESS_DEVICE: u8 = 11;
    pub const CONFIGURE_EP: u8 = 12;
    pub const EVALUATE_CONTEXT: u8 = 13;
    pub const RESET_EP: u8 = 14;
    pub const STOP_EP: u8 = 15;
    pub const SET_TR_DEQUEUE: u8 = 16;
    pub const RESET_DEVICE: u8 = 17;
    pub const NOOP_CMD: u8 = 23;
    pub const TRANSFER_EVENT: u8 = 32;
    pub const COMMAND_COMPLETION: u8 = 33;
    pub const PORT_STATUS_CHANGE: u8 = 34;
    pub const HOST_CONTROLLER: u8 = 37;
}

/// Control-word bits shared by several TRB types (6.4.1).
pub mod ctl {
    pub const CYCLE: u32 = 1 << 0;
    /// Link TRB: Toggle Cycle.
    pub const TC: u32 = 1 << 1;
    pub const ISP: u32 = 1 << 2;
    pub const CH: u32 = 1 << 4;
    pub const IOC: u32 = 1 << 5;
    pub const IDT: u32 = 1 << 6;
    pub const BEI: u32 = 1 << 9;
    /// Data and Status Stage: direction IN.
    pub const DIR_IN: u32 = 1 << 16;
    /// Transfer Event: the pointer is an Event Data TRB's parameter.
    pub const ED: u32 = 1 << 2;
    /// Address Device: Block Set Address Request; Configure Endpoint:
    /// Deconfigure; Reset Endpoint: Transfer State Preserve.
    pub const BIT9: u32 = 1 << 9;
}

/// Completion codes (6.4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Cc {
    Success = 1,
    DataBuffer = 2,
    Babble = 3,
    UsbTransaction = 4,
    Trb = 5,
    Stall = 6,
    Resource = 7,
    NoSlots = 9,
    InvalidStreamType = 10,
    SlotNotEnabled = 11,
    EpNotEnabled = 12,
    ShortPacket = 13,
    Parameter = 17,
    ContextState = 19,
    EventRingFull = 21,
    CommandRingStopped = 24,
    CommandAborted = 25,
    Stopped = 26,
    StoppedLengthInvalid = 27,
    InvalidStreamId = 34,
}

/// A TRB as it sits in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trb {
    pub param: u64,
    pub status: u32,
    pub control: u32,
}

impl Trb {
    pub fn from_bytes(b: &[u8; 16]) -> Trb {
        let mut p = [0u8; 8];
        p.copy_from_slice(&b[0..8]);
        Trb {
            param: u64::from_le_bytes(p),
            status: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            control: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.param.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.control.to_le_bytes());
        b
    }

    pub fn ty(&self) -> u8 {
        ((self.control >> 10) & 0x3f) as u8
    }

    pub fn cycle(&self) -> bool {
        self.control & ctl::CYCLE != 0
    }

    fn flag(&self, bit: u32) -> bool {
        self.control & bit != 0
    }

    /// Bits 31:24 of the control word: the slot of commands.
    fn slot(&self) -> u8 {
        (self.control >> 24) as u8
    }

    /// Bits 20:16: the endpoint (DCI) of endpoint commands.
    fn ep(&self) -> u8 {
        ((self.control >> 16) & 0x1f) as u8
    }
}

/// Flags every transfer TRB carries that decide its events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XferFlags {
    pub chain: bool,
    pub ioc: bool,
    pub isp: bool,
    /// Block Event Interrupt: the event is posted without an interrupt.
    pub bei: bool,
    /// The interrupter the TRB's events go to (bits 31:22 of status).
    pub intr: u16,
}

impl XferFlags {
    fn of(t: &Trb) -> XferFlags {
        XferFlags {
            chain: t.flag(ctl::CH),
            ioc: t.flag(ctl::IOC),
            isp: t.flag(ctl::ISP),
            bei: t.flag(ctl::BEI),
            intr: (t.status >> 22) as u16,
        }
    }
}

/// Where a data TRB's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buffer {
    /// In guest memory at this address.
    Pointer(u64),
    /// Immediate data (IDT): in the TRB's own parameter field, at most 8
    /// bytes.
    Immediate,
}

/// A TRB on a transfer ring (6.4.1, 6.4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferTrb {
    /// Normal (6.4.1.1), or a Data Stage (6.4.1.2.2) with its direction.
    Data {
        stage: Option<bool>,
        buf: Buffer,
        len: u32,
        flags: XferFlags,
    },
    /// Setup Stage (6.4.1.2.1): the setup packet is immediate.
    Setup {
        packet: [u8; 8],
        /// Transfer Type: 0 no data, 2 OUT, 3 IN.
        trt: u8,
        flags: XferFlags,
    },
    /// Status Stage (6.4.1.2.3).
    Status { dir_in: bool, flags: XferFlags },
    /// Link (6.4.4.1): the ring goes on at `target`.
    Link {
        target: u64,
        toggle: bool,
        flags: XferFlags,
    },
    /// Event Data (6.4.4.2): `data` goes into the event in place of a
    /// TRB pointer.
    EventData { data: u64, flags: XferFlags },
    /// No Op (6.4.1.4).
    NoOp { flags: XferFlags },
    /// Isoch (6.4.1.3): not supported here.
    Isoch { flags: XferFlags },
    /// A type that has no place on a transfer ring.
    Invalid { ty: u8 },
}

/// Why a TRB was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrbError {
    /// A Setup Stage without IDT or with a length other than 8.
    BadSetup,
    /// Immediate data longer than 8 bytes.
    BadImmediate,
}

impl TransferTrb {
    pub fn parse(t: &Trb) -> Result<TransferTrb, TrbError> {
        let flags = XferFlags::of(t);
        let len = t.status & 0x1_ffff;
        let buf = |t: &Trb| -> Result<Buffer, TrbError> {
            if t.flag(ctl::IDT) {
                if len > 8 {
                    return Err(TrbError::BadImmediate);
                }
                Ok(Buffer::Immediate)
            } else {
                Ok(Buffer::Pointer(t.param))
            }
        };
        Ok(match t.ty() {
            ty::NORMAL => TransferTrb::Data {
                stage: None,
                buf: buf(t)?,
                len,
                flags,
            },
            ty::DATA => TransferTrb::Data {
                stage: Some(t.flag(ctl::DIR_IN)),
                buf: buf(t)?,
                len,
                flags,
            },
            ty::SETUP => {
                if !t.flag(ctl::IDT) || len != 8 {
                    return Err(TrbError::BadSetup);
                }
                TransferTrb::Setup {
                    packet: t.param.to_le_bytes(),
                    trt: ((t.control >> 16) & 3) as u8,
                    flags,
                }
            }
            ty::STATUS => TransferTrb::Status {
                dir_in: t.flag(ctl::DIR_IN),
                flags,
            },
            ty::LINK => TransferTrb::Link {
                target: t.param & !0xf,
                toggle: t.flag(ctl::TC),
                flags,
            },
            ty::EVENT_DATA => TransferTrb::EventData {
                data: t.param,
                flags,
            },
            ty::NOOP => TransferTrb::NoOp { flags },
            ty::ISOCH => TransferTrb::Isoch { flags },
            other => TransferTrb::Invalid { ty: other },
        })
    }

    pub fn flags(&self) -> XferFlags {
        match *self {
            TransferTrb::Data { flags, .. }
            | TransferTrb::Setup { flags, .. }
            | TransferTrb::Status { flags, .. }
            | TransferTrb::Link { flags, .. }
            | TransferTrb::EventData { flags, .. }
            | TransferTrb::NoOp { flags }
            | TransferTrb::Isoch { flags } => flags,
            TransferTrb::Invalid { .. } => XferFlags::default(),
        }
    }
}

/// A TRB on the command ring (6.4.3), typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    EnableSlot {
        slot_type: u8,
    },
    DisableSlot {
        slot: u8,
    },
    AddressDevice {
        slot: u8,
        input: u64,
        bsr: bool,
    },
    ConfigureEndpoint {
        slot: u8,
        input: u64,
        deconfigure: bool,
    },
    EvaluateContext {
        slot: u8,
        input: u64,
    },
    ResetEndpoint {
        slot: u8,
        ep: u8,
        preserve: bool,
    },
    StopEndpoint {
        slot: u8,
        ep: u8,
        suspend: bool,
    },
    SetTrDequeue {
        slot: u8,
        ep: u8,
        stream: u16,
        dequeue: u64,
        dcs: bool,
        sct: u8,
    },
    ResetDevice {
        slot: u8,
    },
    NoOp,
    /// A Link TRB on the command ring.
    Link {
        target: u64,
        toggle: bool,
    },
    /// A command this controller does not carry out (Force Event,
    /// Negotiate Bandwidth, Set LT, Get Port Bandwidth, Force Header, the
    /// extended property commands) or a type that is no command.
    Unsupported {
        ty: u8,
    },
}

impl Command {
    pub fn parse(t: &Trb) -> Command {
        // Context pointers are 16-byte aligned (6.4.3.4); the low bits
        // are reserved and ignored.
        let input = t.param & !0xf;
        match t.ty() {
            ty::ENABLE_SLOT => Command::EnableSlot {
                slot_type: ((t.control >> 16) & 0x1f) as u8,
            },
            ty::DISABLE_SLOT => Command::DisableSlot { slot: t.slot() },
            ty::ADDRESS_DEVICE => Command::AddressDevice {
                slot: t.slot(),
                input,
                bsr: t.flag(ctl::BIT9),
            },
            ty::CONFIGURE_EP => Command::ConfigureEndpoint {
                slot: t.slot(),
                input,
                deconfigure: t.flag(ctl::BIT9),
            },
            ty::EVALUATE_CONTEXT => Command::EvaluateContext {
                slot: t.slot(),
                input,
            },
            ty::RESET_EP => Command::ResetEndpoint {
                slot: t.slot(),
                ep: t.ep(),
                preserve: t.flag(ctl::BIT9),
            },
            ty::STOP_EP => Command::StopEndpoint {
                slot: t.slot(),
                ep: t.ep(),
                suspend: t.flag(1 << 23),
            },
            ty::SET_TR_DEQUEUE => Command::SetTrDequeue {
                slot: t.slot(),
                ep: t.ep(),
                stream: (t.status >> 16) as u16,
                dequeue: t.param & !0xf,
                dcs: t.param & 1 != 0,
                sct: ((t.param >> 1) & 7) as u8,
            },
            ty::RESET_DEVICE => Command::ResetDevice { slot: t.slot() },
            ty::NOOP_CMD => Command::NoOp,
            ty::LINK => Command::Link {
                target: t.param & !0xf,
                toggle: t.flag(ctl::TC),
            },
            other => Command::Unsupported { ty: other },
        }
    }
}

/// Event TRBs (6.4.2), built by the controller; the cycle bit is the
/// event ring's to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// 6.4.2.1: `ptr` is the TRB's address, or the Event Data TRB's
    /// parameter when `event_data`; `len` the residual (or EDTLA).
    Transfer {
        ptr: u64,
        cc: Cc,
        len: u32,
        event_data: bool,
        slot: u8,
        ep: u8,
    },
    /// 6.4.2.2.
    CommandCompletion { ptr: u64, cc: Cc, slot: u8 },
    /// 6.4.2.3: `port` counts from 1.
    PortStatusChange { port: u8 },
    /// 6.4.2.6.
    HostController { cc: Cc },
}

impl Event {
    pub fn to_trb(&self) -> Trb {
        let typed = |t: u8| (t as u32) << 10;
        match *self {
            Event::Transfer {
                ptr,
                cc,
                len,
                event_data,
                slot,
                ep,
            } => Trb {
                param: ptr,
                status: (cc as u32) << 24 | (len & 0xff_ffff),
                control: (slot as u32) << 24
                    | (ep as u32 & 0x1f) << 16
                    | typed(ty::TRANSFER_EVENT)
                    | if event_data { ctl::ED } else { 0 },
            },
            Event::CommandCompletion { ptr, cc, slot } => Trb {
                param: ptr,
                status: (cc as u32) << 24,
                control: (slot as u32) << 24 | typed(ty::COMMAND_COMPLETION),
            },
            Event::PortStatusChange { port } => Trb {
                param: (port as u64) << 24,
                status: (Cc::Success as u32) << 24,
                control: typed(ty::PORT_STATUS_CHANGE),
            },
            Event::HostController { cc } => Trb {
                param: 0,
                status: (cc as u32) << 24,
                control: typed(ty::HOST_CONTROLLER),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trb(param: u64, status: u32, ty: u8, bits: u32) -> Trb {
        Trb {
            param,
            status,
            control: (ty as u32) << 10 | bits,
        }
    }

    #[test]
    fn transfer_trbs_parse() {
        let t = trb(
            0x1234_5000,
            0x40 << 22 | 512,
            ty::NORMAL,
            ctl::CH | ctl::ISP | 1,
        );
        let p = TransferTrb::parse(&t).unwrap();
        assert_eq!(
            p,
            TransferTrb::Data {
                stage: None,
                buf: Buffer::Pointer(0x1234_5000),
                len: 512,
                flags: XferFlags {
                    chain: true,
                    ioc: false,
                    isp: true,
                    bei: false,
                    intr: 0x40
                }
            }
        );
        let setup = trb(
            u64::from_le_bytes([0x80, 6, 0, 1, 0, 0, 18, 0]),
            8,
            ty::SETUP,
            ctl::IDT | 3 << 16,
        );
        match TransferTrb::parse(&setup).unwrap() {
            TransferTrb::Setup { packet, trt, .. } => {
                assert_eq!(packet, [0x80, 6, 0, 1, 0, 0, 18, 0]);
                assert_eq!(trt, 3);
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(
            TransferTrb::parse(&trb(0, 8, ty::SETUP, 0)),
            Err(TrbError::BadSetup),
            "no IDT"
        );
        assert_eq!(
            TransferTrb::parse(&trb(0, 9, ty::NORMAL, ctl::IDT)),
            Err(TrbError::BadImmediate)
        );
        assert_eq!(
            TransferTrb::parse(&trb(0x1003, 0, ty::LINK, ctl::TC)).unwrap(),
            TransferTrb::Link {
                target: 0x1000,
                toggle: true,
                flags: XferFlags::default()
            }
        );
        assert_eq!(
            TransferTrb::parse(&trb(0, 0, 40, 0)).unwrap(),
            TransferTrb::Invalid { ty: 40 }
        );
    }

    #[test]
    fn commands_parse() {
        let c = trb(0x5000f, 0, ty::ADDRESS_DEVICE, ctl::BIT9 | 3 << 24);
        assert_eq!(
            Command::parse(&c),
            Command::AddressDevice {
                slot: 3,
                input: 0x50000,
                bsr: true
            }
        );
        let c = trb(
            0x8001 | 2 << 1,
            5 << 16,
            ty::SET_TR_DEQUEUE,
            2 << 24 | 3 << 16,
        );
        assert_eq!(
            Command::parse(&c),
            Command::SetTrDequeue {
                slot: 2,
                ep: 3,
                stream: 5,
                dequeue: 0x8000,
                dcs: true,
                sct: 2
            }
        );
        assert_eq!(
            Command::parse(&trb(0, 0, 19, 0)),
            Command::Unsupported { ty: 19 }
        );
    }

    #[test]
    fn events_encode() {
        let e = Event::Transfer {
            ptr: 0x4000,
            cc: Cc::ShortPacket,
            len: 100,
            event_data: false,
            slot: 1,
            ep: 3,
        }
        .to_trb();
        assert_eq!(e.param, 0x4000);
        assert_eq!(e.status, 13 << 24 | 100);
        assert_eq!(e.control, 1 << 24 | 3 << 16 | 32 << 10);
        assert_eq!(Event::PortStatusChange { port: 5 }.to_trb().param, 5 << 24);
        let b = e.to_bytes();
        assert_eq!(Trb::from_bytes(&b), e);
    }
}
