//! `usb-tablet`: a USB HID absolute pointing device, QEMU's tablet (0627:0001).
//!
//! Specs followed: Device Class Definition for Human Interface Devices
//! (HID) 1.11: 6.2.1 (the HID descriptor), 6.2.2 (the report
//! descriptor and its items), 7.1 (GET_DESCRIPTOR for class descriptors
//! on the interface), 7.2 (the class requests GET_REPORT, GET_IDLE,
//! SET_IDLE, GET_PROTOCOL, SET_PROTOCOL); USB 2.0 9.6 for the standard
//! descriptors ([`super::desc`]).
//!
//! Strata has no display or input source, so the pointer never moves:
//! the tablet enumerates, answers its class requests and reports its one
//! state (at the origin, no button) once after it is configured; its
//! interrupt endpoint NAKs after that, as a tablet with nothing to
//! report does. It is here because guests and QEMU's own tests plug it
//! in as the everyday USB device (a hot-plug, a port status to see).

use super::core::{Handled, UsbDeviceCore};
use super::desc::{
    self, ConfigDescriptor, Descriptors, DeviceDescriptor, EndpointDescriptor, InterfaceDescriptor,
    SpeedDescriptors,
};
use super::{Dir, Endpoint, PacketData, SetupPacket, Speed, UsbDevice, UsbResult, Wakeup};

pub const VENDOR_ID: u16 = 0x0627;
pub const PRODUCT_ID: u16 = 0x0001;
/// The interrupt IN endpoint that carries reports.
pub const EP_REPORT: Endpoint = Endpoint::new(1, Dir::In);

const STR_MANUFACTURER: u8 = 1;
const STR_PRODUCT: u8 = 2;
const STR_SERIAL: u8 = 3;

/// HID descriptor types (HID 1.11 7.1).
const DESC_HID: u8 = 0x21;
const DESC_REPORT: u8 = 0x22;

/// HID class requests (HID 1.11 7.2).
const GET_REPORT: u8 = 0x01;
const GET_IDLE: u8 = 0x02;
const GET_PROTOCOL: u8 = 0x03;
const SET_IDLE: u8 = 0x0a;
const SET_PROTOCOL: u8 = 0x0b;

/// The report descriptor: one application collection, a pointer with
/// three buttons (padded to a byte), absolute X and Y of 0..=32767 in
/// 16 bits each, and a relative wheel byte: 6-byte input reports.
const REPORT_DESCRIPTOR: &[u8] = &[
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x02, // Usage (Mouse)
    0xa1, 0x01, // Collection (Application)
    0x09, 0x01, //   Usage (Pointer)
    0xa1, 0x00, //   Collection (Physical)
    0x05, 0x09, //     Usage Page (Button)
    0x19, 0x01, //     Usage Minimum (1)
    0x29, 0x03, //     Usage Maximum (3)
    0x15, 0x00, //     Logical Minimum (0)
    0x25, 0x01, //     Logical Maximum (1)
    0x95, 0x03, //     Report Count (3)
    0x75, 0x01, //     Report Size (1)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x95, 0x01, //     Report Count (1)
    0x75, 0x05, //     Report Size (5)
    0x81, 0x01, //     Input (Constant): padding
    0x05, 0x01, //     Usage Page (Generic Desktop)
    0x09, 0x30, //     Usage (X)
    0x09, 0x31, //     Usage (Y)
    0x15, 0x00, //     Logical Minimum (0)
    0x26, 0xff, 0x7f, // Logical Maximum (32767)
    0x35, 0x00, //     Physical Minimum (0)
    0x46, 0xff, 0x7f, // Physical Maximum (32767)
    0x75, 0x10, //     Report Size (16)
    0x95, 0x02, //     Report Count (2)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x09, 0x38, //     Usage (Wheel)
    0x15, 0x81, //     Logical Minimum (-127)
    0x25, 0x7f, //     Logical Maximum (127)
    0x35, 0x00, //     Physical Minimum (0)
    0x45, 0x00, //     Physical Maximum (0)
    0x75, 0x08, //     Report Size (8)
    0x95, 0x01, //     Report Count (1)
    0x81, 0x06, //     Input (Data, Variable, Relative)
    0xc0, //       End Collection
    0xc0, // End Collection
];

/// One input report: buttons, X, Y (little-endian), wheel.
const REPORT_LEN: usize = 6;

