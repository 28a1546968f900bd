//! The setup packet of a control transfer (USB 2.0 9.3, table 9-2) and the
//! standard device requests it can carry (9.4, tables 9-3 to 9-6; USB 3.2
//! 9.4.12-9.4.13 for SET_SEL and SET_ISOCH_DELAY).
//!
//! Parse, then execute: [`SetupPacket::parse`] takes the 8 bytes apart and
//! [`Request::parse`] turns a packet into a typed request, checking the
//! fields 9.4 fixes (direction, recipient, wValue/wIndex/wLength ranges),
//! before anything runs. A standard request whose fields are not what the
//! specification allows is [`Request::Invalid`], answered with a STALL
//! (9.2.7 "Request Error").

use super::{Dir, Endpoint};

/// bmRequestType bits 6..5 (table 9-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Standard,
    Class,
    Vendor,
    Reserved,
}

/// bmRequestType bits 4..0 (table 9-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipient {
    Device,
    Interface,
    Endpoint,
    Other,
    Reserved(u8),
}

/// The 8-byte setup packet, fields in host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SetupPacket {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
}

/// Standard request codes (table 9-4).
pub mod code {
    pub const GET_STATUS: u8 = 0;
    pub const CLEAR_FEATURE: u8 = 1;
    pub const SET_FEATURE: u8 = 3;
    pub const SET_ADDRESS: u8 = 5;
    pub const GET_DESCRIPTOR: u8 = 6;
    pub const SET_DESCRIPTOR: u8 = 7;
    pub const GET_CONFIGURATION: u8 = 8;
    pub const SET_CONFIGURATION: u8 = 9;
    pub const GET_INTERFACE: u8 = 10;
    pub const SET_INTERFACE: u8 = 11;
    pub const SYNCH_FRAME: u8 = 12;
    /// USB 3.2 9.4.12.
    pub const SET_SEL: u8 = 48;
    /// USB 3.2 9.4.13.
    pub const SET_ISOCH_DELAY: u8 = 49;
}

/// Standard feature selectors (table 9-6).
pub mod feature {
    pub const ENDPOINT_HALT: u16 = 0;
    pub const DEVICE_REMOTE_WAKEUP: u16 = 1;
    pub const TEST_MODE: u16 = 2;
}

impl SetupPacket {
    /// Takes the 8 bytes apart (little-endian words).
    pub fn parse(b: &[u8; 8]) -> Self {
        SetupPacket {
            request_type: b[0],
            request: b[1],
            value: u16::from_le_bytes([b[2], b[3]]),
            index: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    /// The 8 bytes.
    pub fn to_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.request_type;
        b[1] = self.request;
        b[2..4].copy_from_slice(&self.value.to_le_bytes());
        b[4..6].copy_from_slice(&self.index.to_le_bytes());
        b[6..8].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Direction of the data stage (bmRequestType bit 7).
    pub fn dir(&self) -> Dir {
        if self.request_type & 0x80 != 0 {
            Dir::In
        } else {
            Dir::Out
        }
    }

    pub fn kind(&self) -> RequestKind {
        match (self.request_type >> 5) & 3 {
            0 => RequestKind::Standard,
            1 => RequestKind::Class,
            2 => RequestKind::Vendor,
            _ => RequestKind::Reserved,
        }
    }

    pub fn recipient(&self) -> Recipient {
        match self.request_type & 0x1f {
            0 => Recipient::Device,
            1 => Recipient::Interface,
            2 => Recipient::Endpoint,
            3 => Recipient::Other,
            r => Recipient::Reserved(r),
        }
    }
}

/// What GET_STATUS, CLEAR_FEATURE and SET_FEATURE address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Device,
    Interface(u8),
    Endpoint(Endpoint),
}

/// A standard request, its fields checked (9.4.1-9.4.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standard {
    GetStatus(Target),
    ClearFeature {
        target: Target,
        feature: u16,
    },
    SetFeature {
        target: Target,
        feature: u16,
    },
    SetAddress(u8),
    /// Descriptor type, index, language id (strings), wLength.
    GetDescriptor {
        kind: u8,
        index: u8,
        lang: u16,
        len: u16,
    },
    SetDescriptor,
    GetConfiguration,
    SetConfiguration(u8),
    GetInterface(u8),
    SetInterface {
        interface: u8,
        alt: u8,
    },
    SynchFrame(Endpoint),
    SetSel,
    SetIsochDelay(u16),
}

/// A parsed setup packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Standard(Standard),
    /// Class and vendor requests are the device's to interpret.
    Class(SetupPacket),
    Vendor(SetupPacket),
    /// A standard request with fields 9.4 does not allow, or an unknown
    /// request code or type: STALL.
    Invalid,
}

impl Request {
    pub fn parse(s: &SetupPacket) -> Request {
        match s.kind() {
            RequestKind::Standard => match standard(s) {
                Some(r) => Request::Standard(r),
                None => Request::Invalid,
            },
            RequestKind::Class => Request::Class(*s),
            RequestKind::Vendor => Request::Vendor(*s),
            RequestKind::Reserved => Request::Invalid,
        }
    }
}

fn target(s: &SetupPacket) -> Option<Target> {
    match s.recipient() {
        Recipient::Device if s.index == 0 => Some(Target::Device),
        Recipient::Interface if s.index <= 0xff => Some(Target::Interface(s.index as u8)),
        // wIndex: the endpoint address, bits 6..4 and 15..8 reserved.
        Recipient::Endpoint if s.index & 0xff70 == 0 => {
            Some(Target::Endpoint(Endpoint::from_address(s.index as u8)))
        }
        _ => None,
    }
}

