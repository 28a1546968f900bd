//! `usb-ccid`: a USB smart-card reader (CCID) with one slot, QEMU's
//! `dev-smartcard-reader` (08e6:4433, "QEMU USB CCID").
//!
//! Specs followed: Universal Serial Bus Device Class: Smart Card CCID,
//! revision 1.1: 4.1 (the interface, class 0Bh), 5.1 (the Smart Card
//! Device Class descriptor, table 5.1-1), 5.2 (the bulk OUT, bulk IN and
//! interrupt IN endpoints), 5.3 (the class requests ABORT, 5.3.1;
//! GET_CLOCK_FREQUENCIES, 5.3.2; GET_DATA_RATES, 5.3.3), 6.1 (the
//! PC_to_RDR command messages, 6.1.1-6.1.14), 6.2 (the RDR_to_PC response
//! messages, 6.2.1-6.2.5, and 6.2.6: bStatus and the slot error register
//! bError), 6.3.1 (RDR_to_PC_NotifySlotChange); USB 2.0 9.6 for the
//! standard descriptors ([`super::desc`]).
//!
//! Strata has no smart-card emulation (no `ccid-card-emulated` or
//! `ccid-card-passthru`): the slot is always empty. The reader
//! enumerates, tells the host once after it is configured that slot 0
//! holds no card, and answers every command as a reader with an empty
//! slot does: the slot status says "no ICC present"; whatever needs a
//! card fails with ICC_MUTE (6.2.6) in the response message the command
//! calls for. Guests and QEMU's own tests (usb-hcd-xhci-test hot-plugs
//! one) see a real reader they can talk to.
//!
//! Bulk OUT messages are taken apart ([`Header`], [`Command`]) before
//! anything acts on them. Only the 10-byte header and the first bytes of
//! the payload are kept: the rest of a payload (an APDU for a card that
//! is not there) is counted and dropped, so no guest-given length ever
//! sizes a buffer. A message longer than dwMaxCCIDMessageLength is
//! answered at once with "bad dwLength" and its bytes discarded.

use std::collections::VecDeque;

use super::core::{Event, Handled, UsbDeviceCore};
use super::desc::{
    self, ConfigDescriptor, Descriptors, DeviceDescriptor, EndpointDescriptor, InterfaceDescriptor,
    SpeedDescriptors,
};
use super::{Dir, Endpoint, PacketData, SetupPacket, Speed, UsbDevice, UsbResult, Wakeup};

pub const VENDOR_ID: u16 = 0x08e6;
pub const PRODUCT_ID: u16 = 0x4433;

/// The interrupt IN endpoint: slot change notifications (6.3).
pub const EP_INTR: Endpoint = Endpoint::new(1, Dir::In);
/// The bulk IN endpoint: responses (6.2).
pub const EP_BULK_IN: Endpoint = Endpoint::new(2, Dir::In);
/// The bulk OUT endpoint: commands (6.1).
pub const EP_BULK_OUT: Endpoint = Endpoint::new(3, Dir::Out);

/// wMaxPacketSize of every endpoint (and bMaxPacketSize0).
const MAX_PACKET: usize = 64;

const STR_MANUFACTURER: u8 = 1;
const STR_PRODUCT: u8 = 2;
const STR_SERIAL: u8 = 3;
const STR_INTERFACE: u8 = 4;

/// The Smart Card Device Class interface (4.1).
const CLASS_SMART_CARD: u8 = 0x0b;
/// The class descriptor's bDescriptorType (5.1).
const DESC_CCID: u8 = 0x21;
/// Its bLength: the descriptor is 54 bytes.
pub const CCID_DESC_LEN: usize = 0x36;

/// The header every message starts with (6.1, 6.2).
pub const HEADER_LEN: usize = 10;
/// dwMaxCCIDMessageLength: header included. QEMU's reader advertises
/// what its response buffer holds (384); this reader keeps no payload
/// at all, so the number only bounds what a guest may send: enough for
/// a short APDU (261 + 10) with room to spare.
pub const MAX_MESSAGE_LEN: u32 = 384;
/// The largest dwLength accepted.
const MAX_PAYLOAD: u32 = MAX_MESSAGE_LEN - HEADER_LEN as u32;

/// Clock and data rates in the class descriptor (5.1), QEMU's: 4 MHz
/// default, 9600 bps default up to 115200 bps.
const DEFAULT_CLOCK_KHZ: u32 = 4000;
const MAXIMUM_CLOCK_KHZ: u32 = 0x0001_0000;
const DEFAULT_DATA_RATE: u32 = 9600;
const MAX_DATA_RATE: u32 = 115_200;
/// dwMaxIFSD: the largest T=1 information field (5.1).
const MAX_IFSD: u32 = 0xfe;
/// dwFeatures (5.1): automatic parameters from the ATR (02h),
/// activation on insertion (04h), voltage selection (08h), clock
/// frequency change (10h), baud rate change (20h), parameter
/// negotiation (40h), PPS (80h), IFSD exchange (400h); TPDU-level
/// exchanges (10000h). QEMU's reader's set.
const FEATURES: u32 = 0x0001_04fe;
/// bVoltageSupport: 5 V, 3 V and 1.8 V.
const VOLTAGES: u8 = 0x07;
/// dwProtocols: T=0 and T=1.
const PROTOCOLS: u32 = 0x0003;

/// Class requests (5.3).
const REQ_ABORT: u8 = 0x01;
const REQ_GET_CLOCK_FREQUENCIES: u8 = 0x02;
const REQ_GET_DATA_RATES: u8 = 0x03;

/// PC_to_RDR message types (6.1).
pub mod pc_to_rdr {
    pub const SET_PARAMETERS: u8 = 0x61;
    pub const ICC_POWER_ON: u8 = 0x62;
    pub const ICC_POWER_OFF: u8 = 0x63;
    pub const GET_SLOT_STATUS: u8 = 0x65;
    pub const SECURE: u8 = 0x69;
    pub const T0_APDU: u8 = 0x6a;
    pub const ESCAPE: u8 = 0x6b;
    pub const GET_PARAMETERS: u8 = 0x6c;
    pub const RESET_PARAMETERS: u8 = 0x6d;
    pub const ICC_CLOCK: u8 = 0x6e;
    pub const XFR_BLOCK: u8 = 0x6f;
    pub const MECHANICAL: u8 = 0x71;
    pub const ABORT: u8 = 0x72;
    pub const SET_DATA_RATE_AND_CLOCK_FREQUENCY: u8 = 0x73;
}

/// RDR_to_PC message types (6.2, 6.3).
pub mod rdr_to_pc {
    pub const DATA_BLOCK: u8 = 0x80;
    pub const SLOT_STATUS: u8 = 0x81;
    pub const PARAMETERS: u8 = 0x82;
    pub const ESCAPE: u8 = 0x83;
    pub const DATA_RATE_AND_CLOCK_FREQUENCY: u8 = 0x84;
    pub const NOTIFY_SLOT_CHANGE: u8 = 0x50;
}

