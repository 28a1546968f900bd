//! VDUSE's kernel interface (include/uapi/linux/vduse.h): the control
//! device /dev/vduse/control creates and destroys devices, each device's
//! /dev/vduse/NAME carries its control messages and ioctls. This is the
//! `ioctl` boundary, as `kvm.rs` is KVM's; the protocol itself is
//! `devices::virtio::vduse`, behind its `VduseDev` trait.
//!
//! A created device is not yet on the vDPA bus: `vdpa dev add name NAME
//! mgmtdev vduse` (iproute2) puts it there, as with QEMU's vduse-blk
//! exports.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use devices::virtio::vduse::{IotlbEntry, VduseDev, VqInfo, MESSAGE_LEN};
use devices::virtio::Notifier;

pub const CONTROL: &str = "/dev/vduse/control";

const VDUSE_BASE: u64 = 0x81;
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    dir << 30 | size << 16 | VDUSE_BASE << 8 | nr
}
const W: u64 = 1;
const R: u64 = 2;
const SET_API_VERSION: u64 = ioc(W, 0x01, 8);
const CREATE_DEV: u64 = ioc(W, 0x02, DEV_CONFIG_LEN as u64);
const DESTROY_DEV: u64 = ioc(W, 0x03, NAME_MAX as u64);
const IOTLB_GET_FD: u64 = ioc(R | W, 0x10, std::mem::size_of::<IotlbRaw>() as u64);
const DEV_GET_FEATURES: u64 = ioc(R, 0x11, 8);
const DEV_INJECT_CONFIG_IRQ: u64 = ioc(0, 0x13, 0);
const VQ_SETUP: u64 = ioc(W, 0x14, std::mem::size_of::<VqConfig>() as u64);
const VQ_GET_INFO: u64 = ioc(R | W, 0x15, std::mem::size_of::<VqInfoRaw>() as u64);
const VQ_SETUP_KICKFD: u64 = ioc(W, 0x16, std::mem::size_of::<VqEventfd>() as u64);
const VQ_INJECT_IRQ: u64 = ioc(W, 0x17, 4);

const NAME_MAX: usize = 256;

/// Size of `struct vduse_dev_config` (its config[] follows it).
const DEV_CONFIG_LEN: usize = 336;

#[repr(C)]
#[derive(Default)]
struct IotlbRaw {
    offset: u64,
    start: u64,
    last: u64,
    perm: u8,
}

#[repr(C)]
#[derive(Default)]
struct VqConfig {
    index: u32,
    max_size: u16,
    reserved: [u16; 13],
}

#[repr(C)]
#[derive(Default)]
struct VqInfoRaw {
    index: u32,
    num: u32,
    desc_addr: u64,
    driver_addr: u64,
    device_addr: u64,
    /// The split ring's avail_index, or the packed ring's state.
    state: [u16; 4],
    ready: u8,
}

#[repr(C)]
struct VqEventfd {
    index: u32,
    fd: i32,
}

fn check(r: libc::c_int, what: &str) -> std::io::Result<libc::c_int> {
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

/// What the device is: the virtio device it shows and its configuration.
pub struct DeviceSpec<'a> {
    pub name: &'a str,
    pub device_id: u32,
    /// Offered features (VERSION_1 and ACCESS_PLATFORM included).
    pub features: u64,
    pub queues: u32,
    pub queue_size: u16,
    pub config: &'a [u8],
}

/// A created VDUSE device: its character device, destroyed on drop.
pub struct KernelDev {
    name: String,
    dev: File,
}

/// Whether this kernel has VDUSE.
pub fn available() -> bool {
    Path::new(CONTROL).exists()
}

