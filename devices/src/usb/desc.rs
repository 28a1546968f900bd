//! Standard descriptors as typed structs, serialised to the bytes
//! GET_DESCRIPTOR returns (USB 2.0 9.5 and 9.6: device 9.6.1, device
//! qualifier 9.6.2, configuration 9.6.3, other-speed configuration 9.6.4,
//! interface 9.6.5, endpoint 9.6.6, string 9.6.7; USB 3.2 9.6.2 BOS with
//! the USB 2.0 extension and SuperSpeed device capabilities, 9.6.7 the
//! SuperSpeed endpoint companion).
//!
//! A device describes itself once per speed it supports
//! ([`SpeedDescriptors`]): high-speed bulk endpoints have a wMaxPacketSize
//! of 512, SuperSpeed ones 1024 with a companion descriptor, and
//! bMaxPacketSize0 differs (8 or 64, or the exponent 9 at SuperSpeed).
//! [`Descriptors`] holds them with the strings, and answers for the speed
//! the device runs at.

use super::Speed;

pub mod kind {
    pub const DEVICE: u8 = 1;
    pub const CONFIGURATION: u8 = 2;
    pub const STRING: u8 = 3;
    pub const INTERFACE: u8 = 4;
    pub const ENDPOINT: u8 = 5;
    pub const DEVICE_QUALIFIER: u8 = 6;
    pub const OTHER_SPEED_CONFIGURATION: u8 = 7;
    pub const BOS: u8 = 15;
    pub const DEVICE_CAPABILITY: u8 = 16;
    pub const SS_ENDPOINT_COMPANION: u8 = 48;
}

/// bmAttributes transfer types (9.6.6).
pub mod xfer {
    pub const CONTROL: u8 = 0;
    pub const ISOCHRONOUS: u8 = 1;
    pub const BULK: u8 = 2;
    pub const INTERRUPT: u8 = 3;
}

/// Configuration bmAttributes: bit 7 is reserved and must be one; bit 6
/// self-powered; bit 5 remote wakeup.
pub const CONFIG_ONE: u8 = 0x80;
pub const CONFIG_SELF_POWERED: u8 = 0x40;
pub const CONFIG_REMOTE_WAKEUP: u8 = 0x20;

/// The longest string a descriptor can hold: bLength is a byte, two of
/// them the header, the rest UTF-16 code units.
const MAX_STRING_UNITS: usize = 126;

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeviceDescriptor {
    pub bcd_usb: u16,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub max_packet0: u8,
    pub vendor: u16,
    pub product: u16,
    pub bcd_device: u16,
    /// String indexes (0: none).
    pub i_manufacturer: u8,
    pub i_product: u8,
    pub i_serial: u8,
    pub num_configurations: u8,
}

impl DeviceDescriptor {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![18, kind::DEVICE];
        v.extend_from_slice(&self.bcd_usb.to_le_bytes());
        v.extend_from_slice(&[self.class, self.subclass, self.protocol, self.max_packet0]);
        v.extend_from_slice(&self.vendor.to_le_bytes());
        v.extend_from_slice(&self.product.to_le_bytes());
        v.extend_from_slice(&self.bcd_device.to_le_bytes());
        v.extend_from_slice(&[
            self.i_manufacturer,
            self.i_product,
            self.i_serial,
            self.num_configurations,
        ]);
        v
    }

    /// The device qualifier (9.6.2) that describes this device at its
    /// other speed.
    pub fn qualifier_bytes(&self) -> Vec<u8> {
        let mut v = vec![10, kind::DEVICE_QUALIFIER];
        v.extend_from_slice(&self.bcd_usb.to_le_bytes());
        v.extend_from_slice(&[
            self.class,
            self.subclass,
            self.protocol,
            self.max_packet0,
            self.num_configurations,
            0,
        ]);
        v
    }
}