/// bError values (6.2.6): a failed command's cause. Values from 01h to
/// 7Fh are the offset of the header field found wrong.
pub mod error {
    pub const CMD_NOT_SUPPORTED: u8 = 0x00;
    pub const BAD_DWLENGTH: u8 = 0x01;
    pub const BAD_SLOT: u8 = 0x05;
    /// bProtocolNum of SetParameters (offset 7).
    pub const BAD_PROTOCOL: u8 = 0x07;
    pub const ICC_MUTE: u8 = 0xfe;
}

/// bmICCStatus (6.2.6, bStatus bits 1..0): no ICC present.
pub const ICC_NOT_PRESENT: u8 = 2;
/// bmCommandStatus (6.2.6, bStatus bits 7..6): failed.
const COMMAND_FAILED: u8 = 1;

/// bmSlotICCState of slot 0 (6.3.1): bit 0 an ICC is present, bit 1 the
/// state changed. Attached without a card: nothing there, and that is
/// news to the host.
const SLOT0_EMPTY_CHANGED: u8 = 0b10;

/// Responses queued on the bulk IN endpoint before commands are NAKed
/// (QEMU's reader keeps as many): a host that never reads cannot grow
/// the queue.
const MAX_PENDING: usize = 8;

/// The longest response: a header and DataRateAndClockFrequency's two
/// dwords.
const MAX_REPLY: usize = HEADER_LEN + 8;

/// Payload bytes kept for parsing: SetDataRateAndClockFrequency's two
/// dwords are the most any command's fields take.
const PAYLOAD_KEEP: usize = 8;

/// The class descriptor (5.1, table 5.1-1), 54 bytes.
pub fn ccid_descriptor() -> Vec<u8> {
    let mut v = Vec::with_capacity(CCID_DESC_LEN);
    v.extend_from_slice(&[CCID_DESC_LEN as u8, DESC_CCID]);
    v.extend_from_slice(&0x0110u16.to_le_bytes()); // bcdCCID 1.10
    v.push(0); // bMaxSlotIndex: one slot
    v.push(VOLTAGES);
    v.extend_from_slice(&PROTOCOLS.to_le_bytes());
    v.extend_from_slice(&DEFAULT_CLOCK_KHZ.to_le_bytes());
    v.extend_from_slice(&MAXIMUM_CLOCK_KHZ.to_le_bytes());
    v.push(0); // bNumClockSupported: the default and maximum only
    v.extend_from_slice(&DEFAULT_DATA_RATE.to_le_bytes());
    v.extend_from_slice(&MAX_DATA_RATE.to_le_bytes());
    v.push(0); // bNumDataRatesSupported: any between the two
    v.extend_from_slice(&MAX_IFSD.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes()); // dwSynchProtocols: none
    v.extend_from_slice(&0u32.to_le_bytes()); // dwMechanical: none
    v.extend_from_slice(&FEATURES.to_le_bytes());
    v.extend_from_slice(&MAX_MESSAGE_LEN.to_le_bytes());
    // bClassGetResponse, bClassEnvelope: echo the APDU's class.
    v.extend_from_slice(&[0xff, 0xff]);
    v.extend_from_slice(&0u16.to_le_bytes()); // wLcdLayout: no LCD
                                              // bPINSupport: none (Secure is not supported, so none is claimed).
    v.push(0);
    v.push(1); // bMaxCCIDBusySlots
    debug_assert_eq!(v.len(), CCID_DESC_LEN);
    v
}

/// Full speed only, as QEMU's reader.
pub fn descriptors() -> Descriptors {
    let full = SpeedDescriptors {
        device: DeviceDescriptor {
            bcd_usb: 0x0110,
            max_packet0: MAX_PACKET as u8,
            vendor: VENDOR_ID,
            product: PRODUCT_ID,
            bcd_device: 0,
            i_manufacturer: STR_MANUFACTURER,
            i_product: STR_PRODUCT,
            i_serial: STR_SERIAL,
            num_configurations: 1,
            ..Default::default()
        },
        configs: vec![ConfigDescriptor {
            value: 1,
            i_configuration: 0,
            attributes: desc::CONFIG_SELF_POWERED | desc::CONFIG_REMOTE_WAKEUP,
            max_power: 50,
            interfaces: vec![InterfaceDescriptor {
                number: 0,
                alt: 0,
                class: CLASS_SMART_CARD,
                subclass: 0,
                protocol: 0,
                i_interface: STR_INTERFACE,
                endpoints: vec![
                    // Polled rarely: it only ever carries one message.
                    EndpointDescriptor {
                        address: EP_INTR.address(),
                        attributes: desc::xfer::INTERRUPT,
                        max_packet: MAX_PACKET as u16,
                        interval: 255,
                        companion: None,
                    },
                    EndpointDescriptor::bulk(EP_BULK_IN.address(), MAX_PACKET as u16),
                    EndpointDescriptor::bulk(EP_BULK_OUT.address(), MAX_PACKET as u16),
                ],
                extra: ccid_descriptor(),
            }],
        }],
    };
    let mut d = Descriptors {
        full: Some(full),
        ..Default::default()
    };
    d.set_string(STR_MANUFACTURER, "QEMU");
    d.set_string(STR_PRODUCT, "QEMU USB CCID");
    d.set_string(STR_SERIAL, "1");
    d.set_string(STR_INTERFACE, "CCID Interface");
    d
}

/// The 10-byte header of a PC_to_RDR message (6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub message_type: u8,
    /// dwLength: the payload after the header.
    pub length: u32,
    pub slot: u8,
    pub seq: u8,
    /// The three message-specific bytes.
    pub specific: [u8; 3],
}

impl Header {
    /// The header at the start of `b`; `None` if `b` is shorter.
    pub fn parse(b: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Header {
            message_type: b[0],
            length: u32::from_le_bytes([b[1], b[2], b[3], b[4]]),
            slot: b[5],
            seq: b[6],
            specific: [b[7], b[8], b[9]],
        })
    }
}

/// A PC_to_RDR command (6.1.1-6.1.14) with the fields it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// 6.1.1: bPowerSelect (0 automatic, 1 5 V, 2 3 V, 3 1.8 V).
    IccPowerOn { power_select: u8 },
    /// 6.1.2.
    IccPowerOff,
    /// 6.1.3.
    GetSlotStatus,
    /// 6.1.4: block waiting time extension, wLevelParameter.
    XfrBlock { bwi: u8, level: u16 },
    /// 6.1.5.
    GetParameters,
    /// 6.1.6.
    ResetParameters,
    /// 6.1.7: bProtocolNum (0 T=0, 1 T=1).
    SetParameters { protocol: u8 },
    /// 6.1.8: a vendor-specific request.
    Escape,
    /// 6.1.9: bClockCommand (0 restart, 1 stop).
    IccClock { command: u8 },
    /// 6.1.10: bmChanges, bClassGetResponse, bClassEnvelope.
    T0Apdu {
        changes: u8,
        class_get_response: u8,
        class_envelope: u8,
    },
    /// 6.1.11: PIN verification or modification.
    Secure { bwi: u8, level: u16 },
    /// 6.1.12: bFunction (lock, eject, ...).
    Mechanical { function: u8 },
    /// 6.1.13.
    Abort,
    /// 6.1.14: the clock (kHz) and data rate (bps) asked for; zero
    /// where the payload is too short to hold them (a bad dwLength,
    /// answered as such).
    SetDataRateAndClockFrequency { clock_khz: u32, data_rate: u32 },
    /// A message type 6.1 does not define.
    Unknown(u8),
}