/// The HID descriptor (HID 1.11 6.2.1) naming the report descriptor.
fn hid_descriptor() -> Vec<u8> {
    let len = REPORT_DESCRIPTOR.len() as u16;
    let mut v = vec![9, DESC_HID, 0x01, 0x01, 0, 1, DESC_REPORT];
    v.extend_from_slice(&len.to_le_bytes());
    v
}

/// Full speed always; high speed too unless `usb_version=1`.
pub fn descriptors(high_speed: bool) -> Descriptors {
    let at = |bcd_usb: u16, max_packet0: u8, interval: u8| SpeedDescriptors {
        device: DeviceDescriptor {
            bcd_usb,
            max_packet0,
            vendor: VENDOR_ID,
            product: PRODUCT_ID,
            i_manufacturer: STR_MANUFACTURER,
            i_product: STR_PRODUCT,
            i_serial: STR_SERIAL,
            num_configurations: 1,
            ..Default::default()
        },
        configs: vec![ConfigDescriptor {
            value: 1,
            i_configuration: 0,
            attributes: desc::CONFIG_REMOTE_WAKEUP,
            max_power: 50,
            interfaces: vec![InterfaceDescriptor {
                number: 0,
                alt: 0,
                class: 0x03,
                subclass: 0,
                protocol: 0,
                i_interface: 0,
                endpoints: vec![EndpointDescriptor {
                    address: EP_REPORT.address(),
                    attributes: desc::xfer::INTERRUPT,
                    max_packet: 8,
                    interval,
                    companion: None,
                }],
                extra: hid_descriptor(),
            }],
        }],
    };
    let mut d = Descriptors {
        low: None,
        // Full speed polls every 10 frames; high speed's bInterval is an
        // exponent (2^(4-1) microframes: 1 ms).
        full: Some(at(0x0110, 8, 10)),
        high: high_speed.then(|| at(0x0200, 64, 4)),
        super_speed: None,
        strings: Vec::new(),
    };
    d.set_string(STR_MANUFACTURER, "QEMU");
    d.set_string(STR_PRODUCT, "QEMU USB Tablet");
    d.set_string(STR_SERIAL, "28754");
    d
}

/// The tablet.
pub struct UsbTablet {
    core: UsbDeviceCore,
    speeds: Vec<Speed>,
    /// A report the host has not read yet.
    pending: bool,
    /// SET_IDLE's duration (4 ms units) and SET_PROTOCOL's choice.
    idle: u8,
    protocol: u8,
}

impl UsbTablet {
    /// A tablet; `high_speed` as QEMU's `usb_version=2` (the default).
    pub fn new(high_speed: bool) -> Self {
        let descs = descriptors(high_speed);
        UsbTablet {
            speeds: descs.speeds(),
            core: UsbDeviceCore::new(descs),
            pending: false,
            idle: 0,
            protocol: 1,
        }
    }

    fn report() -> [u8; REPORT_LEN] {
        [0; REPORT_LEN]
    }

    fn class_request(&mut self, s: &SetupPacket, data: &mut dyn PacketData) -> UsbResult {
        let reply = |data: &mut dyn PacketData, b: &[u8]| {
            let n = b.len().min(s.length as usize);
            match data.copy_to_host(0, &b[..n]) {
                Ok(()) => UsbResult::Ack(n),
                Err(_) => UsbResult::Error,
            }
        };
        match (s.request_type, s.request) {
            (0xa1, GET_REPORT) => reply(data, &Self::report()),
            (0xa1, GET_IDLE) => reply(data, &[self.idle]),
            (0xa1, GET_PROTOCOL) => reply(data, &[self.protocol]),
            (0x21, SET_IDLE) => {
                self.idle = (s.value >> 8) as u8;
                UsbResult::Ack(0)
            }
            (0x21, SET_PROTOCOL) => {
                self.protocol = (s.value & 1) as u8;
                UsbResult::Ack(0)
            }
            // No output or feature reports.
            _ => UsbResult::Stall,
        }
    }
}