/// The SuperSpeed endpoint companion (USB 3.2 9.6.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SsCompanion {
    /// Packets per burst minus one (0..=15).
    pub max_burst: u8,
    /// Bulk: MaxStreams exponent in bits 4..0.
    pub attributes: u8,
    pub bytes_per_interval: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct EndpointDescriptor {
    /// bEndpointAddress: bit 7 IN.
    pub address: u8,
    /// bmAttributes: transfer type in bits 1..0 ([`xfer`]).
    pub attributes: u8,
    pub max_packet: u16,
    pub interval: u8,
    /// Required at SuperSpeed, absent below.
    pub companion: Option<SsCompanion>,
}

impl EndpointDescriptor {
    /// A bulk endpoint.
    pub fn bulk(address: u8, max_packet: u16) -> Self {
        EndpointDescriptor {
            address,
            attributes: xfer::BULK,
            max_packet,
            interval: 0,
            companion: None,
        }
    }

    pub fn transfer_type(&self) -> u8 {
        self.attributes & 3
    }

    fn write(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&[7, kind::ENDPOINT, self.address, self.attributes]);
        v.extend_from_slice(&self.max_packet.to_le_bytes());
        v.push(self.interval);
        if let Some(c) = self.companion {
            v.extend_from_slice(&[6, kind::SS_ENDPOINT_COMPANION, c.max_burst, c.attributes]);
            v.extend_from_slice(&c.bytes_per_interval.to_le_bytes());
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct InterfaceDescriptor {
    pub number: u8,
    pub alt: u8,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub i_interface: u8,
    pub endpoints: Vec<EndpointDescriptor>,
    /// Class-specific descriptors that follow the interface descriptor
    /// (HID, UAS pipe usage), already serialised.
    pub extra: Vec<u8>,
}

impl InterfaceDescriptor {
    fn write(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&[
            9,
            kind::INTERFACE,
            self.number,
            self.alt,
            self.endpoints.len().min(255) as u8,
            self.class,
            self.subclass,
            self.protocol,
            self.i_interface,
        ]);
        v.extend_from_slice(&self.extra);
        for e in &self.endpoints {
            e.write(v);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConfigDescriptor {
    /// bConfigurationValue (not 0: 0 means "unconfigured").
    pub value: u8,
    pub i_configuration: u8,
    pub attributes: u8,
    /// In 2 mA units (8 mA at SuperSpeed).
    pub max_power: u8,
    /// Every alternate setting of every interface.
    pub interfaces: Vec<InterfaceDescriptor>,
}

impl ConfigDescriptor {
    /// The configuration with its interfaces and endpoints, as
    /// GET_DESCRIPTOR(CONFIGURATION) returns it; `kind` is
    /// [`kind::CONFIGURATION`] or [`kind::OTHER_SPEED_CONFIGURATION`].
    pub fn to_bytes(&self, kind: u8) -> Vec<u8> {
        let mut v = vec![9, kind, 0, 0];
        // bNumInterfaces counts interfaces, not alternate settings.
        let mut numbers: Vec<u8> = self.interfaces.iter().map(|i| i.number).collect();
        numbers.sort_unstable();
        numbers.dedup();
        v.extend_from_slice(&[
            numbers.len() as u8,
            self.value,
            self.i_configuration,
            self.attributes | CONFIG_ONE,
            self.max_power,
        ]);
        for i in &self.interfaces {
            i.write(&mut v);
        }
        let total = v.len().min(u16::MAX as usize) as u16;
        v[2..4].copy_from_slice(&total.to_le_bytes());
        v
    }

    /// The interface `number` in alternate setting `alt`.
    pub fn interface(&self, number: u8, alt: u8) -> Option<&InterfaceDescriptor> {
        self.interfaces
            .iter()
            .find(|i| i.number == number && i.alt == alt)
    }
}

/// What a device presents at one speed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SpeedDescriptors {
    pub device: DeviceDescriptor,
    pub configs: Vec<ConfigDescriptor>,
}

impl SpeedDescriptors {
    /// The configuration whose bConfigurationValue is `value`.
    pub fn config(&self, value: u8) -> Option<&ConfigDescriptor> {
        self.configs.iter().find(|c| c.value == value)
    }
}

/// Everything a device can describe, at every speed it supports.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Descriptors {
    pub low: Option<SpeedDescriptors>,
    pub full: Option<SpeedDescriptors>,
    pub high: Option<SpeedDescriptors>,
    pub super_speed: Option<SpeedDescriptors>,
    /// String `i` is `strings[i - 1]` (index 0 is the language list).
    pub strings: Vec<String>,
}

/// US English, the one language offered (9.6.7, USB LANGIDs).
pub const LANG_EN_US: u16 = 0x0409;

impl Descriptors {
    /// The speeds described, slowest first.
    pub fn speeds(&self) -> Vec<Speed> {
        [
            (Speed::Low, &self.low),
            (Speed::Full, &self.full),
            (Speed::High, &self.high),
            (Speed::Super, &self.super_speed),
        ]
        .into_iter()
        .filter(|(_, d)| d.is_some())
        .map(|(s, _)| s)
        .collect()
    }

    pub fn at(&self, speed: Speed) -> Option<&SpeedDescriptors> {
        match speed {
            Speed::Low => self.low.as_ref(),
            Speed::Full => self.full.as_ref(),
            Speed::High => self.high.as_ref(),
            Speed::Super => self.super_speed.as_ref(),
        }
    }

    /// The other speed of a high-speed capable device (9.6.2): high when
    /// running at full speed and full when at high; none otherwise.
    pub fn other_speed(&self, speed: Speed) -> Option<&SpeedDescriptors> {
        match speed {
            Speed::Full => self.high.as_ref(),
            Speed::High => self.full.as_ref(),
            _ => None,
        }
    }

    /// Sets string `index` (1-based), growing the table.
    pub fn set_string(&mut self, index: u8, s: &str) {
        let i = index as usize;
        if i == 0 {
            return;
        }
        if self.strings.len() < i {
            self.strings.resize(i, String::new());
        }
        self.strings[i - 1] = s.to_string();
    }

    /// String descriptor `index` (0: the language list). Any language is
    /// answered in English, as most devices do. `None` for a string the
    /// device does not have.
    pub fn string(&self, index: u8, _lang: u16) -> Option<Vec<u8>> {
        if index == 0 {
            let l = LANG_EN_US.to_le_bytes();
            return Some(vec![4, kind::STRING, l[0], l[1]]);
        }
        let s = self.strings.get(index as usize - 1)?;
        let units: Vec<u16> = s.encode_utf16().take(MAX_STRING_UNITS).collect();
        let mut v = vec![(2 + 2 * units.len()) as u8, kind::STRING];
        for u in units {
            v.extend_from_slice(&u.to_le_bytes());
        }
        Some(v)
    }

    /// The BOS descriptor (USB 3.2 9.6.2): a USB 2.0 extension capability,
    /// and the SuperSpeed capability for a device that has SuperSpeed
    /// descriptors.
    pub fn bos(&self) -> Vec<u8> {
        let mut v = vec![5, kind::BOS, 0, 0, 1];
        // USB 2.0 extension (9.6.2.1): no LPM.
        v.extend_from_slice(&[7, kind::DEVICE_CAPABILITY, 2, 0, 0, 0, 0]);
        if self.super_speed.is_some() {
            v[4] = 2;
            let speeds = self
                .speeds()
                .iter()
                .map(|s| match s {
                    Speed::Low => 1u16,
                    Speed::Full => 2,
                    Speed::High => 4,
                    Speed::Super => 8,
                })
                .fold(0, |a, b| a | b);
            // SuperSpeed USB device capability (9.6.2.2): full
            // functionality from full speed up; U1/U2 exit latencies of
            // 10 us and 32 us.
            v.extend_from_slice(&[10, kind::DEVICE_CAPABILITY, 3, 0]);
            v.extend_from_slice(&speeds.to_le_bytes());
            v.extend_from_slice(&[1, 0x0a, 0x20, 0x00]);
        }
        let total = v.len() as u16;
        v[2..4].copy_from_slice(&total.to_le_bytes());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Descriptors {
        let iface = |mps: u16, comp: Option<SsCompanion>| InterfaceDescriptor {
            number: 0,
            class: 8,
            subclass: 6,
            protocol: 0x50,
            endpoints: vec![
                EndpointDescriptor {
                    companion: comp,
                    ..EndpointDescriptor::bulk(0x81, mps)
                },
                EndpointDescriptor {
                    companion: comp,
                    ..EndpointDescriptor::bulk(0x02, mps)
                },
            ],
            ..Default::default()
        };
        let at = |bcd: u16, mp0: u8, mps: u16, comp| SpeedDescriptors {
            device: DeviceDescriptor {
                bcd_usb: bcd,
                max_packet0: mp0,
                vendor: 0x46f4,
                product: 1,
                num_configurations: 1,
                ..Default::default()
            },
            configs: vec![ConfigDescriptor {
                value: 1,
                attributes: CONFIG_SELF_POWERED,
                interfaces: vec![iface(mps, comp)],
                ..Default::default()
            }],
        };
        Descriptors {
            full: Some(at(0x200, 8, 64, None)),
            high: Some(at(0x200, 64, 512, None)),
            super_speed: Some(at(
                0x300,
                9,
                1024,
                Some(SsCompanion {
                    max_burst: 15,
                    ..Default::default()
                }),
            )),
            strings: vec!["QEMU".into()],
            ..Default::default()
        }
    }

    #[test]
    fn layouts() {
        let d = sample();
        let dev = d.at(Speed::Full).unwrap().device.to_bytes();
        assert_eq!(dev.len(), 18);
        assert_eq!(&dev[..2], &[18, 1]);
        assert_eq!(&dev[8..10], &[0xf4, 0x46]);
        let cfg = d.at(Speed::Full).unwrap().configs[0].to_bytes(kind::CONFIGURATION);
        assert_eq!(cfg.len(), 9 + 9 + 7 + 7);
        assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]) as usize, cfg.len());
        assert_eq!((cfg[4], cfg[7]), (1, 0xc0));
        assert_eq!(&cfg[18..25], &[7, 5, 0x81, 2, 64, 0, 0]);
        let hs = d.at(Speed::High).unwrap().configs[0].to_bytes(kind::CONFIGURATION);
        assert_eq!(&hs[18..25], &[7, 5, 0x81, 2, 0, 2, 0], "512 at high speed");
        let ss = d.at(Speed::Super).unwrap().configs[0].to_bytes(kind::CONFIGURATION);
        assert_eq!(ss.len(), 9 + 9 + 2 * (7 + 6));
        assert_eq!(&ss[18..31], &[7, 5, 0x81, 2, 0, 4, 0, 6, 48, 15, 0, 0, 0]);
        assert_eq!(d.string(0, 0).unwrap(), vec![4, 3, 9, 4]);
        assert_eq!(
            d.string(1, 0x409).unwrap(),
            vec![10, 3, b'Q', 0, b'E', 0, b'M', 0, b'U', 0]
        );
        assert_eq!(d.string(2, 0x409), None);
        let bos = d.bos();
        assert_eq!(bos.len(), 5 + 7 + 10);
        assert_eq!((bos[2], bos[4]), (22, 2));
        assert_eq!(d.speeds(), vec![Speed::Full, Speed::High, Speed::Super]);
    }

    #[test]
    fn long_strings_are_cut() {
        let mut d = Descriptors::default();
        d.set_string(3, &"x".repeat(1000));
        let s = d.string(3, 0).unwrap();
        assert_eq!(s.len(), 254);
        assert_eq!(s[0], 254);
        assert_eq!(d.string(1, 0).unwrap(), vec![2, 3], "an empty string");
    }
}
