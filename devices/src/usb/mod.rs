//! USB: the device framework every host controller drives, the devices,
//! and the host controllers.
//!
//! Specs followed: Universal Serial Bus Specification 2.0, chapter 5
//! (transfer types, short packets: 5.3.2 and 5.8.3) and chapter 8
//! (packets, handshakes: 8.4.5 ACK/NAK/STALL, 8.5.3 control transfers);
//! chapter 9 (the device framework) is [`setup`], [`desc`] and [`core`].
//!
//! The shape, which UHCI, EHCI and xHCI share:
//!
//! - A device is a [`UsbDevice`]: a host controller hands it control
//!   transfers whole ([`UsbDevice::handle_control`], the setup packet and
//!   the data stage) and data transfers on its other endpoints
//!   ([`UsbDevice::handle_data`]), each against the guest's buffer as a
//!   [`PacketData`], and gets a [`UsbResult`]: bytes moved (ACK), NAK,
//!   STALL, or a transaction error.
//! - Nothing blocks. A device whose data is not there yet (block I/O in
//!   flight) answers NAK and later calls the [`Wakeup`] the controller
//!   registered ([`UsbDevice::set_wakeup`]) with the endpoint, so that an
//!   xHCI re-runs that endpoint's ring; UHCI and EHCI simply retry in a
//!   later frame, as real hardware retries a NAKed transaction.
//! - Packet-level controllers (UHCI, EHCI) see control transfers as
//!   SETUP/IN/OUT packets; [`control::ControlPipe`] reassembles them into
//!   one [`UsbDevice::handle_control`] call, so devices never see packets on
//!   endpoint 0.
//! - A transfer longer than the device can serve at once (an xHCI TD of
//!   megabytes, against a device that stages data in bounded pieces) is
//!   answered with [`UsbResult::Ack`] of fewer bytes than the buffer, a
//!   multiple of the endpoint's max packet size: by USB's rules (5.3.2)
//!   that is not the end of the transfer, and the controller calls again
//!   with the rest of the buffer ([`PacketData`] offsets make that cheap).
//!   Fewer bytes that are not such a multiple are a short packet, which
//!   ends the transfer.
//!
//! Modules:
//! - [`setup`]: the 8-byte setup packet parsed into a typed request.
//! - [`desc`]: typed descriptors, serialised to bytes, per speed.
//! - [`core`]: [`core::UsbDeviceCore`], the standard requests (9.4) and the
//!   device state (address, configuration, halted endpoints).
//! - [`control`]: control transfers from packets, for UHCI/EHCI.
//! - [`bot`]: the Bulk-Only Transport wrappers (CBW, CSW).
//! - [`storage`]: `usb-storage`, the mass storage device on a SCSI bus.
//! - [`uas`]: `usb-uas`, USB Attached SCSI on a SCSI bus.
//! - [`hid`]: `usb-tablet`, the HID pointer.
//! - [`ccid`]: `usb-ccid`, the smart-card reader (an empty slot).
//! - [`uhci`]: the PIIX3 UHCI host controller (and the ICH9's, as EHCI
//!   companions).
//! - [`ehci`]: the ICH9 EHCI host controller.
//! - [`xhci`]: the xHCI host controller (`qemu-xhci`, `nec-usb-xhci`).

pub mod bot;
pub mod ccid;
pub mod control;
pub mod core;
pub mod desc;
pub mod ehci;
pub mod fuzz;
pub mod hid;
pub mod setup;
pub mod storage;
pub mod uas;
pub mod uhci;
pub mod xhci;

use std::sync::Arc;

use crate::dma::GuestSgList;
use crate::GuestMem;

pub use self::core::UsbDeviceCore;
pub use setup::SetupPacket;
pub use storage::UsbStorage;
pub use uhci::Uhci;

/// Bus speeds (USB 2.0 7.1.11, USB 3.2 for SuperSpeed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Speed {
    /// 1.5 Mb/s.
    Low,
    /// 12 Mb/s.
    Full,
    /// 480 Mb/s.
    High,
    /// 5 Gb/s.
    Super,
}

/// The direction of a transfer, as USB names it: from the host's point of
/// view (IN: device to host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    Out,
    In,
}

/// An endpoint of a device: number 0..=15 and direction (9.6.6
/// bEndpointAddress). Endpoint 0 is the default control pipe in both
/// directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    number: u8,
    dir: Dir,
}

