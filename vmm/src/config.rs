//! What a machine is made of, as the command line described it. The `cli`
//! crate fills this in from QEMU's option grammar; `vmm` only consumes it.

use std::path::PathBuf;

/// Where a character device (serial port, debugcon, qtest) goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CharDev {
    /// Discard output, never any input.
    Null,
    /// Standard input and output. `mux` is QEMU's `mon:` prefix (and
    /// `-nographic`'s default): Ctrl-A escapes are interpreted.
    Stdio { mux: bool },
    /// Append to a file.
    File(PathBuf),
    /// A Unix socket, connecting to it, or listening on it with `server`.
    Unix {
        path: PathBuf,
        server: bool,
        wait: bool,
    },
    /// A new pseudo-terminal; its name is printed at start (and in
    /// `query-chardev`), as QEMU does, for a user to attach to.
    Pty,
    /// A TCP socket, connecting to it, or listening on it with `server`
    /// (`telnet` is accepted for the grammar; Strata sends no telnet
    /// negotiation, which clients do without).
    Tcp {
        host: String,
        port: u16,
        server: bool,
        wait: bool,
    },
}

/// What a monitor speaks on its chardev.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorMode {
    /// QMP, the JSON protocol (`-qmp`, `-mon mode=control`).
    Control,
    /// HMP, the human monitor (`-monitor`, `-mon mode=readline`).
    Readline,
}

/// One `-qmp`, `-monitor` or `-mon`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorConfig {
    pub chardev: CharDev,
    pub mode: MonitorMode,
    /// `pretty=on` / `-qmp-pretty`: indented JSON replies.
    pub pretty: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Qtest,
}

/// `-boot` settings. Letters: a/b floppy, c disk, d CD-ROM, n network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootConfig {
    pub order: String,
    pub once: Option<String>,
    pub menu: bool,
    pub splash_time: Option<u32>,
    /// Milliseconds before retrying after boot failure; `None` = never.
    pub reboot_timeout: Option<u32>,
    pub strict: bool,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            order: "cad".into(),
            once: None,
            menu: false,
            splash_time: None,
            reboot_timeout: None,
            strict: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// The board (`-machine TYPE`), by canonical name.
    pub machine: String,
    pub name: Option<String>,
    pub mem_size: u64,
    pub cpus: u32,
    pub max_cpus: u32,
    pub bios: PathBuf,
    pub serial: Vec<CharDev>,
    pub debugcon: Option<CharDev>,
    /// QMP and HMP monitors, in command-line order.
    pub monitors: Vec<MonitorConfig>,
    pub no_reboot: bool,
    /// `-S`: create the machine but do not start the vCPUs.
    pub paused: bool,
    /// `-usb` / `-machine usb=on`: the board's own USB controller.
    pub usb: bool,
    pub accel: Accel,
    /// The qtest protocol channel, for `accel=qtest`.
    pub qtest: Option<CharDev>,
    /// Where qtest logs the protocol (`-qtest-log`).
    pub qtest_log: Option<PathBuf>,
    /// `-incoming URI`: wait for a migration stream instead of starting.
    pub incoming: Option<crate::migration::Uri>,
    pub boot: BootConfig,
    /// Desugared `-drive`/`-hda`/`-cdrom`/... options, in order.
    pub drives: Vec<block::drive::DriveSpec>,
    /// `-blockdev` option texts (key=value or JSON), in order.
    pub blockdevs: Vec<String>,
    /// `-device` options, in order, parsed against the device table.
    pub devices: Vec<crate::device::DeviceSpec>,
    /// `-global` defaults, in order (a later one for the same property wins).
    pub globals: Vec<crate::device::Global>,
    /// `-object iothread,id=` ids: one event loop thread each.
    pub iothreads: Vec<String>,
    /// `poll-max-ns` of the iothreads that set it.
    pub iothread_poll_max_ns: Vec<(String, u64)>,
    /// `-kernel`, `-initrd` and `-append`: direct kernel boot.
    pub kernel: Option<KernelConfig>,
    /// Whether `-bios` was given explicitly (it selects the firmware route
    /// for `-kernel`).
    pub bios_explicit: bool,
    /// `-smbios type=N,key=value,...` options, in order.
    pub smbios: Vec<Vec<(String, String)>>,
    /// Seconds added to the host's UTC time to start the guest's RTC
    /// (`-rtc base=localtime` or `base=DATE`; 0 is `base=utc`).
    pub rtc_offset: i64,
    /// Guest RAM is a shared memfd mapping (`-machine memory-backend=` of
    /// a `memory-backend-memfd,share=on`), for vhost-user back ends.
    pub shared_ram: bool,
    /// Every `-chardev` by id, for devices that name one (`chardev=`).
    pub chardevs: Vec<(String, CharDev)>,
    /// `-L DIR`s, searched in order before `STRATA_ROM_DIR` and the
    /// system's directories for option ROMs.
    pub firmware_dirs: Vec<PathBuf>,
}

/// What `-kernel`, `-initrd` and `-append` asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    pub kernel: PathBuf,
    /// `-initrd a,b`: for Linux the files are concatenated into one initrd;
    /// for multiboot each is a module, with the text after the first space
    /// as its command line (QEMU's convention).
    pub initrd: Vec<String>,
    pub cmdline: String,
}

pub const DEFAULT_BIOS: &str = "/usr/share/seabios/bios-256k.bin";

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            machine: "pc".into(),
            name: None,
            mem_size: 128 << 20,
            cpus: 1,
            max_cpus: 1,
            bios: PathBuf::from(DEFAULT_BIOS),
            serial: Vec::new(),
            debugcon: None,
            monitors: Vec::new(),
            no_reboot: false,
            paused: false,
            usb: false,
            accel: Accel::Kvm,
            qtest: None,
            qtest_log: None,
            incoming: None,
            boot: BootConfig::default(),
            drives: Vec::new(),
            blockdevs: Vec::new(),
            devices: Vec::new(),
            globals: Vec::new(),
            iothreads: Vec::new(),
            iothread_poll_max_ns: Vec::new(),
            kernel: None,
            bios_explicit: false,
            smbios: Vec::new(),
            rtc_offset: 0,
            shared_ram: false,
            chardevs: Vec::new(),
            firmware_dirs: Vec::new(),
        }
    }
}