/// A parsed PC_to_RDR message: the header and the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub command: Command,
}

impl Message {
    /// Parses the header and, from `payload` (the first payload bytes, as
    /// many as kept), the fields of the command.
    pub fn parse(header: Header, payload: &[u8]) -> Message {
        let s = header.specific;
        let level = u16::from_le_bytes([s[1], s[2]]);
        let dword = |i: usize| -> u32 {
            payload
                .get(i..i + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        let command = match header.message_type {
            pc_to_rdr::ICC_POWER_ON => Command::IccPowerOn { power_select: s[0] },
            pc_to_rdr::ICC_POWER_OFF => Command::IccPowerOff,
            pc_to_rdr::GET_SLOT_STATUS => Command::GetSlotStatus,
            pc_to_rdr::XFR_BLOCK => Command::XfrBlock { bwi: s[0], level },
            pc_to_rdr::GET_PARAMETERS => Command::GetParameters,
            pc_to_rdr::RESET_PARAMETERS => Command::ResetParameters,
            pc_to_rdr::SET_PARAMETERS => Command::SetParameters { protocol: s[0] },
            pc_to_rdr::ESCAPE => Command::Escape,
            pc_to_rdr::ICC_CLOCK => Command::IccClock { command: s[0] },
            pc_to_rdr::T0_APDU => Command::T0Apdu {
                changes: s[0],
                class_get_response: s[1],
                class_envelope: s[2],
            },
            pc_to_rdr::SECURE => Command::Secure { bwi: s[0], level },
            pc_to_rdr::MECHANICAL => Command::Mechanical { function: s[0] },
            pc_to_rdr::ABORT => Command::Abort,
            pc_to_rdr::SET_DATA_RATE_AND_CLOCK_FREQUENCY => Command::SetDataRateAndClockFrequency {
                clock_khz: dword(0),
                data_rate: dword(4),
            },
            t => Command::Unknown(t),
        };
        Message { header, command }
    }

    /// The RDR_to_PC message type that answers this command (6.2: each
    /// command names its response).
    pub fn reply_type(&self) -> u8 {
        match self.command {
            Command::IccPowerOn { .. } | Command::XfrBlock { .. } | Command::Secure { .. } => {
                rdr_to_pc::DATA_BLOCK
            }
            Command::GetParameters | Command::ResetParameters | Command::SetParameters { .. } => {
                rdr_to_pc::PARAMETERS
            }
            Command::Escape => rdr_to_pc::ESCAPE,
            Command::SetDataRateAndClockFrequency { .. } => {
                rdr_to_pc::DATA_RATE_AND_CLOCK_FREQUENCY
            }
            Command::IccPowerOff
            | Command::GetSlotStatus
            | Command::IccClock { .. }
            | Command::T0Apdu { .. }
            | Command::Mechanical { .. }
            | Command::Abort
            | Command::Unknown(_) => rdr_to_pc::SLOT_STATUS,
        }
    }

    /// The dwLength the command must carry, for those of fixed size.
    fn fixed_length(&self) -> Option<u32> {
        match self.command {
            Command::IccPowerOn { .. }
            | Command::IccPowerOff
            | Command::GetSlotStatus
            | Command::GetParameters
            | Command::ResetParameters
            | Command::IccClock { .. }
            | Command::T0Apdu { .. }
            | Command::Mechanical { .. }
            | Command::Abort => Some(0),
            // The T=0 or T=1 protocol data structure (6.1.7); another
            // protocol is refused for itself, whatever its length.
            Command::SetParameters { protocol: 0 } => Some(5),
            Command::SetParameters { protocol: 1 } => Some(7),
            Command::SetParameters { .. } => None,
            Command::SetDataRateAndClockFrequency { .. } => Some(8),
            Command::XfrBlock { .. }
            | Command::Secure { .. }
            | Command::Escape
            | Command::Unknown(_) => None,
        }
    }

    /// What an empty slot 0 answers: `Ok` for success, or the bError of
    /// a failed command (6.2.6). The header is checked first (the slot,
    /// then the length, then the parameters), as its errors name the
    /// offending field.
    pub fn outcome(&self, length_ok: bool) -> Result<(), u8> {
        if self.header.slot != 0 {
            return Err(error::BAD_SLOT);
        }
        let fixed_ok = self.fixed_length().is_none_or(|l| l == self.header.length);
        if !length_ok || !fixed_ok {
            return Err(error::BAD_DWLENGTH);
        }
        match self.command {
            // Nothing to do with no card, and nothing that can fail.
            Command::GetSlotStatus | Command::IccPowerOff | Command::Abort => Ok(()),
            Command::SetParameters { protocol } if protocol > 1 => Err(error::BAD_PROTOCOL),
            // Every exchange with the card: the card does not answer.
            Command::IccPowerOn { .. }
            | Command::XfrBlock { .. }
            | Command::Secure { .. }
            | Command::GetParameters
            | Command::ResetParameters
            | Command::SetParameters { .. }
            | Command::IccClock { .. }
            | Command::SetDataRateAndClockFrequency { .. } => Err(error::ICC_MUTE),
            // No vendor commands, no mechanical features (dwMechanical
            // is 0), TPDU level only (T0APDU is for APDU-level readers).
            Command::Escape
            | Command::T0Apdu { .. }
            | Command::Mechanical { .. }
            | Command::Unknown(_) => Err(error::CMD_NOT_SUPPORTED),
        }
    }
}

/// The RDR_to_PC response (6.2.1-6.2.5) of type `reply_type` to the
/// message with `header`, the slot empty: `result` is
/// [`Message::outcome`]. bSlot and bSeq are the command's (6.2).
pub fn reply(header: &Header, reply_type: u8, result: Result<(), u8>) -> Reply {
    let (command_status, err) = match result {
        Ok(()) => (0, 0),
        Err(e) => (COMMAND_FAILED, e),
    };
    let mut b = [0u8; MAX_REPLY];
    // DataRateAndClockFrequency always carries its two dwords (zero:
    // nothing was set); a failed Parameters carries no protocol data
    // structure, there being no card to hold parameters for.
    let payload = if reply_type == rdr_to_pc::DATA_RATE_AND_CLOCK_FREQUENCY {
        8
    } else {
        0
    };
    b[0] = reply_type;
    b[1..5].copy_from_slice(&(payload as u32).to_le_bytes());
    b[5] = header.slot;
    b[6] = header.seq;
    b[7] = ICC_NOT_PRESENT | command_status << 6;
    b[8] = err;
    // The last header byte (bChainParameter, bClockStatus: running,
    // bProtocolNum: T=0, bRFU) is 0 in every reply here.
    Reply {
        bytes: b,
        len: HEADER_LEN + payload,
        pos: 0,
    }
}

/// A response waiting on the bulk IN endpoint, and how much of it the
/// host has read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    bytes: [u8; MAX_REPLY],
    len: usize,
    pos: usize,
}

impl Reply {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The bulk OUT message being received.
#[derive(Clone, Copy, Debug, Default)]
struct Rx {
    /// The header and the first payload bytes, as far as received.
    head: [u8; HEADER_LEN + PAYLOAD_KEEP],
    /// Bytes of the message received so far, header included.
    got: u64,
    /// Bytes still to drop of a message refused for its length.
    discard: u64,
}

/// The reader.
pub struct UsbCcid {
    core: UsbDeviceCore,
    speeds: Vec<Speed>,
    rx: Rx,
    /// Responses the host has not read, oldest first; at most
    /// [`MAX_PENDING`].
    replies: VecDeque<Reply>,
    /// A NotifySlotChange the host has not read.
    notify: bool,
    /// Endpoints NAKed since their state last changed (by
    /// [`Endpoint::index`]), to wake when it does.
    naked: u32,
    wakeup: Option<Wakeup>,
}

impl Default for UsbCcid {
    fn default() -> Self {
        Self::new()
    }
}

impl UsbCcid {
    /// A reader with an empty slot. It needs nothing: no card backend
    /// exists to give it.
    pub fn new() -> Self {
        let descs = descriptors();
        UsbCcid {
            speeds: descs.speeds(),
            core: UsbDeviceCore::new(descs),
            rx: Rx::default(),
            replies: VecDeque::with_capacity(MAX_PENDING),
            notify: false,
            naked: 0,
            wakeup: None,
        }
    }