impl Endpoint {
    /// Endpoint `number` (taken modulo 16, as the 4-bit field holds it).
    pub const fn new(number: u8, dir: Dir) -> Self {
        Endpoint {
            number: number & 0x0f,
            dir,
        }
    }

    /// From a bEndpointAddress byte (bit 7: IN; bits 3..0: number).
    pub const fn from_address(addr: u8) -> Self {
        let dir = if addr & 0x80 != 0 { Dir::In } else { Dir::Out };
        Endpoint::new(addr & 0x0f, dir)
    }

    pub const fn number(self) -> u8 {
        self.number
    }

    pub const fn dir(self) -> Dir {
        self.dir
    }

    /// The bEndpointAddress byte.
    pub const fn address(self) -> u8 {
        match self.dir {
            Dir::In => self.number | 0x80,
            Dir::Out => self.number,
        }
    }

    /// A dense index 0..32 (OUT endpoints 0..16, IN endpoints 16..32), for
    /// per-endpoint bitmaps.
    pub const fn index(self) -> usize {
        match self.dir {
            Dir::Out => self.number as usize,
            Dir::In => 16 + self.number as usize,
        }
    }
}

/// What a transaction (or a whole transfer) ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsbResult {
    /// ACK: this many bytes moved. Fewer than the buffer and not a
    /// multiple of the endpoint's max packet size is a short packet; a
    /// multiple means "more to come" (see the module doc).
    Ack(usize),
    /// NAK: nothing yet, try later (the device calls its [`Wakeup`] when
    /// it has something).
    Nak,
    /// STALL: the endpoint is halted, or the request is not supported
    /// (a control "request error", 9.2.7).
    Stall,
    /// The device sent more than the buffer holds.
    Babble,
    /// No handshake: no device answered, or the transaction failed (a
    /// timeout or CRC error on a real bus).
    Error,
}

/// The guest buffer was not readable or writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataError;

/// The host's buffer of one transfer: where IN data goes and OUT data comes
/// from, addressed by offsets from its start. A host controller passes
/// guest memory ([`GuestData`]: a UHCI TD's buffer, an xHCI TD's scatter
/// list) so devices copy straight to and from the guest; control transfers
/// reassembled from packets use a host buffer ([`VecData`]).
pub trait PacketData {
    /// The buffer's size in bytes: what an IN transfer may fill, what an
    /// OUT transfer carries.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// IN: stores `data` at `offset` of the host's buffer.
    fn copy_to_host(&mut self, offset: usize, data: &[u8]) -> Result<(), DataError>;
    /// OUT: fills `buf` from `offset` of the host's buffer.
    fn copy_from_host(&self, offset: usize, buf: &mut [u8]) -> Result<(), DataError>;
}

/// A transfer buffer in host memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VecData(pub Vec<u8>);

impl VecData {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        VecData(vec![0; len])
    }
}

impl PacketData for VecData {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn copy_to_host(&mut self, offset: usize, data: &[u8]) -> Result<(), DataError> {
        let end = offset.checked_add(data.len()).ok_or(DataError)?;
        self.0
            .get_mut(offset..end)
            .ok_or(DataError)?
            .copy_from_slice(data);
        Ok(())
    }
    fn copy_from_host(&self, offset: usize, buf: &mut [u8]) -> Result<(), DataError> {
        let end = offset.checked_add(buf.len()).ok_or(DataError)?;
        buf.copy_from_slice(self.0.get(offset..end).ok_or(DataError)?);
        Ok(())
    }
}

/// A transfer buffer in guest memory: a checked scatter list (every
/// segment was checked to be RAM when it was pushed).
pub struct GuestData<'a> {
    pub mem: &'a GuestMem,
    pub sg: &'a GuestSgList,
}

impl PacketData for GuestData<'_> {
    fn len(&self) -> usize {
        usize::try_from(self.sg.len()).unwrap_or(usize::MAX)
    }
    fn copy_to_host(&mut self, offset: usize, data: &[u8]) -> Result<(), DataError> {
        self.sg
            .write_at(self.mem, offset as u64, data)
            .map_err(|_| DataError)
    }
    fn copy_from_host(&self, offset: usize, buf: &mut [u8]) -> Result<(), DataError> {
        self.sg
            .read_at(self.mem, offset as u64, buf)
            .map_err(|_| DataError)
    }
}

