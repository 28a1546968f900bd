//! The part of the USB device framework every device shares (USB 2.0
//! chapter 9): the device states of 9.1 (Default, Address, Configured),
//! the standard requests of 9.4 answered from typed descriptors
//! ([`super::desc`]), and the endpoint halt feature (9.4.5, 9.4.9: a
//! halted endpoint STALLs until CLEAR_FEATURE(ENDPOINT_HALT), SET_INTERFACE
//! or SET_CONFIGURATION).
//!
//! A device keeps a [`UsbDeviceCore`], hands every setup packet to
//! [`UsbDeviceCore::handle_control`], and implements only what comes back
//! as [`Handled::Class`] or [`Handled::Vendor`] and its data endpoints
//! (gated by [`UsbDeviceCore::check_data`]). The [`Event`] returned with
//! a standard request tells the device what changed (a halt cleared, a
//! configuration set), for class state that follows it.

use super::desc::{self, kind, ConfigDescriptor, Descriptors, EndpointDescriptor};
use super::setup::{feature, Request, SetupPacket, Standard, Target};
use super::{Dir, Endpoint, PacketData, Speed, UsbResult};

/// Interfaces tracked for alternate settings.
const MAX_INTERFACES: usize = 32;

/// What a standard request changed, for the device's own state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    None,
    AddressSet(u8),
    /// SET_CONFIGURATION (0: back to the Address state).
    Configured(u8),
    InterfaceSet {
        interface: u8,
        alt: u8,
    },
    HaltCleared(Endpoint),
    HaltSet(Endpoint),
}

/// The outcome of [`UsbDeviceCore::handle_control`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// A standard request, answered.
    Done(UsbResult, Event),
    /// A class request: the device's to answer.
    Class(SetupPacket),
    /// A vendor request: the device's to answer.
    Vendor(SetupPacket),
}

/// A device's standard state.
pub struct UsbDeviceCore {
    descs: Descriptors,
    speed: Speed,
    address: u8,
    /// bConfigurationValue, 0 while not configured.
    config: u8,
    alt: [u8; MAX_INTERFACES],
    /// Halted endpoints by [`Endpoint::index`].
    halted: u32,
    remote_wakeup: bool,
}

impl UsbDeviceCore {
    /// A device described by `descs`, running at its fastest speed until
    /// the port says otherwise.
    pub fn new(descs: Descriptors) -> Self {
        let speed = descs.speeds().last().copied().unwrap_or(Speed::Full);
        UsbDeviceCore {
            descs,
            speed,
            address: 0,
            config: 0,
            alt: [0; MAX_INTERFACES],
            halted: 0,
            remote_wakeup: false,
        }
    }

    pub fn descriptors(&self) -> &Descriptors {
        &self.descs
    }

    pub fn descriptors_mut(&mut self) -> &mut Descriptors {
        &mut self.descs
    }

    pub fn speed(&self) -> Speed {
        self.speed
    }

    /// Runs at `speed` from now on (ignored if not described).
    pub fn set_speed(&mut self, speed: Speed) {
        if self.descs.at(speed).is_some() {
            self.speed = speed;
        }
    }

    pub fn address(&self) -> u8 {
        self.address
    }

    /// The configuration value, 0 when not configured.
    pub fn configuration(&self) -> u8 {
        self.config
    }

    /// A bus reset: the Default state.
    pub fn reset(&mut self) {
        self.address = 0;
        self.config = 0;
        self.alt = [0; MAX_INTERFACES];
        self.halted = 0;
        self.remote_wakeup = false;
    }

    fn current_config(&self) -> Option<&ConfigDescriptor> {
        if self.config == 0 {
            return None;
        }
        self.descs.at(self.speed)?.config(self.config)
    }

    /// The descriptor of `ep` in the current configuration and alternate
    /// settings; endpoint 0 is not described this way.
    pub fn endpoint(&self, ep: Endpoint) -> Option<&EndpointDescriptor> {
        let c = self.current_config()?;
        c.interfaces
            .iter()
            .filter(|i| self.alt.get(i.number as usize).copied().unwrap_or(0) == i.alt)
            .flat_map(|i| i.endpoints.iter())
            .find(|e| e.address == ep.address())
    }