    /// Back to idle: no message half received, no response queued.
    fn clear(&mut self) {
        self.rx = Rx::default();
        self.replies.clear();
        self.notify = false;
        self.naked = 0;
    }

    fn nak(&mut self, ep: Endpoint) -> UsbResult {
        self.naked |= 1 << ep.index();
        UsbResult::Nak
    }

    /// Retries `ep` at the controller if it was NAKed: its state changed.
    fn wake(&mut self, ep: Endpoint) {
        let bit = 1 << ep.index();
        if self.naked & bit != 0 {
            self.naked &= !bit;
            if let Some(w) = &self.wakeup {
                w(ep);
            }
        }
    }

    fn queue(&mut self, r: Reply) {
        // Never full here: a message is only taken in while there is
        // room for its one response (see `bulk_out`).
        if self.replies.len() < MAX_PENDING {
            self.replies.push_back(r);
        }
        self.wake(EP_BULK_IN);
    }

    fn class_request(&mut self, s: &SetupPacket) -> UsbResult {
        // All three address interface 0 (5.3).
        if s.index != 0 {
            return UsbResult::Stall;
        }
        match (s.request_type, s.request) {
            // 5.3.1: wValue holds bSeq (high) and bSlot (low); the
            // PC_to_RDR_Abort that follows on the bulk pipe is answered
            // in turn. Every command was answered at once, so there is
            // nothing in progress to abort.
            (0x21, REQ_ABORT) if s.length == 0 => {
                if s.value & 0xff != 0 {
                    UsbResult::Stall
                } else {
                    UsbResult::Ack(0)
                }
            }
            // 5.3.2, 5.3.3: arrays of bNumClockSupported and
            // bNumDataRatesSupported dwords, both 0 here (the default and
            // maximum, and every rate between, are in the class
            // descriptor): an empty answer. QEMU's reader stalls them.
            (0xa1, REQ_GET_CLOCK_FREQUENCIES) | (0xa1, REQ_GET_DATA_RATES) => UsbResult::Ack(0),
            _ => UsbResult::Stall,
        }
    }

    /// A transfer on the bulk OUT endpoint: (part of) a command.
    fn bulk_out(&mut self, data: &mut dyn PacketData) -> UsbResult {
        let len = data.len();
        // A transfer ends with a short packet; a full one leaves the
        // message open (USB 2.0 5.8.3).
        let ends = !len.is_multiple_of(MAX_PACKET) || len == 0;
        if self.rx.discard > 0 {
            self.rx.discard = self.rx.discard.saturating_sub(len as u64);
            if ends {
                self.rx.discard = 0;
            }
            return UsbResult::Ack(len);
        }
        // One response per message: take a new message in only when
        // there is room for its response (the host reads to make room).
        if self.rx.got == 0 && self.replies.len() >= MAX_PENDING {
            return self.nak(EP_BULK_OUT);
        }
        // A zero-length packet between messages: the end of one whose
        // length was a multiple of the packet size, already taken in.
        if self.rx.got == 0 && len == 0 {
            return UsbResult::Ack(0);
        }
        let mut off = 0usize;
        // The header, completed from this transfer.
        if self.rx.got < HEADER_LEN as u64 {
            let have = self.rx.got as usize;
            let n = (HEADER_LEN - have).min(len);
            if data
                .copy_from_host(0, &mut self.rx.head[have..have + n])
                .is_err()
            {
                self.rx = Rx::default();
                return UsbResult::Error;
            }
            self.rx.got += n as u64;
            off = n;
            if self.rx.got < HEADER_LEN as u64 {
                if ends {
                    // Too short to be a message, and without a bSeq it
                    // cannot be answered: refused, as QEMU's reader does;
                    // the host clears the halt and goes on.
                    self.rx = Rx::default();
                    self.core.halt(EP_BULK_OUT);
                    return UsbResult::Stall;
                }
                return UsbResult::Ack(len);
            }
        }
        let Some(header) = Header::parse(&self.rx.head) else {
            return UsbResult::Error;
        };
        if header.length > MAX_PAYLOAD {
            // Refused at once, before any of it is taken in (6.2.6: bad
            // dwLength); the rest of it is dropped up to its end.
            let msg = Message::parse(header, &[]);
            self.queue(reply(&header, msg.reply_type(), Err(error::BAD_DWLENGTH)));
            let left = (header.length as u64).saturating_sub((len - off) as u64);
            self.rx = Rx {
                discard: if ends { 0 } else { left },
                ..Rx::default()
            };
            return UsbResult::Ack(len);
        }
        let expected = HEADER_LEN as u64 + header.length as u64;
        let want = (expected - self.rx.got).min((len - off) as u64) as usize;
        // Keep the first payload bytes; count the rest.
        let kept = self.rx.got as usize;
        if kept < self.rx.head.len() {
            let n = (self.rx.head.len() - kept).min(want);
            if data
                .copy_from_host(off, &mut self.rx.head[kept..kept + n])
                .is_err()
            {
                self.rx = Rx::default();
                return UsbResult::Error;
            }
        }
        self.rx.got += want as u64;
        let extra = len - off - want;
        if self.rx.got < expected && !ends {
            return UsbResult::Ack(len);
        }
        // Complete, or cut short: a payload shorter than dwLength, or
        // bytes beyond it in the same transfer, both a bad dwLength.
        let length_ok = self.rx.got == expected && extra == 0;
        let msg = Message::parse(header, &self.rx.head[HEADER_LEN..]);
        self.rx = Rx::default();
        self.queue(reply(&header, msg.reply_type(), msg.outcome(length_ok)));
        UsbResult::Ack(len)
    }

