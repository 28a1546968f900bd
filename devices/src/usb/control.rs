//! Control transfers from packets (USB 2.0 8.5.3 "Control Transfers" and
//! 8.5.3.4 "STALL Handshakes Returned by Control Pipes"), for the host
//! controllers that see SETUP, IN and OUT transactions one by one (UHCI,
//! EHCI). xHCI hands a device whole control transfers and needs none of
//! this.
//!
//! [`ControlPipe`] keeps the default pipe's stage per device and turns the
//! packets into one [`UsbDevice::handle_control`] call:
//! - a request with an IN data stage runs when its SETUP arrives; its
//!   data is then served to the IN packets, and the OUT status packet
//!   ends it (a host may stop reading early, 8.5.3.2);
//! - a request with an OUT data stage, or none, runs at its IN status
//!   packet with the data gathered, so that SET_ADDRESS takes effect only
//!   after its status stage, as 9.4.6 requires (the status packet still
//!   goes to the old address);
//! - a NAK from the device NAKs the packet, which the host retries;
//! - a STALL is a protocol stall: every packet of the transfer STALLs
//!   until the next SETUP, which is always accepted (8.5.3).

use super::setup::SetupPacket;
use super::{Dir, PacketData, UsbDevice, UsbResult, VecData};

/// The token of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pid {
    Setup,
    In,
    Out,
}

#[derive(Debug, Default)]
enum Stage {
    #[default]
    Idle,
    /// The IN data the request returned, served from `pos`.
    DataIn {
        data: Vec<u8>,
        pos: usize,
    },
    /// An IN request the device NAKed: asked again at each IN packet.
    PendingIn(SetupPacket),
    /// An OUT (or no-data) request: data gathered until the status stage.
    DataOut {
        setup: SetupPacket,
        data: Vec<u8>,
    },
    Stalled,
}

/// The default control pipe of one device, as a packet-level controller
/// drives it.
#[derive(Debug, Default)]
pub struct ControlPipe {
    stage: Stage,
}

impl ControlPipe {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets any transfer in progress (bus reset, detach).
    pub fn reset(&mut self) {
        self.stage = Stage::Idle;
    }

    /// One transaction on endpoint 0 of `dev`.
    pub fn packet(
        &mut self,
        dev: &mut dyn UsbDevice,
        pid: Pid,
        buf: &mut dyn PacketData,
    ) -> UsbResult {
        match pid {
            Pid::Setup => self.setup(dev, buf),
            Pid::In => self.input(dev, buf),
            Pid::Out => self.output(buf),
        }
    }

    fn setup(&mut self, dev: &mut dyn UsbDevice, buf: &mut dyn PacketData) -> UsbResult {
        let mut b = [0u8; 8];
        if buf.len() != 8 || buf.copy_from_host(0, &mut b).is_err() {
            self.stage = Stage::Stalled;
            return UsbResult::Stall;
        }
        let setup = SetupPacket::parse(&b);
        self.stage = if setup.dir() == Dir::In && setup.length > 0 {
            Self::run_in(dev, setup)
        } else {
            Stage::DataOut {
                setup,
                data: Vec::new(),
            }
        };
        UsbResult::Ack(8)
    }

    fn run_in(dev: &mut dyn UsbDevice, setup: SetupPacket) -> Stage {
        let mut data = VecData::new(setup.length as usize);
        match dev.handle_control(&setup, &mut data) {
            UsbResult::Ack(n) => {
                data.0.truncate(n);
                Stage::DataIn {
                    data: data.0,
                    pos: 0,
                }
            }
            UsbResult::Nak => Stage::PendingIn(setup),
            _ => Stage::Stalled,
        }
    }

    fn input(&mut self, dev: &mut dyn UsbDevice, buf: &mut dyn PacketData) -> UsbResult {
        if let Stage::PendingIn(setup) = self.stage {
            self.stage = Self::run_in(dev, setup);
            if matches!(self.stage, Stage::PendingIn(_)) {
                return UsbResult::Nak;
            }
        }
        match &mut self.stage {
            Stage::DataIn { data, pos } => {
                let left = data.get(*pos..).unwrap_or(&[]);
                let n = left.len().min(buf.len());
                if buf.copy_to_host(0, &left[..n]).is_err() {
                    return UsbResult::Error;
                }
                *pos += n;
                UsbResult::Ack(n)
            }
            Stage::DataOut { setup, data } => {
                // The status stage of an OUT or no-data request: run it.
                let setup = *setup;
                let mut d = VecData(std::mem::take(data));
                match dev.handle_control(&setup, &mut d) {
                    UsbResult::Ack(_) => {
                        self.stage = Stage::Idle;
                        UsbResult::Ack(0)
                    }
                    UsbResult::Nak => {
                        self.stage = Stage::DataOut { setup, data: d.0 };
                        UsbResult::Nak
                    }
                    _ => {
                        self.stage = Stage::Stalled;
                        UsbResult::Stall
                    }
                }
            }
            _ => UsbResult::Stall,
        }
    }

    fn output(&mut self, buf: &mut dyn PacketData) -> UsbResult {
        match &mut self.stage {
            Stage::DataOut { setup, data } => {
                let n = buf.len();
                let at = data.len();
                if at + n > setup.length as usize {
                    // More than wLength: the host broke the protocol.
                    self.stage = Stage::Stalled;
                    return UsbResult::Stall;
                }
                data.resize(at + n, 0);
                if buf.copy_from_host(0, &mut data[at..]).is_err() {
                    data.truncate(at);
                    return UsbResult::Error;
                }
                UsbResult::Ack(n)
            }
            // The status stage of an IN request.
            Stage::DataIn { .. } | Stage::PendingIn(_) => {
                self.stage = Stage::Idle;
                UsbResult::Ack(0)
            }
            Stage::Idle | Stage::Stalled => UsbResult::Stall,
        }
    }
}