    /// The max packet size of `ep` (endpoint 0 included) at the current
    /// speed, 0 for an endpoint that does not exist now.
    pub fn max_packet(&self, ep: Endpoint) -> usize {
        if ep.number() == 0 {
            return match self.descs.at(self.speed) {
                // bMaxPacketSize0 is an exponent at SuperSpeed.
                Some(d) if self.speed == Speed::Super => 1usize << d.device.max_packet0.min(15),
                Some(d) => d.device.max_packet0 as usize,
                None => 0,
            };
        }
        self.endpoint(ep).map_or(0, |e| e.max_packet as usize)
    }

    fn valid(&self, ep: Endpoint) -> bool {
        ep.number() == 0 || self.endpoint(ep).is_some()
    }

    pub fn is_halted(&self, ep: Endpoint) -> bool {
        self.halted & (1 << ep.index()) != 0
    }

    /// Halts `ep`: it STALLs until the host clears the halt.
    pub fn halt(&mut self, ep: Endpoint) {
        self.halted |= 1 << ep.index();
    }

    pub fn clear_halt(&mut self, ep: Endpoint) {
        self.halted &= !(1 << ep.index());
    }

    /// Whether a data transfer on `ep` may go to the device: `Err(STALL)`
    /// when the device is not configured, the endpoint is not in the
    /// current configuration, or it is halted.
    pub fn check_data(&self, ep: Endpoint) -> Result<(), UsbResult> {
        if ep.number() == 0 || !self.valid(ep) || self.is_halted(ep) {
            return Err(UsbResult::Stall);
        }
        Ok(())
    }

    /// Parses and answers a setup packet; class and vendor requests come
    /// back to the caller.
    pub fn handle_control(&mut self, setup: &SetupPacket, data: &mut dyn PacketData) -> Handled {
        let std = match Request::parse(setup) {
            Request::Standard(s) => s,
            Request::Class(s) => return Handled::Class(s),
            Request::Vendor(s) => return Handled::Vendor(s),
            Request::Invalid => return Handled::Done(UsbResult::Stall, Event::None),
        };
        match self.standard(std, data) {
            Ok((r, e)) => Handled::Done(r, e),
            Err(r) => Handled::Done(r, Event::None),
        }
    }

