//! Virtio devices (virtio 1.2, OASIS, chapters 2 and 4.1) behind the
//! virtio-pci transport.
//!
//! The split is the one of the spec: [`pci::VirtioPci`] is the transport
//! (configuration structures, feature negotiation, status, queue set-up,
//! notifications and interrupts, section 4.1), and a [`VirtioDevice`] is
//! the device type behind it (section 5, for example [`block`]).
//!
//! Nothing here knows about KVM. The transport talks to the VMM through two
//! traits: [`crate::pci::msix::MsiSender`] delivers MSI-X messages, and
//! [`IoEventRegistrar`] lets the VMM bind a queue's notify address to the
//! queue's eventfd (a KVM ioeventfd), so that notifications never reach the
//! vCPU thread. Notify writes that do arrive as bus accesses (the qtest
//! accelerator, or a BAR moved after set-up) are forwarded to the same
//! eventfd, so both paths end in the device's event loop.

pub mod block;
pub mod chain;
pub mod event_loop;
pub mod pci;
pub mod queue_worker;
pub mod scsi;
#[cfg(test)]
pub(crate) mod testing;
pub mod vduse;
pub mod vhost_user;
pub mod vhost_user_blk;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::GuestMem;

/// Device status bits (section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Reserved feature bits (section 6).
pub mod features {
    pub const NOTIFY_ON_EMPTY: u64 = 1 << 24;
    pub const ANY_LAYOUT: u64 = 1 << 27;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// "No vector" for MSI-X vector registers (section 4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

/// Interrupts a device raises; the transport decides how (MSI-X vector or
/// INTx plus the ISR bits).
pub trait VirtioInterrupt: Send + Sync {
    /// Used buffers were added to queue `queue`.
    fn signal_queue(&self, queue: u16);
    /// The device configuration changed.
    fn signal_config(&self);
}

/// Where a queue's notifications arrive, for the VMM to bind an eventfd to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyAddr {
    /// Any write at this guest-physical address (modern notify region).
    Mmio(u64),
    /// A 16-bit port write of `value` (the legacy QUEUE_NOTIFY register).
    Pio { port: u64, value: u16 },
}

/// Binds notify addresses to eventfds (KVM_IOEVENTFD under KVM).
pub trait IoEventRegistrar: Send + Sync {
    fn register(&self, addr: NotifyAddr, fd: &EventFd) -> Result<(), String>;
    fn unregister(&self, addr: NotifyAddr, fd: &EventFd);
}

/// No binding: notify writes reach the transport as bus writes, and it
/// signals the eventfd itself (the qtest accelerator).
pub struct NoIoEvents;
impl IoEventRegistrar for NoIoEvents {
    fn register(&self, _: NotifyAddr, _: &EventFd) -> Result<(), String> {
        Ok(())
    }
    fn unregister(&self, _: NotifyAddr, _: &EventFd) {}
}

/// Where a queue's notifications arrive: an eventfd the transport made
/// (virtio-pci binds it to KVM ioeventfds), or one a vhost-user frontend
/// sent over its socket, received as a `File`. An eventfd is read and
/// written as 8-byte counters either way; this keeps the conversion of a
/// received descriptor into an `EventFd` (which needs `unsafe`) out of a
/// crate that has none.
pub enum Notifier {
    Event(Arc<EventFd>),
    Received(std::fs::File),
}

impl Notifier {
    /// A fresh non-blocking eventfd.
    pub fn new() -> std::io::Result<Notifier> {
        Ok(Notifier::Event(Arc::new(EventFd::new(
            vmm_sys_util::eventfd::EFD_NONBLOCK,
        )?)))
    }

    /// A kick descriptor received from a vhost-user front end, made
    /// non-blocking: the queue worker reads it until it is empty, and a
    /// front end may have sent a blocking one (or something that is not an
    /// eventfd at all). The flag is the shared open file's; front ends
    /// (QEMU's, Strata's) make their kick eventfds non-blocking anyway.
    pub fn received(f: std::fs::File) -> std::io::Result<Notifier> {
        set_nonblocking(&f)?;
        Ok(Notifier::Received(f))
    }

    /// Takes the pending count (an error when there is none, for a
    /// non-blocking eventfd).
    pub fn read(&self) -> std::io::Result<u64> {
        match self {
            Notifier::Event(e) => e.read(),
            Notifier::Received(f) => {
                let mut b = [0u8; 8];
                let n = std::io::Read::read(&mut &*f, &mut b)?;
                if n != 8 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                Ok(u64::from_ne_bytes(b))
            }
        }
    }

    /// Adds `v` to the count.
    pub fn write(&self, v: u64) -> std::io::Result<()> {
        match self {
            Notifier::Event(e) => e.write(v),
            Notifier::Received(f) => std::io::Write::write_all(&mut &*f, &v.to_ne_bytes()),
        }
    }
}

impl std::os::fd::AsRawFd for Notifier {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Notifier::Event(e) => e.as_raw_fd(),
            Notifier::Received(f) => f.as_raw_fd(),
        }
    }
}

/// Sets O_NONBLOCK on a descriptor another process sent.
fn set_nonblocking(f: &std::fs::File) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(f, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    fcntl(
        f,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(std::io::Error::from)?;
    Ok(())
}

/// A queue the driver set up, handed to the device at DRIVER_OK.
pub struct ActiveQueue {
    /// Index of the queue in the device.
    pub index: u16,
    pub queue: virtio_queue::Queue,
    /// Signalled on each notification for this queue.
    pub notify: Arc<Notifier>,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMem,
    /// The negotiated features.
    pub features: u64,
    /// The enabled queues, in index order.
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio device type (section 5), independent of the transport.
pub trait VirtioDevice: Send {
    /// Device ID (section 5): 2 for block.
    fn device_type(&self) -> u16;
    fn num_queues(&self) -> usize;
    fn queue_max_size(&self) -> u16;
    /// Offered features, device-specific and ring bits; the transport adds
    /// VERSION_1 when it offers the modern interface.
    fn features(&self) -> u64;
    /// Length of the device configuration structure.
    fn config_len(&self) -> usize;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver accepted `features` (FEATURES_OK, or a legacy guest
    /// features write).
    fn ack_features(&mut self, _features: u64) {}
    /// Starts processing the queues.
    fn activate(&mut self, a: Activation) -> Result<(), String>;
    /// Stops processing and forgets every queue; in-flight requests are
    /// completed before this returns.
    fn reset(&mut self);
    /// Stops processing like [`Self::reset`], but the requests in flight
    /// complete into the used rings first and the negotiated features
    /// stay: a vhost-user frontend stopping its rings (to start them again
    /// where they stopped, or to move them to a new connection).
    fn stop(&mut self) {
        self.reset();
    }
    /// Gives the device the transport's configuration-change signal
    /// (section 2.5.2: the device changed its configuration space), for
    /// changes made from the host side, such as a resized disk.
    fn set_config_signal(&mut self, _signal: Arc<dyn ConfigSignal>) {}
}

/// How a device tells the driver that its configuration changed: the
/// transport bumps `config_generation` and raises the configuration
/// interrupt, once the driver is running (before DRIVER_OK the driver
/// reads the configuration anyway).
pub trait ConfigSignal: Send + Sync {
    fn config_changed(&self);
}