fn standard(s: &SetupPacket) -> Option<Standard> {
    use code::*;
    let dir = s.dir();
    let no_data = dir == Dir::Out && s.length == 0;
    let r = match s.request {
        GET_STATUS if dir == Dir::In && s.value == 0 && s.length == 2 => {
            Standard::GetStatus(target(s)?)
        }
        CLEAR_FEATURE if no_data => Standard::ClearFeature {
            target: target(s)?,
            feature: s.value,
        },
        SET_FEATURE if no_data => Standard::SetFeature {
            // TEST_MODE puts the test selector in wIndex's high byte.
            target: if s.value == feature::TEST_MODE && s.recipient() == Recipient::Device {
                Target::Device
            } else {
                target(s)?
            },
            feature: s.value,
        },
        SET_ADDRESS
            if no_data && s.recipient() == Recipient::Device && s.index == 0 && s.value <= 127 =>
        {
            Standard::SetAddress(s.value as u8)
        }
        GET_DESCRIPTOR if dir == Dir::In && s.recipient() == Recipient::Device => {
            Standard::GetDescriptor {
                kind: (s.value >> 8) as u8,
                index: s.value as u8,
                lang: s.index,
                len: s.length,
            }
        }
        SET_DESCRIPTOR if dir == Dir::Out => Standard::SetDescriptor,
        GET_CONFIGURATION
            if dir == Dir::In
                && s.recipient() == Recipient::Device
                && s.value == 0
                && s.index == 0
                && s.length == 1 =>
        {
            Standard::GetConfiguration
        }
        SET_CONFIGURATION
            if no_data && s.recipient() == Recipient::Device && s.index == 0 && s.value <= 0xff =>
        {
            Standard::SetConfiguration(s.value as u8)
        }
        GET_INTERFACE
            if dir == Dir::In
                && s.recipient() == Recipient::Interface
                && s.value == 0
                && s.index <= 0xff
                && s.length == 1 =>
        {
            Standard::GetInterface(s.index as u8)
        }
        SET_INTERFACE
            if no_data
                && s.recipient() == Recipient::Interface
                && s.index <= 0xff
                && s.value <= 0xff =>
        {
            Standard::SetInterface {
                interface: s.index as u8,
                alt: s.value as u8,
            }
        }
        SYNCH_FRAME if dir == Dir::In && s.recipient() == Recipient::Endpoint && s.length == 2 => {
            match target(s)? {
                Target::Endpoint(e) => Standard::SynchFrame(e),
                _ => return None,
            }
        }
        SET_SEL if dir == Dir::Out && s.length == 6 && s.value == 0 && s.index == 0 => {
            Standard::SetSel
        }
        SET_ISOCH_DELAY if no_data && s.index == 0 => Standard::SetIsochDelay(s.value),
        _ => return None,
    };
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(b: [u8; 8]) -> Request {
        Request::parse(&SetupPacket::parse(&b))
    }

    #[test]
    fn round_trip_and_fields() {
        let b = [0x80, 6, 0x00, 0x01, 0x09, 0x04, 0x12, 0x00];
        let s = SetupPacket::parse(&b);
        assert_eq!(s.to_bytes(), b);
        assert_eq!(
            (s.dir(), s.kind(), s.recipient()),
            (Dir::In, RequestKind::Standard, Recipient::Device)
        );
        assert_eq!(
            Request::parse(&s),
            Request::Standard(Standard::GetDescriptor {
                kind: 1,
                index: 0,
                lang: 0x409,
                len: 18
            })
        );
    }

    #[test]
    fn standard_requests_are_checked() {
        assert_eq!(
            req([0, 5, 7, 0, 0, 0, 0, 0]),
            Request::Standard(Standard::SetAddress(7))
        );
        assert_eq!(
            req([0, 5, 128, 0, 0, 0, 0, 0]),
            Request::Invalid,
            "address > 127"
        );
        assert_eq!(req([0x80, 5, 7, 0, 0, 0, 0, 0]), Request::Invalid, "IN");
        assert_eq!(
            req([0, 5, 7, 0, 0, 0, 1, 0]),
            Request::Invalid,
            "data stage"
        );
        assert_eq!(
            req([2, 1, 0, 0, 0x81, 0, 0, 0]),
            Request::Standard(Standard::ClearFeature {
                target: Target::Endpoint(Endpoint::new(1, Dir::In)),
                feature: feature::ENDPOINT_HALT
            })
        );
        assert_eq!(
            req([2, 1, 0, 0, 0x91, 0, 0, 0]),
            Request::Invalid,
            "reserved bits"
        );
        assert_eq!(
            req([0x80, 8, 0, 0, 0, 0, 1, 0]),
            Request::Standard(Standard::GetConfiguration)
        );
        assert_eq!(req([0x80, 8, 0, 0, 0, 0, 2, 0]), Request::Invalid);
        assert_eq!(
            req([0x80, 0, 0, 0, 0, 0, 2, 0]),
            Request::Standard(Standard::GetStatus(Target::Device))
        );
        assert_eq!(req([0x80, 99, 0, 0, 0, 0, 2, 0]), Request::Invalid);
        assert_eq!(
            req([0xe0, 0, 0, 0, 0, 0, 0, 0]),
            Request::Invalid,
            "reserved type"
        );
        let class = [0xa1, 0xfe, 0, 0, 0, 0, 1, 0];
        assert_eq!(req(class), Request::Class(SetupPacket::parse(&class)));
    }
}
