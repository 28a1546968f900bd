//! Contexts (xHCI 1.2, 6.2): the Slot Context (6.2.2), Endpoint Context
//! (6.2.3), the Stream Context (6.2.4.1), the Input Control Context
//! (6.2.5.1) and where they sit in a Device Context (6.2.1) and an Input
//! Context (6.2.5). Contexts are 32 bytes (HCCPARAMS1.CSZ = 0).
//!
//! Only the fields the controller uses are typed; the rest travel as
//! the raw dwords, so that what the driver wrote in the input context
//! reaches the output context unchanged.

use vm_memory::GuestAddress;

use crate::dma;
use crate::GuestMem;

/// Bytes per context (CSZ = 0).
pub const CTX_SIZE: u64 = 32;

/// Slot states (6.2.2, Slot State field).
pub mod slot_state {
    pub const DISABLED_ENABLED: u32 = 0;
    pub const DEFAULT: u32 = 1;
    pub const ADDRESSED: u32 = 2;
    pub const CONFIGURED: u32 = 3;
}

/// Endpoint states (6.2.3, EP State field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpState {
    Disabled = 0,
    Running = 1,
    Halted = 2,
    Stopped = 3,
    Error = 4,
}

/// Endpoint types (6.2.3, table 6-9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpType {
    IsochOut,
    BulkOut,
    InterruptOut,
    Control,
    IsochIn,
    BulkIn,
    InterruptIn,
}

impl EpType {
    pub fn from_field(v: u32) -> Option<EpType> {
        Some(match v {
            1 => EpType::IsochOut,
            2 => EpType::BulkOut,
            3 => EpType::InterruptOut,
            4 => EpType::Control,
            5 => EpType::IsochIn,
            6 => EpType::BulkIn,
            7 => EpType::InterruptIn,
            _ => return None,
        })
    }

    /// True for the IN types (Control has both directions).
    pub fn is_in(self) -> bool {
        matches!(self, EpType::IsochIn | EpType::BulkIn | EpType::InterruptIn)
    }

    pub fn is_isoch(self) -> bool {
        matches!(self, EpType::IsochIn | EpType::IsochOut)
    }
}

/// Eight dwords of context.
pub type Raw = [u32; 8];

pub fn read_ctx(mem: &GuestMem, addr: u64) -> Option<Raw> {
    let mut b = [0u8; CTX_SIZE as usize];
    dma::read_ram(mem, GuestAddress(addr), &mut b).ok()?;
    let mut r = [0u32; 8];
    for (i, d) in r.iter_mut().enumerate() {
        *d = u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    }
    Some(r)
}

pub fn write_ctx(mem: &GuestMem, addr: u64, r: &Raw) -> Option<()> {
    let mut b = [0u8; CTX_SIZE as usize];
    for (i, d) in r.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&d.to_le_bytes());
    }
    dma::write_ram(mem, GuestAddress(addr), &b).ok()
}

/// The Input Control Context's Drop (D2-D31) and Add (A0-A31) flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputControl {
    pub drop: u32,
    pub add: u32,
}

impl InputControl {
    pub fn parse(r: &Raw) -> InputControl {
        InputControl {
            drop: r[0],
            add: r[1],
        }
    }
}

/// Where context `dci` (0: the slot) of an Input Context at `input` is:
/// after the Input Control Context.
pub fn input_ctx_addr(input: u64, dci: u8) -> Option<u64> {
    input.checked_add((dci as u64 + 1) * CTX_SIZE)
}

/// Where context `dci` (0: the slot) of a Device Context at `out` is.
pub fn output_ctx_addr(out: u64, dci: u8) -> Option<u64> {
    out.checked_add(dci as u64 * CTX_SIZE)
}

/// The Slot Context fields the controller reads and writes.
pub mod slot {
    use super::Raw;

    pub fn route_string(r: &Raw) -> u32 {
        r[0] & 0xf_ffff
    }
    pub fn context_entries(r: &Raw) -> u32 {
        r[0] >> 27
    }
    pub fn root_port(r: &Raw) -> u8 {
        (r[1] >> 16) as u8
    }
    pub fn interrupter(r: &Raw) -> u16 {
        (r[2] >> 22) as u16
    }
    pub fn state(r: &Raw) -> u32 {
        r[3] >> 27
    }
    pub fn set_state(r: &mut Raw, state: u32, address: u8) {
        r[3] = (r[3] & 0x07ff_ff00 & !0xff) | state << 27 | address as u32;
    }
    pub fn set_context_entries(r: &mut Raw, n: u32) {
        r[0] = (r[0] & 0x07ff_ffff) | (n & 0x1f) << 27;
    }
    pub fn set_speed(r: &mut Raw, speed: u32) {
        r[0] = (r[0] & !(0xf << 20)) | (speed & 0xf) << 20;
    }
}