    /// A transfer on the bulk IN endpoint: the oldest response.
    fn bulk_in(&mut self, data: &mut dyn PacketData) -> UsbResult {
        let Some(r) = self.replies.front_mut() else {
            return self.nak(EP_BULK_IN);
        };
        // Responses are shorter than a packet, so one transfer carries a
        // whole one; a smaller buffer takes it in pieces.
        let n = (r.len - r.pos).min(data.len());
        if data.copy_to_host(0, &r.bytes[r.pos..r.pos + n]).is_err() {
            return UsbResult::Error;
        }
        r.pos += n;
        if r.pos == r.len {
            self.replies.pop_front();
            // Room for another command.
            self.wake(EP_BULK_OUT);
        }
        UsbResult::Ack(n)
    }

    /// A transfer on the interrupt IN endpoint.
    fn interrupt(&mut self, data: &mut dyn PacketData) -> UsbResult {
        if !self.notify {
            // The slot never changes again: nothing more to say.
            return self.nak(EP_INTR);
        }
        let msg = [rdr_to_pc::NOTIFY_SLOT_CHANGE, SLOT0_EMPTY_CHANGED];
        if data.len() < msg.len() {
            // The 2-byte packet does not fit the host's buffer.
            return UsbResult::Babble;
        }
        if data.copy_to_host(0, &msg).is_err() {
            return UsbResult::Error;
        }
        self.notify = false;
        UsbResult::Ack(msg.len())
    }
}

impl UsbDevice for UsbCcid {
    fn speeds(&self) -> &[Speed] {
        &self.speeds
    }
    fn set_speed(&mut self, speed: Speed) {
        self.core.set_speed(speed)
    }
    fn speed(&self) -> Speed {
        self.core.speed()
    }
    fn address(&self) -> u8 {
        self.core.address()
    }
    fn reset(&mut self) {
        self.core.reset();
        self.clear();
    }
    fn set_wakeup(&mut self, wakeup: Option<Wakeup>) {
        self.wakeup = wakeup;
    }

    fn handle_control(&mut self, setup: &SetupPacket, data: &mut dyn PacketData) -> UsbResult {
        match self.core.handle_control(setup, data) {
            Handled::Done(r, ev) => {
                if let Event::Configured(c) = ev {
                    // A new configuration starts the pipes afresh; the
                    // host learns the slot's state from the interrupt
                    // endpoint (6.3.1) once configured.
                    self.clear();
                    self.notify = c != 0;
                }
                r
            }
            Handled::Class(s) => self.class_request(&s),
            Handled::Vendor(_) => UsbResult::Stall,
        }
    }

    fn handle_data(&mut self, ep: Endpoint, stream: u32, data: &mut dyn PacketData) -> UsbResult {
        if let Err(r) = self.core.check_data(ep) {
            return r;
        }
        if stream != 0 {
            return UsbResult::Stall;
        }
        match ep {
            EP_BULK_OUT => self.bulk_out(data),
            EP_BULK_IN => self.bulk_in(data),
            EP_INTR => self.interrupt(data),
            _ => UsbResult::Stall,
        }
    }
}

/// The fuzzing harness (`cargo fuzz` target `usb_ccid`, replayed by
/// `devices/tests/fuzz_corpus.rs`): setup packets and bulk messages
/// driven through a configured reader, whole (as xHCI hands transfers)
/// and cut into packets (as UHCI does).
///
/// The property: no input panics or spins; every answer moves at most
/// the buffer's bytes; the response queue stays bounded.
///
/// Input: a sequence of operations, an opcode byte (modulo 6) and its
/// operands; a truncated operation ends the run.
/// - 0 `8 bytes`: a control transfer (buffer of wLength, at most 4 KiB);
/// - 1 `n bytes...`: a bulk OUT transfer of `n` bytes, whole;
/// - 2 `n bytes...`: the same bytes as 64-byte packets, one call each;
/// - 3 `n`: a bulk IN transfer of `n` bytes;
/// - 4 `n`: an interrupt IN transfer of `n` bytes;
/// - 5 `ep`: a bus reset (bit 0 clear) or CLEAR_FEATURE(ENDPOINT_HALT)
///   on both bulk endpoints, then SET_CONFIGURATION(1).
pub mod fuzz {
    use super::{UsbCcid, EP_BULK_IN, EP_BULK_OUT, EP_INTR, MAX_PACKET, MAX_PENDING};
    use crate::usb::setup::{Request, SetupPacket};
    use crate::usb::{UsbDevice, UsbResult, VecData};

    fn check(r: UsbResult, len: usize) {
        if let UsbResult::Ack(n) = r {
            assert!(n <= len, "moved {n} bytes of a {len}-byte buffer");
        }
    }

    fn configure(dev: &mut UsbCcid) {
        for s in [[0u8, 5, 1, 0, 0, 0, 0, 0], [0, 9, 1, 0, 0, 0, 0, 0]] {
            dev.handle_control(&SetupPacket::parse(&s), &mut VecData::new(0));
        }
    }