/// Called by a device when an endpoint it NAKed has something (data,
/// room, a status): the controller retries that endpoint.
///
/// It may run on any thread (an I/O completion) and even inside the
/// device's own `handle_*` call, so it must not take a lock the host
/// controller holds while calling into the device: set a flag, write an
/// eventfd, queue the endpoint.
pub type Wakeup = Arc<dyn Fn(Endpoint) + Send + Sync>;

/// A USB device function as a host controller sees it (USB 2.0 ch. 9).
///
/// The controller routes by address: a packet-level controller (UHCI,
/// EHCI) offers each transaction to the device whose [`UsbDevice::address`]
/// matches the token; xHCI assigns addresses itself and drives a device
/// slot directly.
pub trait UsbDevice: Send {
    /// The speeds the device can run at; the port picks the fastest one
    /// it supports ([`UsbDevice::set_speed`]).
    fn speeds(&self) -> &[Speed];
    /// Sets the speed the device runs at (on attach, before anything
    /// else): its descriptors follow it.
    fn set_speed(&mut self, speed: Speed);
    /// The speed it runs at.
    fn speed(&self) -> Speed;
    /// The device address (0 until SET_ADDRESS).
    fn address(&self) -> u8;
    /// A USB bus reset (port reset, 7.1.7.5): back to the Default state,
    /// address 0, unconfigured; transfers in progress are dropped.
    fn reset(&mut self);
    /// Registers (or, with `None`, removes) the controller's wakeup.
    fn set_wakeup(&mut self, wakeup: Option<Wakeup>);
    /// One control transfer on endpoint 0: `setup` and its data stage
    /// (`data` holds wLength bytes: OUT data to read, or room for IN
    /// data). Returns the IN bytes written ([`UsbResult::Ack`]), NAK (not
    /// yet: the controller asks again with the same request), or STALL.
    fn handle_control(&mut self, setup: &SetupPacket, data: &mut dyn PacketData) -> UsbResult;
    /// A data transfer on endpoint `ep` (not 0); `stream` is the
    /// SuperSpeed stream id, 0 without streams.
    fn handle_data(&mut self, ep: Endpoint, stream: u32, data: &mut dyn PacketData) -> UsbResult;
}

/// A host controller's root connectors as the machine plugs devices in
/// and out (`-device usb-*`, hotplug): UHCI, EHCI and xHCI alike.
/// Connector `index` is QEMU's `port=` minus one.
pub trait RootPorts: Send {
    /// Connects `dev` to connector `index`: a connect the driver sees.
    fn plug(&mut self, index: usize, dev: Box<dyn UsbDevice>) -> Result<(), String>;
    /// Disconnects what is on connector `index`.
    fn unplug(&mut self, index: usize) -> Option<Box<dyn UsbDevice>>;
    /// Takes a UHCI as the companion of connectors `firstport..` (QEMU's
    /// `masterbus=`); only an EHCI has companions.
    fn add_companion(
        &mut self,
        _firstport: usize,
        _companion: ehci::CompanionHandle,
    ) -> Result<(), String> {
        Err("the masterbus is not an EHCI bus".into())
    }
}

impl RootPorts for Uhci {
    fn plug(&mut self, index: usize, dev: Box<dyn UsbDevice>) -> Result<(), String> {
        self.attach(index, dev)
    }
    fn unplug(&mut self, index: usize) -> Option<Box<dyn UsbDevice>> {
        self.detach(index)
    }
}

impl RootPorts for ehci::Ehci {
    fn plug(&mut self, index: usize, dev: Box<dyn UsbDevice>) -> Result<(), String> {
        self.attach(index, dev)
    }
    fn unplug(&mut self, index: usize) -> Option<Box<dyn UsbDevice>> {
        self.detach(index)
    }
    fn add_companion(
        &mut self,
        firstport: usize,
        companion: ehci::CompanionHandle,
    ) -> Result<(), String> {
        self.register_companion(firstport, companion)
    }
}

impl RootPorts for xhci::Xhci {
    fn plug(&mut self, index: usize, dev: Box<dyn UsbDevice>) -> Result<(), String> {
        self.attach(index, dev).map(|_| ())
    }
    fn unplug(&mut self, index: usize) -> Option<Box<dyn UsbDevice>> {
        self.detach(index)
    }
}

/// The fastest speed in both lists (the device's and the port's).
pub fn best_speed(device: &[Speed], port: &[Speed]) -> Option<Speed> {
    device.iter().copied().filter(|s| port.contains(s)).max()
}

#[cfg(test)]
mod tests;