    fn standard(
        &mut self,
        r: Standard,
        data: &mut dyn PacketData,
    ) -> Result<(UsbResult, Event), UsbResult> {
        let done = |e| Ok((UsbResult::Ack(0), e));
        match r {
            Standard::GetStatus(t) => {
                let v: u16 = match t {
                    Target::Device => {
                        let self_powered = self
                            .current_config()
                            .or_else(|| self.descs.at(self.speed)?.configs.first())
                            .is_some_and(|c| c.attributes & desc::CONFIG_SELF_POWERED != 0);
                        self_powered as u16 | (self.remote_wakeup as u16) << 1
                    }
                    Target::Interface(i) => {
                        let c = self.current_config().ok_or(UsbResult::Stall)?;
                        if !c.interfaces.iter().any(|x| x.number == i) {
                            return Err(UsbResult::Stall);
                        }
                        0
                    }
                    Target::Endpoint(e) => {
                        if !self.valid(e) {
                            return Err(UsbResult::Stall);
                        }
                        self.is_halted(e) as u16
                    }
                };
                Ok((reply(data, &v.to_le_bytes())?, Event::None))
            }
            Standard::ClearFeature { target, feature } => match (target, feature) {
                (Target::Endpoint(e), feature::ENDPOINT_HALT) if self.valid(e) => {
                    self.clear_halt(e);
                    done(Event::HaltCleared(e))
                }
                (Target::Device, feature::DEVICE_REMOTE_WAKEUP) => {
                    self.remote_wakeup = false;
                    done(Event::None)
                }
                _ => Err(UsbResult::Stall),
            },
            Standard::SetFeature { target, feature } => match (target, feature) {
                (Target::Endpoint(e), feature::ENDPOINT_HALT)
                    if e.number() != 0 && self.valid(e) =>
                {
                    self.halt(e);
                    done(Event::HaltSet(e))
                }
                (Target::Device, feature::DEVICE_REMOTE_WAKEUP) => {
                    self.remote_wakeup = true;
                    done(Event::None)
                }
                // Test modes concern the electrical layer: nothing to do.
                (Target::Device, feature::TEST_MODE) => done(Event::None),
                _ => Err(UsbResult::Stall),
            },
            Standard::SetAddress(a) => {
                self.address = a;
                done(Event::AddressSet(a))
            }
            Standard::GetDescriptor {
                kind: k,
                index,
                lang,
                len,
            } => {
                let bytes = self.descriptor(k, index, lang).ok_or(UsbResult::Stall)?;
                let n = bytes.len().min(len as usize);
                Ok((reply(data, &bytes[..n])?, Event::None))
            }
            Standard::SetDescriptor | Standard::SynchFrame(_) => Err(UsbResult::Stall),
            Standard::GetConfiguration => Ok((reply(data, &[self.config])?, Event::None)),
            Standard::SetConfiguration(v) => {
                if v != 0
                    && self
                        .descs
                        .at(self.speed)
                        .and_then(|d| d.config(v))
                        .is_none()
                {
                    return Err(UsbResult::Stall);
                }
                self.config = v;
                self.alt = [0; MAX_INTERFACES];
                self.halted = 0;
                done(Event::Configured(v))
            }
            Standard::GetInterface(i) => {
                let c = self.current_config().ok_or(UsbResult::Stall)?;
                if !c.interfaces.iter().any(|x| x.number == i) {
                    return Err(UsbResult::Stall);
                }
                let alt = self.alt.get(i as usize).copied().ok_or(UsbResult::Stall)?;
                Ok((reply(data, &[alt])?, Event::None))
            }
            Standard::SetInterface { interface, alt } => {
                let c = self.current_config().ok_or(UsbResult::Stall)?;
                let eps: Vec<u8> = c
                    .interfaces
                    .iter()
                    .filter(|x| x.number == interface)
                    .flat_map(|x| x.endpoints.iter().map(|e| e.address))
                    .collect();
                if c.interface(interface, alt).is_none() || interface as usize >= MAX_INTERFACES {
                    return Err(UsbResult::Stall);
                }
                self.alt[interface as usize] = alt;
                for a in eps {
                    self.clear_halt(Endpoint::from_address(a));
                }
                done(Event::InterfaceSet { interface, alt })
            }
            Standard::SetSel | Standard::SetIsochDelay(_) => done(Event::None),
        }
    }

    /// The bytes of a descriptor GET_DESCRIPTOR can ask for.
    fn descriptor(&self, k: u8, index: u8, lang: u16) -> Option<Vec<u8>> {
        let here = self.descs.at(self.speed)?;
        match k {
            kind::DEVICE => Some(here.device.to_bytes()),
            kind::CONFIGURATION => Some(
                here.configs
                    .get(index as usize)?
                    .to_bytes(kind::CONFIGURATION),
            ),
            kind::STRING => self.descs.string(index, lang),
            kind::DEVICE_QUALIFIER => {
                Some(self.descs.other_speed(self.speed)?.device.qualifier_bytes())
            }
            kind::OTHER_SPEED_CONFIGURATION => Some(
                self.descs
                    .other_speed(self.speed)?
                    .configs
                    .get(index as usize)?
                    .to_bytes(kind::OTHER_SPEED_CONFIGURATION),
            ),
            kind::BOS => Some(self.descs.bos()),
            _ => None,
        }
    }
}

/// IN data for the host, cut to its buffer.
fn reply(data: &mut dyn PacketData, bytes: &[u8]) -> Result<UsbResult, UsbResult> {
    let n = bytes.len().min(data.len());
    data.copy_to_host(0, &bytes[..n])
        .map_err(|_| UsbResult::Error)?;
    Ok(UsbResult::Ack(n))
}

/// Whether `setup` is a standard OUT request with no data stage (its
/// effect, such as a new address, applies when the status stage ends).
pub fn is_no_data(setup: &SetupPacket) -> bool {
    setup.dir() == Dir::Out && setup.length == 0
}