impl KernelDev {
    pub fn create(spec: &DeviceSpec) -> Result<KernelDev, String> {
        let err = |e: std::io::Error| format!("VDUSE device '{}': {e}", spec.name);
        if spec.name.is_empty() || spec.name.len() >= NAME_MAX || spec.name.contains('/') {
            return Err(format!(
                "VDUSE device '{}': the name must be 1 to 255 bytes without '/'",
                spec.name
            ));
        }
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL)
            .map_err(|e| format!("{CONTROL}: {e}"))?;
        let version: u64 = 0;
        // SAFETY: the ioctl reads one u64 from the pointer, which points
        // at a live u64.
        let r = unsafe { libc::ioctl(ctl.as_raw_fd(), SET_API_VERSION as _, &version) };
        check(r, "VDUSE_SET_API_VERSION").map_err(err)?;
        let mut name = [0u8; NAME_MAX];
        name[..spec.name.len()].copy_from_slice(spec.name.as_bytes());
        // struct vduse_dev_config, laid out field by field (little-endian,
        // as x86 is), then the configuration space.
        let mut buf = Vec::with_capacity(DEV_CONFIG_LEN + spec.config.len());
        buf.extend_from_slice(&name);
        buf.extend_from_slice(&0u32.to_le_bytes()); // vendor_id
        buf.extend_from_slice(&spec.device_id.to_le_bytes());
        buf.extend_from_slice(&spec.features.to_le_bytes());
        buf.extend_from_slice(&spec.queues.to_le_bytes());
        buf.extend_from_slice(&4096u32.to_le_bytes()); // vq_align
        buf.extend_from_slice(&[0u8; 13 * 4]); // reserved
        buf.extend_from_slice(&(spec.config.len() as u32).to_le_bytes());
        debug_assert_eq!(buf.len(), DEV_CONFIG_LEN);
        buf.extend_from_slice(spec.config);
        // SAFETY: the kernel reads the header and config_size bytes after
        // it, all inside `buf`.
        let r = unsafe { libc::ioctl(ctl.as_raw_fd(), CREATE_DEV as _, buf.as_ptr()) };
        check(r, "VDUSE_CREATE_DEV").map_err(err)?;
        let destroy = |ctl: &File| {
            // SAFETY: the kernel reads NAME_MAX bytes of the name array.
            unsafe { libc::ioctl(ctl.as_raw_fd(), DESTROY_DEV as _, name.as_ptr()) };
        };
        let dev = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/dev/vduse/{}", spec.name))
        {
            Ok(f) => f,
            Err(e) => {
                destroy(&ctl);
                return Err(err(e));
            }
        };
        let kd = KernelDev {
            name: spec.name.to_string(),
            dev,
        };
        for i in 0..spec.queues {
            let c = VqConfig {
                index: i,
                max_size: spec.queue_size,
                ..Default::default()
            };
            // SAFETY: the kernel reads one vduse_vq_config from `c`.
            let r = unsafe { libc::ioctl(kd.dev.as_raw_fd(), VQ_SETUP as _, &c) };
            if let Err(e) = check(r, "VDUSE_VQ_SETUP") {
                drop(kd);
                return Err(err(e));
            }
        }
        Ok(kd)
    }
}

impl Drop for KernelDev {
    fn drop(&mut self) {
        // The character device closes first: the kernel refuses to
        // destroy a device still open.
        let dev = std::mem::replace(
            &mut self.dev,
            match File::open("/dev/null") {
                Ok(f) => f,
                Err(_) => return,
            },
        );
        drop(dev);
        let Ok(ctl) = OpenOptions::new().read(true).write(true).open(CONTROL) else {
            return;
        };
        let mut name = [0u8; NAME_MAX];
        name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: the kernel reads NAME_MAX bytes of the name array.
        let r = unsafe { libc::ioctl(ctl.as_raw_fd(), DESTROY_DEV as _, name.as_ptr()) };
        if r < 0 {
            log::warn!(
                "VDUSE device '{}': VDUSE_DESTROY_DEV: {} (is it still on the vDPA bus? \
                 vdpa dev del {})",
                self.name,
                std::io::Error::last_os_error(),
                self.name
            );
        }
    }
}