    /// Runs one input.
    pub fn run(data: &[u8]) {
        // The parsers alone, on the raw input.
        if let Ok(b) = <[u8; 8]>::try_from(data.get(..8).unwrap_or(&[])) {
            let _ = Request::parse(&SetupPacket::parse(&b));
        }
        if let Some(h) = super::Header::parse(data) {
            let m = super::Message::parse(h, data.get(10..).unwrap_or(&[]));
            let _ = super::reply(&h, m.reply_type(), m.outcome(true));
        }

        let mut dev = UsbCcid::new();
        dev.set_speed(crate::usb::Speed::Full);
        configure(&mut dev);
        let mut i = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = data.get(i..i.checked_add(n)?)?;
            i += n;
            Some(s)
        };
        // Bounded: every operation consumes at least one byte.
        while let Some(&[op]) = take(1) {
            match op % 6 {
                0 => {
                    let Some(b) = take(8) else { break };
                    let s = SetupPacket::parse(&b.try_into().unwrap_or([0; 8]));
                    let len = (s.length as usize).min(4096);
                    check(dev.handle_control(&s, &mut VecData::new(len)), len);
                }
                1 => {
                    let Some(&[n]) = take(1) else { break };
                    let Some(b) = take(n as usize) else { break };
                    let r = dev.handle_data(EP_BULK_OUT, 0, &mut VecData(b.to_vec()));
                    check(r, b.len());
                }
                2 => {
                    let Some(&[n]) = take(1) else { break };
                    let Some(b) = take(n as usize) else { break };
                    for p in b.chunks(MAX_PACKET) {
                        let r = dev.handle_data(EP_BULK_OUT, 0, &mut VecData(p.to_vec()));
                        check(r, p.len());
                    }
                }
                3 | 4 => {
                    let Some(&[n]) = take(1) else { break };
                    let ep = if op % 6 == 3 { EP_BULK_IN } else { EP_INTR };
                    let len = n as usize;
                    check(dev.handle_data(ep, 0, &mut VecData::new(len)), len);
                }
                _ => {
                    let Some(&[e]) = take(1) else { break };
                    if e & 1 == 0 {
                        dev.reset();
                    } else {
                        for a in [EP_BULK_IN.address(), EP_BULK_OUT.address()] {
                            let s = SetupPacket::parse(&[2, 1, 0, 0, a, 0, 0, 0]);
                            dev.handle_control(&s, &mut VecData::new(0));
                        }
                    }
                    configure(&mut dev);
                }
            }
            assert!(dev.replies.len() <= MAX_PENDING);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usb::VecData;

    fn control(d: &mut UsbCcid, setup: [u8; 8]) -> (UsbResult, Vec<u8>) {
        let s = SetupPacket::parse(&setup);
        let mut b = VecData::new(s.length as usize);
        let r = d.handle_control(&s, &mut b);
        (r, b.0)
    }

    fn configured() -> UsbCcid {
        let mut d = UsbCcid::new();
        d.set_speed(Speed::Full);
        assert_eq!(
            control(&mut d, [0, 5, 3, 0, 0, 0, 0, 0]).0,
            UsbResult::Ack(0)
        );
        assert_eq!(
            control(&mut d, [0, 9, 1, 0, 0, 0, 0, 0]).0,
            UsbResult::Ack(0)
        );
        d
    }

    fn msg(kind: u8, len: u32, slot: u8, seq: u8, specific: [u8; 3]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&[slot, seq]);
        v.extend_from_slice(&specific);
        v
    }

    fn send(d: &mut UsbCcid, bytes: &[u8]) -> UsbResult {
        d.handle_data(EP_BULK_OUT, 0, &mut VecData(bytes.to_vec()))
    }

    fn read(d: &mut UsbCcid) -> Option<Vec<u8>> {
        let mut b = VecData::new(64);
        match d.handle_data(EP_BULK_IN, 0, &mut b) {
            UsbResult::Ack(n) => Some(b.0[..n].to_vec()),
            UsbResult::Nak => None,
            r => panic!("{r:?}"),
        }
    }

    /// (bMessageType, dwLength, bSlot, bSeq, bStatus, bError).
    fn fields(r: &[u8]) -> (u8, u32, u8, u8, u8, u8) {
        let h = Header::parse(r).unwrap();
        (h.message_type, h.length, h.slot, h.seq, r[7], r[8])
    }