/// An Endpoint Context, the fields typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpContext {
    pub ty: Option<EpType>,
    pub max_packet: u16,
    /// MaxPStreams (0: no streams) and LSA.
    pub max_pstreams: u8,
    pub lsa: bool,
    /// TR Dequeue Pointer (or the Stream Context Array with streams)
    /// and the Dequeue Cycle State.
    pub dequeue: u64,
    pub dcs: bool,
}

impl EpContext {
    pub fn parse(r: &Raw) -> EpContext {
        EpContext {
            ty: EpType::from_field((r[1] >> 3) & 7),
            max_packet: (r[1] >> 16) as u16,
            max_pstreams: ((r[0] >> 10) & 0x1f) as u8,
            lsa: r[0] & (1 << 15) != 0,
            dequeue: (r[2] as u64 & !0xf) | (r[3] as u64) << 32,
            dcs: r[2] & 1 != 0,
        }
    }
}

/// Sets an Endpoint Context's state.
pub fn set_ep_state(r: &mut Raw, s: EpState) {
    r[0] = (r[0] & !7) | s as u32;
}

/// Sets an Endpoint Context's TR Dequeue Pointer and DCS.
pub fn set_ep_dequeue(r: &mut Raw, dequeue: u64, dcs: bool) {
    r[2] = (dequeue as u32 & !0xf) | dcs as u32;
    r[3] = (dequeue >> 32) as u32;
}

/// A Stream Context (6.2.4.1): the stream's ring and its context type
/// (1: a primary Transfer Ring).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamContext {
    pub dequeue: u64,
    pub dcs: bool,
    pub sct: u8,
}

impl StreamContext {
    /// Reads entry `id` of the Stream Context Array at `array`.
    pub fn read(mem: &GuestMem, array: u64, id: u16) -> Option<StreamContext> {
        let at = array.checked_add(id as u64 * 16)?;
        let mut b = [0u8; 8];
        dma::read_ram(mem, GuestAddress(at), &mut b).ok()?;
        let v = u64::from_le_bytes(b);
        Some(StreamContext {
            dequeue: v & !0xf,
            dcs: v & 1 != 0,
            sct: ((v >> 1) & 7) as u8,
        })
    }

    /// Stores the ring's dequeue pointer back into entry `id`.
    pub fn write(
        mem: &GuestMem,
        array: u64,
        id: u16,
        dequeue: u64,
        dcs: bool,
        sct: u8,
    ) -> Option<()> {
        let at = array.checked_add(id as u64 * 16)?;
        let v = (dequeue & !0xf) | (sct as u64 & 7) << 1 | dcs as u64;
        dma::write_ram(mem, GuestAddress(at), &v.to_le_bytes()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_context_fields() {
        let r: Raw = [
            3 << 10 | 1 << 15,
            512 << 16 | 6 << 3 | 3 << 1,
            0x8001,
            0x1,
            0,
            0,
            0,
            0,
        ];
        let e = EpContext::parse(&r);
        assert_eq!(e.ty, Some(EpType::BulkIn));
        assert_eq!(e.max_packet, 512);
        assert_eq!((e.max_pstreams, e.lsa), (3, true));
        assert_eq!((e.dequeue, e.dcs), (0x1_0000_8000, true));
        let mut r = r;
        set_ep_state(&mut r, EpState::Halted);
        assert_eq!(r[0] & 7, 2);
        set_ep_dequeue(&mut r, 0x2000, false);
        assert_eq!((r[2], r[3]), (0x2000, 0));
    }

    #[test]
    fn slot_context_fields() {
        let mut r: Raw = [1 << 27 | 3 << 20, 2 << 16, 0, 0, 0, 0, 0, 0];
        assert_eq!(slot::context_entries(&r), 1);
        assert_eq!(slot::root_port(&r), 2);
        slot::set_state(&mut r, slot_state::ADDRESSED, 5);
        assert_eq!(slot::state(&r), 2);
        assert_eq!(r[3] & 0xff, 5);
        slot::set_context_entries(&mut r, 4);
        assert_eq!(slot::context_entries(&r), 4);
    }
}