impl VduseDev for KernelDev {
    fn read_message(&self, buf: &mut [u8; MESSAGE_LEN]) -> std::io::Result<Option<usize>> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.dev.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        match (&self.dev).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn write_response(&self, buf: &[u8; MESSAGE_LEN]) -> std::io::Result<()> {
        (&self.dev).write_all(buf)
    }
    fn features(&self) -> std::io::Result<u64> {
        let mut f = 0u64;
        // SAFETY: the kernel writes one u64 to `f`.
        let r = unsafe { libc::ioctl(self.dev.as_raw_fd(), DEV_GET_FEATURES as _, &mut f) };
        check(r, "VDUSE_DEV_GET_FEATURES")?;
        Ok(f)
    }
    fn vq_info(&self, index: u32) -> std::io::Result<VqInfo> {
        let mut v = VqInfoRaw {
            index,
            ..Default::default()
        };
        // SAFETY: the kernel reads the index and writes one vduse_vq_info
        // into `v`.
        let r = unsafe { libc::ioctl(self.dev.as_raw_fd(), VQ_GET_INFO as _, &mut v) };
        check(r, "VDUSE_VQ_GET_INFO")?;
        Ok(VqInfo {
            num: v.num,
            desc_addr: v.desc_addr,
            driver_addr: v.driver_addr,
            device_addr: v.device_addr,
            avail_index: v.state[0],
            ready: v.ready != 0,
        })
    }
    fn set_kick(&self, index: u32, kick: Option<&Notifier>) -> std::io::Result<()> {
        let fd = match kick {
            Some(Notifier::Event(e)) => e.as_raw_fd(),
            Some(Notifier::Received(f)) => f.as_raw_fd(),
            None => -1,
        };
        let e = VqEventfd { index, fd };
        // SAFETY: the kernel reads one vduse_vq_eventfd from `e` and takes
        // its own reference to the eventfd.
        let r = unsafe { libc::ioctl(self.dev.as_raw_fd(), VQ_SETUP_KICKFD as _, &e) };
        check(r, "VDUSE_VQ_SETUP_KICKFD")?;
        Ok(())
    }
    fn inject_irq(&self, index: u32) -> std::io::Result<()> {
        // SAFETY: the kernel reads one u32 from `index`.
        let r = unsafe { libc::ioctl(self.dev.as_raw_fd(), VQ_INJECT_IRQ as _, &index) };
        check(r, "VDUSE_VQ_INJECT_IRQ")?;
        Ok(())
    }
    fn inject_config_irq(&self) -> std::io::Result<()> {
        // SAFETY: no argument.
        let r = unsafe { libc::ioctl(self.dev.as_raw_fd(), DEV_INJECT_CONFIG_IRQ as _) };
        check(r, "VDUSE_DEV_INJECT_CONFIG_IRQ")?;
        Ok(())
    }
    fn iotlb(&self, start: u64, last: u64) -> std::io::Result<IotlbEntry> {
        use std::os::fd::FromRawFd;
        let mut e = IotlbRaw {
            start,
            last,
            ..Default::default()
        };
        // SAFETY: the kernel reads and writes one vduse_iotlb_entry in `e`
        // and returns a new file descriptor, which this process then owns.
        let r = unsafe { libc::ioctl(self.dev.as_raw_fd(), IOTLB_GET_FD as _, &mut e) };
        let fd = check(r, "VDUSE_IOTLB_GET_FD")?;
        // SAFETY: `fd` was just returned by the kernel for this process
        // and nothing else holds it.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(IotlbEntry {
            file,
            offset: e.offset,
            start: e.start,
            last: e.last,
            perm: e.perm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctl numbers the header's macros give (checked by hand against
    /// _IOR/_IOW/_IOWR with the structures' sizes).
    #[test]
    fn ioctl_numbers_and_layouts() {
        assert_eq!(std::mem::size_of::<IotlbRaw>(), 32);
        assert_eq!(std::mem::size_of::<VqConfig>(), 32);
        assert_eq!(std::mem::size_of::<VqInfoRaw>(), 48);
        assert_eq!(std::mem::size_of::<VqEventfd>(), 8);
        assert_eq!(SET_API_VERSION, 0x4008_8101);
        assert_eq!(CREATE_DEV, 0x4150_8102);
        assert_eq!(DESTROY_DEV, 0x4100_8103);
        assert_eq!(IOTLB_GET_FD, 0xc020_8110);
        assert_eq!(DEV_GET_FEATURES, 0x8008_8111);
        assert_eq!(DEV_INJECT_CONFIG_IRQ, 0x0000_8113);
        assert_eq!(VQ_SETUP, 0x4020_8114);
        assert_eq!(VQ_GET_INFO, 0xc030_8115);
        assert_eq!(VQ_SETUP_KICKFD, 0x4008_8116);
        assert_eq!(VQ_INJECT_IRQ, 0x4004_8117);
    }

    #[test]
    fn bad_names_are_refused_before_the_kernel() {
        let spec = |name| DeviceSpec {
            name,
            device_id: 2,
            features: 0,
            queues: 1,
            queue_size: 128,
            config: &[],
        };
        for n in ["", "a/b"] {
            let e = KernelDev::create(&spec(n)).err().unwrap();
            assert!(e.contains("the name must be"), "{e}");
        }
    }
}