    #[test]
    fn descriptors_enumerate() {
        let mut d = UsbCcid::new();
        assert_eq!(d.speeds(), &[Speed::Full]);
        d.set_speed(Speed::Full);
        let (r, dev) = control(&mut d, [0x80, 6, 0, 1, 0, 0, 18, 0]);
        assert_eq!(r, UsbResult::Ack(18));
        assert_eq!(&dev[2..4], &[0x10, 0x01], "USB 1.1");
        assert_eq!(dev[7], 64);
        assert_eq!(&dev[8..12], &[0xe6, 0x08, 0x33, 0x44], "08e6:4433");
        let (r, cfg) = control(&mut d, [0x80, 6, 0, 2, 0, 0, 255, 0]);
        // config + interface + CCID + 3 endpoints.
        let total = 9 + 9 + CCID_DESC_LEN + 3 * 7;
        assert_eq!(r, UsbResult::Ack(total));
        assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]) as usize, total);
        assert_eq!(cfg[7], 0xe0, "self-powered, remote wakeup");
        assert_eq!(&cfg[9..18], &[9, 4, 0, 0, 3, 0x0b, 0, 0, STR_INTERFACE]);
        let c = &cfg[18..18 + CCID_DESC_LEN];
        assert_eq!(&c[..6], &[0x36, 0x21, 0x10, 0x01, 0, 0x07]);
        assert_eq!(&c[6..10], &[3, 0, 0, 0], "T=0 and T=1");
        assert_eq!(u32::from_le_bytes(c[10..14].try_into().unwrap()), 4000);
        assert_eq!(u32::from_le_bytes(c[19..23].try_into().unwrap()), 9600);
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 0xfe);
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            0x0001_04fe
        );
        assert_eq!(
            u32::from_le_bytes(c[44..48].try_into().unwrap()),
            MAX_MESSAGE_LEN
        );
        assert_eq!(&c[48..54], &[0xff, 0xff, 0, 0, 0, 1]);
        let eps = &cfg[18 + CCID_DESC_LEN..];
        assert_eq!(&eps[..7], &[7, 5, 0x81, 3, 64, 0, 255]);
        assert_eq!(&eps[7..14], &[7, 5, 0x82, 2, 64, 0, 0]);
        assert_eq!(&eps[14..21], &[7, 5, 0x03, 2, 64, 0, 0]);
        let (r, s) = control(&mut d, [0x80, 6, 2, 3, 9, 4, 255, 0]);
        assert_eq!(r, UsbResult::Ack(28));
        assert_eq!(&s[2..6], &[b'Q', 0, b'E', 0]);
    }

    #[test]
    fn notify_slot_change_once_after_configuration() {
        let mut d = UsbCcid::new();
        d.set_speed(Speed::Full);
        let mut b = VecData::new(64);
        assert_eq!(
            d.handle_data(EP_INTR, 0, &mut b),
            UsbResult::Stall,
            "not configured"
        );
        let mut d = configured();
        let woke = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let w = woke.clone();
        d.set_wakeup(Some(std::sync::Arc::new(move |ep| {
            w.lock().unwrap().push(ep)
        })));
        assert_eq!(
            d.handle_data(EP_INTR, 0, &mut VecData::new(1)),
            UsbResult::Babble
        );
        assert_eq!(d.handle_data(EP_INTR, 0, &mut b), UsbResult::Ack(2));
        assert_eq!(&b.0[..2], &[0x50, 0b10], "slot 0: no card, changed");
        assert_eq!(d.handle_data(EP_INTR, 0, &mut b), UsbResult::Nak);
        assert_eq!(d.handle_data(EP_INTR, 0, &mut b), UsbResult::Nak);
        // The slot never changes: nothing to wake the pipe for.
        assert!(woke.lock().unwrap().is_empty());
        // A new configuration tells it again.
        control(&mut d, [0, 9, 1, 0, 0, 0, 0, 0]);
        assert_eq!(d.handle_data(EP_INTR, 0, &mut b), UsbResult::Ack(2));
        // A bus reset forgets it until configured.
        control(&mut d, [0, 9, 1, 0, 0, 0, 0, 0]);
        d.reset();
        assert_eq!(d.handle_data(EP_INTR, 0, &mut b), UsbResult::Stall);
    }

    #[test]
    fn get_slot_status_says_no_card() {
        let mut d = configured();
        assert_eq!(read(&mut d), None, "nothing asked yet");
        let m = msg(pc_to_rdr::GET_SLOT_STATUS, 0, 0, 0x17, [0; 3]);
        assert_eq!(send(&mut d, &m), UsbResult::Ack(10));
        let r = read(&mut d).unwrap();
        assert_eq!(r.len(), 10);
        assert_eq!(
            fields(&r),
            (rdr_to_pc::SLOT_STATUS, 0, 0, 0x17, ICC_NOT_PRESENT, 0)
        );
        assert_eq!(r[9], 0, "clock running");
        assert_eq!(read(&mut d), None);
    }

    #[test]
    fn card_commands_fail_with_icc_mute_and_echo_bseq() {
        let mut d = configured();
        let cases = [
            (pc_to_rdr::ICC_POWER_ON, 0, rdr_to_pc::DATA_BLOCK),
            (pc_to_rdr::XFR_BLOCK, 5, rdr_to_pc::DATA_BLOCK),
            (pc_to_rdr::SECURE, 3, rdr_to_pc::DATA_BLOCK),
            (pc_to_rdr::GET_PARAMETERS, 0, rdr_to_pc::PARAMETERS),
            (pc_to_rdr::RESET_PARAMETERS, 0, rdr_to_pc::PARAMETERS),
            (pc_to_rdr::SET_PARAMETERS, 5, rdr_to_pc::PARAMETERS),
            (pc_to_rdr::ICC_CLOCK, 0, rdr_to_pc::SLOT_STATUS),
        ];
        for (seq, (kind, len, reply)) in cases.into_iter().enumerate() {
            let seq = 0xf0 + seq as u8;
            let mut m = msg(kind, len, 0, seq, [0; 3]);
            m.resize(10 + len as usize, 0xaa);
            assert_eq!(send(&mut d, &m), UsbResult::Ack(m.len()));
            let r = read(&mut d).unwrap();
            assert_eq!(
                fields(&r),
                (reply, 0, 0, seq, 0x42, error::ICC_MUTE),
                "{kind:#x}"
            );
        }
        let m = msg(
            pc_to_rdr::SET_DATA_RATE_AND_CLOCK_FREQUENCY,
            8,
            0,
            9,
            [0; 3],
        );
        let mut m = m;
        m.extend_from_slice(&[0xa0, 0x0f, 0, 0, 0x80, 0x25, 0, 0]);
        send(&mut d, &m);
        let r = read(&mut d).unwrap();
        assert_eq!(r.len(), 18);
        assert_eq!(
            fields(&r),
            (
                rdr_to_pc::DATA_RATE_AND_CLOCK_FREQUENCY,
                8,
                0,
                9,
                0x42,
                error::ICC_MUTE
            )
        );
        assert_eq!(
            Message::parse(Header::parse(&m).unwrap(), &m[10..]).command,
            Command::SetDataRateAndClockFrequency {
                clock_khz: 4000,
                data_rate: 9600
            }
        );
        // Power off and abort succeed; the slot stays empty.
        for (kind, seq) in [(pc_to_rdr::ICC_POWER_OFF, 1), (pc_to_rdr::ABORT, 2)] {
            send(&mut d, &msg(kind, 0, 0, seq, [0; 3]));
            let r = read(&mut d).unwrap();
            assert_eq!(fields(&r), (rdr_to_pc::SLOT_STATUS, 0, 0, seq, 2, 0));
        }
        send(&mut d, &msg(pc_to_rdr::ESCAPE, 0, 0, 3, [0; 3]));
        let r = read(&mut d).unwrap();
        assert_eq!(fields(&r), (rdr_to_pc::ESCAPE, 0, 0, 3, 0x42, 0));
    }

    #[test]
    fn bad_slot_unknown_type_and_bad_lengths() {
        let mut d = configured();
        send(&mut d, &msg(0x99, 0, 0, 4, [0; 3]));
        let r = read(&mut d).unwrap();
        assert_eq!(
            fields(&r),
            (
                rdr_to_pc::SLOT_STATUS,
                0,
                0,
                4,
                0x42,
                error::CMD_NOT_SUPPORTED
            )
        );
        send(&mut d, &msg(pc_to_rdr::GET_SLOT_STATUS, 0, 3, 5, [0; 3]));
        let r = read(&mut d).unwrap();
        assert_eq!(
            fields(&r),
            (rdr_to_pc::SLOT_STATUS, 0, 3, 5, 0x42, error::BAD_SLOT)
        );
        send(&mut d, &msg(pc_to_rdr::ICC_POWER_ON, 0, 1, 6, [0; 3]));
        let r = read(&mut d).unwrap();
        assert_eq!(
            fields(&r),
            (rdr_to_pc::DATA_BLOCK, 0, 1, 6, 0x42, error::BAD_SLOT)
        );
        // A fixed-size command with a payload.
        let mut m = msg(pc_to_rdr::GET_SLOT_STATUS, 2, 0, 7, [0; 3]);
        m.extend_from_slice(&[1, 2]);
        send(&mut d, &m);
        assert_eq!(fields(&read(&mut d).unwrap()).5, error::BAD_DWLENGTH);
        // A payload shorter than dwLength, ended by a short packet.
        let mut m = msg(pc_to_rdr::XFR_BLOCK, 20, 0, 8, [0; 3]);
        m.extend_from_slice(&[0; 5]);
        send(&mut d, &m);
        let r = read(&mut d).unwrap();
        assert_eq!(
            fields(&r),
            (rdr_to_pc::DATA_BLOCK, 0, 0, 8, 0x42, error::BAD_DWLENGTH)
        );
        // Bytes beyond dwLength in the same transfer.
        let mut m = msg(pc_to_rdr::XFR_BLOCK, 1, 0, 9, [0; 3]);
        m.extend_from_slice(&[0; 3]);
        send(&mut d, &m);
        assert_eq!(fields(&read(&mut d).unwrap()).5, error::BAD_DWLENGTH);
        // SetParameters for a protocol that does not exist.
        let mut m = msg(pc_to_rdr::SET_PARAMETERS, 5, 0, 10, [2, 0, 0]);
        m.extend_from_slice(&[0; 5]);
        send(&mut d, &m);
        assert_eq!(fields(&read(&mut d).unwrap()).5, error::BAD_PROTOCOL);
    }

    #[test]
    fn oversized_dwlength_is_refused_without_allocating() {
        let mut d = configured();
        // 4 GiB claimed: answered at once, and the transfer dropped.
        let mut m = msg(pc_to_rdr::XFR_BLOCK, u32::MAX, 0, 0x33, [0; 3]);
        m.resize(64, 0x55);
        assert_eq!(send(&mut d, &m), UsbResult::Ack(64));
        let r = read(&mut d).unwrap();
        assert_eq!(
            fields(&r),
            (rdr_to_pc::DATA_BLOCK, 0, 0, 0x33, 0x42, error::BAD_DWLENGTH)
        );
        // The rest of it, up to the short packet that ends it, is dropped.
        assert_eq!(send(&mut d, &[0x65; 64]), UsbResult::Ack(64));
        assert_eq!(send(&mut d, &[0x65; 3]), UsbResult::Ack(3));
        assert_eq!(read(&mut d), None);
        // In step again.
        send(&mut d, &msg(pc_to_rdr::GET_SLOT_STATUS, 0, 0, 0x34, [0; 3]));
        assert_eq!(fields(&read(&mut d).unwrap()).3, 0x34);
        // Just over the limit, whole in one transfer.
        let mut m = msg(pc_to_rdr::XFR_BLOCK, MAX_PAYLOAD + 1, 0, 0x35, [0; 3]);
        m.resize(10 + MAX_PAYLOAD as usize + 1, 0);
        send(&mut d, &m);
        assert_eq!(fields(&read(&mut d).unwrap()).5, error::BAD_DWLENGTH);
        // The largest allowed, in 64-byte packets: one answer at the end.
        let mut m = msg(pc_to_rdr::XFR_BLOCK, MAX_PAYLOAD, 0, 0x36, [0; 3]);
        m.resize(MAX_MESSAGE_LEN as usize, 0);
        for p in m.chunks(64) {
            assert_eq!(send(&mut d, p), UsbResult::Ack(p.len()));
        }
        let r = read(&mut d).unwrap();
        assert_eq!(
            fields(&r),
            (rdr_to_pc::DATA_BLOCK, 0, 0, 0x36, 0x42, error::ICC_MUTE)
        );
        assert_eq!(read(&mut d), None);
    }

    #[test]
    fn truncated_header_stalls_until_cleared() {
        let mut d = configured();
        assert_eq!(send(&mut d, &[0x65, 0, 0]), UsbResult::Stall);
        assert_eq!(send(&mut d, &[0x65; 10]), UsbResult::Stall, "halted");
        assert_eq!(read(&mut d), None);
        // CLEAR_FEATURE(ENDPOINT_HALT) on the bulk OUT endpoint.
        assert_eq!(
            control(&mut d, [2, 1, 0, 0, 3, 0, 0, 0]).0,
            UsbResult::Ack(0)
        );
        send(&mut d, &msg(pc_to_rdr::GET_SLOT_STATUS, 0, 0, 1, [0; 3]));
        assert_eq!(fields(&read(&mut d).unwrap()).3, 1);
        // A zero-length packet between messages is no message.
        assert_eq!(send(&mut d, &[]), UsbResult::Ack(0));
        assert_eq!(read(&mut d), None);
        // A 64-byte message, then the zero-length packet ending it.
        let mut m = msg(pc_to_rdr::XFR_BLOCK, 54, 0, 2, [0; 3]);
        m.resize(64, 0);
        assert_eq!(send(&mut d, &m), UsbResult::Ack(64));
        assert_eq!(send(&mut d, &[]), UsbResult::Ack(0));
        assert_eq!(fields(&read(&mut d).unwrap()).3, 2);
        assert_eq!(read(&mut d), None);
        // Nothing reaches an endpoint that is not there.
        assert_eq!(
            d.handle_data(Endpoint::new(4, Dir::Out), 0, &mut VecData::new(8)),
            UsbResult::Stall
        );
    }

    #[test]
    fn queue_is_bounded_and_small_reads_take_pieces() {
        let mut d = configured();
        let woke = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let w = woke.clone();
        d.set_wakeup(Some(std::sync::Arc::new(move |ep| {
            w.lock().unwrap().push(ep)
        })));
        for seq in 0..MAX_PENDING as u8 {
            let m = msg(pc_to_rdr::GET_SLOT_STATUS, 0, 0, seq, [0; 3]);
            assert_eq!(send(&mut d, &m), UsbResult::Ack(10));
        }
        let m = msg(pc_to_rdr::GET_SLOT_STATUS, 0, 0, 99, [0; 3]);
        assert_eq!(send(&mut d, &m), UsbResult::Nak, "the host must read");
        // A 4-byte buffer takes the first response in three reads.
        let mut got = Vec::new();
        while got.len() < 10 {
            let mut b = VecData::new(4);
            let UsbResult::Ack(n) = d.handle_data(EP_BULK_IN, 0, &mut b) else {
                panic!()
            };
            got.extend_from_slice(&b.0[..n]);
        }
        assert_eq!(fields(&got).3, 0);
        assert_eq!(woke.lock().unwrap().as_slice(), &[EP_BULK_OUT]);
        assert_eq!(send(&mut d, &m), UsbResult::Ack(10));
        for seq in (1..MAX_PENDING as u8).chain([99]) {
            assert_eq!(fields(&read(&mut d).unwrap()).3, seq);
        }
        // A NAKed bulk IN is woken when a response is queued.
        assert_eq!(read(&mut d), None);
        send(&mut d, &msg(pc_to_rdr::GET_SLOT_STATUS, 0, 0, 1, [0; 3]));
        assert_eq!(woke.lock().unwrap().as_slice(), &[EP_BULK_OUT, EP_BULK_IN]);
    }

    #[test]
    fn class_requests() {
        let mut d = configured();
        // ABORT for slot 0, bSeq 5; then PC_to_RDR_Abort.
        assert_eq!(
            control(&mut d, [0x21, REQ_ABORT, 0, 5, 0, 0, 0, 0]).0,
            UsbResult::Ack(0)
        );
        assert_eq!(
            control(&mut d, [0x21, REQ_ABORT, 1, 5, 0, 0, 0, 0]).0,
            UsbResult::Stall,
            "no slot 1"
        );
        send(&mut d, &msg(pc_to_rdr::ABORT, 0, 0, 5, [0; 3]));
        assert_eq!(
            fields(&read(&mut d).unwrap()),
            (rdr_to_pc::SLOT_STATUS, 0, 0, 5, 2, 0)
        );
        for req in [REQ_GET_CLOCK_FREQUENCIES, REQ_GET_DATA_RATES] {
            assert_eq!(
                control(&mut d, [0xa1, req, 0, 0, 0, 0, 0, 0]).0,
                UsbResult::Ack(0)
            );
            assert_eq!(
                control(&mut d, [0xa1, req, 0, 0, 1, 0, 4, 0]).0,
                UsbResult::Stall,
                "no interface 1"
            );
        }
        assert_eq!(
            control(&mut d, [0xa1, 0x7f, 0, 0, 0, 0, 4, 0]).0,
            UsbResult::Stall
        );
        assert_eq!(
            control(&mut d, [0x41, 1, 0, 0, 0, 0, 0, 0]).0,
            UsbResult::Stall,
            "no vendor requests"
        );
    }

    #[test]
    fn fuzz_seeds_run() {
        let mut d = vec![1, 10];
        d.extend_from_slice(&msg(pc_to_rdr::ICC_POWER_ON, 0, 0, 1, [0; 3]));
        d.extend_from_slice(&[3, 64, 4, 8]);
        fuzz::run(&d);
        fuzz::run(&[]);
        fuzz::run(&[0xff; 300]);
    }
}