impl UsbDevice for UsbTablet {
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
        self.pending = false;
        self.idle = 0;
        self.protocol = 1;
    }
    /// Nothing ever changes, so the tablet never has to wake the host.
    fn set_wakeup(&mut self, _wakeup: Option<Wakeup>) {}

    fn handle_control(&mut self, setup: &SetupPacket, data: &mut dyn PacketData) -> UsbResult {
        // GET_DESCRIPTOR of the HID class descriptors on the interface
        // (HID 1.11 7.1): a standard request the core does not know.
        if setup.request_type == 0x81 && setup.request == 6 && setup.index == 0 {
            let bytes = match (setup.value >> 8) as u8 {
                DESC_REPORT => REPORT_DESCRIPTOR.to_vec(),
                DESC_HID => hid_descriptor(),
                _ => return UsbResult::Stall,
            };
            let n = bytes.len().min(setup.length as usize);
            return match data.copy_to_host(0, &bytes[..n]) {
                Ok(()) => UsbResult::Ack(n),
                Err(_) => UsbResult::Error,
            };
        }
        match self.core.handle_control(setup, data) {
            Handled::Done(r, ev) => {
                if matches!(ev, super::core::Event::Configured(c) if c != 0) {
                    // The state the host has not seen yet.
                    self.pending = true;
                }
                r
            }
            Handled::Class(s) => self.class_request(&s, data),
            Handled::Vendor(_) => UsbResult::Stall,
        }
    }

    fn handle_data(&mut self, ep: Endpoint, stream: u32, data: &mut dyn PacketData) -> UsbResult {
        if let Err(r) = self.core.check_data(ep) {
            return r;
        }
        if ep != EP_REPORT || stream != 0 {
            return UsbResult::Stall;
        }
        if !self.pending {
            return UsbResult::Nak;
        }
        let r = Self::report();
        let n = r.len().min(data.len());
        if data.copy_to_host(0, &r[..n]).is_err() {
            return UsbResult::Error;
        }
        self.pending = false;
        UsbResult::Ack(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usb::VecData;

    fn control(t: &mut UsbTablet, setup: [u8; 8]) -> (UsbResult, Vec<u8>) {
        let s = SetupPacket::parse(&setup);
        let mut d = VecData::new(s.length as usize);
        let r = t.handle_control(&s, &mut d);
        (r, d.0)
    }

    #[test]
    fn enumerates_and_reports_once() {
        let mut t = UsbTablet::new(true);
        assert_eq!(t.speeds(), &[Speed::Full, Speed::High]);
        t.set_speed(Speed::Full);
        let (r, dev) = control(&mut t, [0x80, 6, 0, 1, 0, 0, 18, 0]);
        assert_eq!(r, UsbResult::Ack(18));
        assert_eq!(&dev[8..12], &[0x27, 0x06, 0x01, 0x00], "0627:0001");
        let (r, cfg) = control(&mut t, [0x80, 6, 0, 2, 0, 0, 255, 0]);
        let UsbResult::Ack(n) = r else {
            panic!("{r:?}")
        };
        // config + interface + HID + endpoint.
        assert_eq!(n, 9 + 9 + 9 + 7);
        assert_eq!(cfg[18..20], [9, DESC_HID]);
        let (r, rep) = control(&mut t, [0x81, 6, 0, DESC_REPORT, 0, 0, 255, 0]);
        assert_eq!(r, UsbResult::Ack(REPORT_DESCRIPTOR.len()));
        assert_eq!(&rep[..REPORT_DESCRIPTOR.len()], REPORT_DESCRIPTOR);
        // Not configured: the endpoint does not answer.
        let mut d = VecData::new(8);
        assert_ne!(t.handle_data(EP_REPORT, 0, &mut d), UsbResult::Ack(6));
        assert_eq!(
            control(&mut t, [0, 9, 1, 0, 0, 0, 0, 0]).0,
            UsbResult::Ack(0)
        );
        assert_eq!(
            control(&mut t, [0x21, SET_IDLE, 0, 0, 0, 0, 0, 0]).0,
            UsbResult::Ack(0)
        );
        assert_eq!(t.handle_data(EP_REPORT, 0, &mut d), UsbResult::Ack(6));
        assert_eq!(t.handle_data(EP_REPORT, 0, &mut d), UsbResult::Nak);
        assert_eq!(
            control(&mut t, [0xa1, GET_REPORT, 0, 1, 0, 0, 6, 0]).0,
            UsbResult::Ack(6)
        );
        assert_eq!(
            control(&mut t, [0x21, 0x09, 0, 2, 0, 0, 1, 0]).0,
            UsbResult::Stall
        );
    }

    #[test]
    fn usb_version_1_is_full_speed_only() {
        assert_eq!(UsbTablet::new(false).speeds(), &[Speed::Full]);
    }
}
