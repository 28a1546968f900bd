//! `strata`'s command line: the subset of `qemu-system-x86_64`'s options
//! implemented so far, with QEMU's spelling, defaults and implied keys
//! (`-m 512`, `-smp 4,cores=2`, `-machine pc,accel=kvm`, `-boot d`).
//!
//! Every error is one line naming the option, returned as a `String`.

use std::path::PathBuf;

use block::keyval;
use vmm::config::{Accel, CharDev, KernelConfig, MachineConfig};
use vmm::device::{DeviceArg, DeviceSpec};

pub const USAGE: &str = "\
usage: strata [options]

Strata runs a PC guest on KVM. Options follow qemu-system-x86_64:
  -machine/-M pc|none[,accel=kvm|qtest]  machine type (pc = i440FX + PIIX3; help lists them)
  -accel kvm|qtest, -enable-kvm     accelerator (KVM is the only CPU accelerator)
  -cpu MODEL[,+flag,-flag,...]      accepted; the guest gets the CPUID KVM supports (-cpu help)
  -m SIZE                           guest RAM (bare numbers are MiB; K/M/G/T suffixes)
  -smp N[,cores=,threads=,sockets=,maxcpus=]  virtual CPUs
  -bios FILE                        firmware (default /usr/share/seabios/bios-256k.bin)
  -L DIR                            firmware search path (-bios names, option ROMs)
  -boot [order=]DRIVES[,once=,menu=on|off,splash-time=,reboot-timeout=,strict=on|off]
  -serial DEV                       stdio, mon:stdio, file:PATH, unix:PATH[,server=on][,wait=off],
                                    tcp:HOST:PORT[,server=on][,wait=off], pty, chardev:ID, null, none
  -chardev socket|stdio|file|pty|null,id=ID,...  a character device (path=|host=,port=, server=, wait=, mux=)
  -qmp DEV, -qmp-pretty DEV         a QMP monitor (DEV as for -serial)
  -monitor DEV                      a human monitor (HMP), or none
  -mon chardev=ID[,mode=control|readline][,pretty=on]  a monitor on a -chardev
  -debugcon DEV                     isa-debugcon on port 0xe9 (see -global)
  -global DRIVER.PROP=VALUE         default of a device property (e.g. isa-debugcon.iobase=0x402)
  -nographic, -display none, -vga none   no display (Strata has none; other types warn)
                                    -nographic wires COM1 to stdio
  -nic none, -net none              no network (Strata has no network device; others warn)
  -rtc base=utc|localtime|DATE[,clock=host|rt|vm,driftfix=none|slew]   RTC start time
  -uuid UUID                        SMBIOS system UUID
  -pidfile FILE, -D LOGFILE         write the pid; send Strata's log to a file
  -daemonize                        detach once the machine and monitors are ready
  -msg, -overcommit, -sandbox, -k, -d, -usb, -vnc, -spice, -no-acpi, -no-hpet,
  -no-shutdown, -no-user-config, -nodefconfig
                                    accepted for compatibility (with a warning
                                    where Strata lacks the hardware)
  -nodefaults                       no default serial port
  -no-reboot                        exit instead of rebooting when the guest resets
  -snapshot                         write to temporary overlays; the disk images stay unchanged
  -name NAME, -S                    guest name; start with vCPUs stopped
  -drive file=F[,if=ide|virtio|none,format=,media=disk|cdrom,cache=,aio=,...]
  IMAGE                             a bare argument is -hda IMAGE
  -hda/-hdb/-hdc/-hdd F, -cdrom F, -fda/-fdb F   legacy drive shortcuts
  -blockdev driver=...,node-name=...  (or JSON)   a block node
  -device DRIVER[,drive=ID,...]     a device (-device help, -device DRIVER,help)
  -object iothread,id=ID[,poll-max-ns=NS]
                                    an I/O thread (virtio-blk-pci iothread=ID); it
                                    polls up to NS ns before sleeping (32768)
  -object main-loop,id=ID,poll-max-ns=NS
                                    the same for devices that name no iothread
  -object secret,id=ID,data=S|file=F  a secret (passwordid=ID)
  -object tls-creds-x509,id=ID,dir=D[,endpoint=client][,verify-peer=on|off]
                                    TLS credentials (nbd tls-creds=ID)
  -qtest unix:PATH|stdio            qtest protocol (with -accel qtest)
  -incoming unix:PATH|tcp:HOST:PORT wait for a live migration from another Strata
  -kernel FILE                      boot a bzImage, PVH ELF vmlinux or multiboot kernel directly
                                    (with -bios or -boot menu=on: bzImage/multiboot through SeaBIOS)
  -initrd FILE[,FILE2...]           initrds (concatenated) or multiboot modules (FILE ARGS each)
  -append CMDLINE                   kernel command line
  -numa node[,memdev=ID]            the one NUMA node, its RAM from a memory backend
  -smbios type=N,field=value,...    SMBIOS fields (type 0, 1, 2, 3, 4, 11, 17), e.g. type=1,serial=S,uuid=U
  -version, -help
With -nographic or mon:stdio, Ctrl-A h prints the console keys and Ctrl-A x quits.
";

/// Options that take a value.
const KNOWN_WITH_VALUE: &[&str] = &[
    "-accel",
    "-machine",
    "-M",
    "-m",
    "-numa",
    "-smp",
    "-bios",
    "-boot",
    "-serial",
    "-debugcon",
    "-global",
    "-display",
    "-name",
    "-qtest",
    "-qtest-log",
    "-incoming",
    "-drive",
    "-hda",
    "-hdb",
    "-hdc",
    "-hdd",
    "-cdrom",
    "-fda",
    "-fdb",
    "-device",
    "-blockdev",
    "-kernel",
    "-initrd",
    "-append",
    "-smbios",
    "-object",
    "-cpu",
    "-nic",
    "-net",
    "-netdev",
    "-vga",
    "-rtc",
    "-uuid",
    "-L",
    "-msg",
    "-overcommit",
    "-sandbox",
    "-pidfile",
    "-D",
    "-chardev",
    "-mon",
    "-qmp",
    "-qmp-pretty",
    "-monitor",
];

/// Options without a value that `parse` handles.
const FLAGS: &[&str] = &[
    "-nographic",
    "-nodefaults",
    "-no-reboot",
    "-snapshot",
    "-enable-kvm",
    "-S",
    "-usb",
    "-version",
    "-help",
    "-h",
    "-daemonize",
];

/// QEMU options Strata accepts and ignores: (option, takes a value,
/// warning). `None`: they change nothing on Strata, so nothing is said.
const IGNORED: &[(&str, bool, Option<&str>)] = &[
    // Strata reads no configuration files.
    ("-no-user-config", false, None),
    ("-nodefconfig", false, None),
    // The pc machine has no HPET.
    ("-no-hpet", false, None),
    // QEMU stops the guest on power-off and waits for the monitor; Strata
    // exits with status 0 when the guest powers off (which is what a
    // management tool using -no-shutdown then sees as the guest's end).
    ("-no-shutdown", false, None),
    // The keyboard layout of a VNC display; Strata has no display.
    ("-k", true, None),
    // QEMU's log items (TCG and guest errors); Strata logs with RUST_LOG.
    ("-d", true, None),
    (
        "-no-acpi",
        false,
        Some("Strata always provides ACPI tables; ignoring"),
    ),
    ("-vnc", true, Some("Strata has no display yet; ignoring")),
    ("-spice", true, Some("Strata has no display yet; ignoring")),
];

fn warn(msg: &str) {
    eprintln!("strata: warning: {msg}");
}

/// Whether `opt VALUE` makes a chardev on stdio (`stdio`, `mon:stdio`,
/// `-chardev stdio,...`).
fn uses_stdio(opt: &str, value: &str) -> bool {
    const CHARDEV_OPTS: &[&str] = &[
        "-serial",
        "-chardev",
        "-monitor",
        "-qmp",
        "-qmp-pretty",
        "-debugcon",
        "-qtest",
    ];
    if !CHARDEV_OPTS.contains(&opt) {
        return false;
    }
    let backend = value.strip_prefix("mon:").unwrap_or(value);
    backend.split(',').next() == Some("stdio")
}

/// Whether `opt` takes a value; `None` for an unknown option.
fn takes_value(opt: &str) -> Option<bool> {
    if FLAGS.contains(&opt) {
        Some(false)
    } else if KNOWN_WITH_VALUE.contains(&opt) {
        Some(true)
    } else {
        IGNORED.iter().find(|(o, ..)| *o == opt).map(|(_, v, _)| *v)
    }
}

/// What the `strata` process itself does around the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Process {
    /// `-pidfile FILE`: written before the guest starts, removed at exit.
    pub pidfile: Option<PathBuf>,
    /// `-D FILE`: where Strata's log goes instead of stderr.
    pub log_file: Option<PathBuf>,
    /// `-daemonize`: detach once the machine is set up (`crate::daemon`).
    pub daemonize: bool,
    /// `-object secret` and `tls-creds-x509`, to create before the machine.
    pub objects: Vec<block::objects::ObjectSpec>,
}

pub enum Parsed {
    Run(Box<MachineConfig>, Process),
    Help,
    Version,
    /// A help listing (`-device help`, `-machine help`): print it, exit 0.
    Print(String),
}

/// Splits a QEMU option value into key/value pairs with the project's
/// keyval grammar: `,,` escapes, an implied first key, bare flags = on.
/// What `-numa` gave: Strata's machines have one NUMA node.
#[derive(Default)]
struct Numa {
    nodes: u32,
    memdev: Option<String>,
}

/// `-numa node[,nodeid=0][,memdev=ID][,cpus=...]`: one node, whose
/// memory may come from a memory backend.
fn parse_numa(value: &str, numa: &mut Numa) -> Result<(), String> {
    let opts = split_opts("-numa", value, Some("type"))?;
    if !opts.iter().any(|(k, v)| k == "type" && v == "node") {
        return Err(format!(
            "-numa {value}: only 'node' is supported (Strata's machines have one NUMA node)"
        ));
    }
    for (k, v) in opts {
        match k.as_str() {
            "type" => {}
            "memdev" => numa.memdev = Some(v),
            "nodeid" => {
                if v != "0" {
                    return Err(format!(
                        "-numa {value}: nodeid={v}: Strata's machines have one NUMA node (0)"
                    ));
                }
            }
            "cpus" | "initiator" => {}
            "mem" => {
                return Err(format!(
                "-numa {value}: mem= is not supported (use memdev= with -object memory-backend-*)"
            ))
            }
            _ => return Err(format!("-numa {value}: unknown property '{k}'")),
        }
    }
    numa.nodes += 1;
    if numa.nodes > 1 {
        return Err(format!(
            "-numa {value}: a second node: Strata's machines have one NUMA node"
        ));
    }
    Ok(())
}

pub fn split_opts(
    opt: &str,
    s: &str,
    implied: Option<&str>,
) -> Result<Vec<(String, String)>, String> {
    let mut p = keyval::Parser::new(opt).bare_flags(true);
    if let Some(k) = implied {
        p = p.implied_key(k);
    }
    p.parse_flat(s).map_err(|e| e.to_string())
}

fn parse_bool(opt: &str, key: &str, v: &str) -> Result<bool, String> {
    keyval::parse_bool(opt, key, v).map_err(|e| e.to_string())
}

fn parse_u32(opt: &str, key: &str, v: &str) -> Result<u32, String> {
    keyval::parse_uint_str(v)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{opt}: {key}={v}: not a number"))
}

pub use crate::chardev_args::parse_chardev;
use crate::chardev_args::Chardevs;

/// Machine properties QEMU has that change nothing on Strata's boards
/// (libvirt writes several of them on every command line).
const IGNORED_MACHINE_PROPS: &[&str] = &[
    "dump-guest-core",
    "mem-merge",
    "vmport",
    "smm",
    "hpet",
    "kernel-irqchip",
    "kernel_irqchip",
    "graphics",
    "suppress-vmdesc",
];

/// `-machine`; `Ok(Some(text))` is `-machine help`.
fn parse_machine(
    cfg: &mut MachineConfig,
    v: &str,
    accel_set: &mut bool,
    mem_backend: &mut Option<String>,
) -> Result<Option<String>, String> {
    for (k, val) in split_opts("-machine", v, Some("type"))? {
        match k.as_str() {
            "type" => match val.as_str() {
                "help" | "?" => return Ok(Some(vmm::machine::help())),
                t => match vmm::machine::find(t) {
                    Some(b) => cfg.machine = b.name().to_string(),
                    None => {
                        return Err(format!(
                            "-machine {val}: unsupported machine type (-machine help lists them)"
                        ))
                    }
                },
            },
            "accel" => {
                parse_accel(cfg, "-machine accel=", &val)?;
                *accel_set = true;
            }
            "usb" => cfg.usb = parse_bool("-machine", &k, &val)?,
            "memory-backend" => *mem_backend = Some(val),
            k if IGNORED_MACHINE_PROPS.contains(&k) => {}
            _ => return Err(format!("-machine {v}: unknown property '{k}'")),
        }
    }
    Ok(None)
}

/// `-accel NAME` or `-machine accel=NAME`; `what` is the option as the
/// user wrote it, up to the name (`-accel ` or `-machine accel=`).
fn parse_accel(cfg: &mut MachineConfig, what: &str, v: &str) -> Result<(), String> {
    let first = v.split(':').next().unwrap_or("");
    let name = first.split(',').next().unwrap_or("");
    cfg.accel = match name {
        "kvm" => Accel::Kvm,
        "qtest" => Accel::Qtest,
        "tcg" | "xen" | "hvf" | "whpx" | "nvmm" => {
            return Err(format!(
                "{what}{name}: not supported; Strata runs only on KVM"
            ))
        }
        _ => return Err(format!("{what}{v}: unknown accelerator")),
    };
    Ok(())
}

fn parse_smp(cfg: &mut MachineConfig, v: &str) -> Result<(), String> {
    let (mut cpus, mut maxcpus) = (None, None);
    let mut topo = 1u32;
    let mut have_topo = false;
    for (k, val) in split_opts("-smp", v, Some("cpus"))? {
        let n = parse_u32("-smp", &k, &val)?;
        match k.as_str() {
            "cpus" => cpus = Some(n),
            "maxcpus" => maxcpus = Some(n),
            "sockets" | "cores" | "threads" | "dies" | "clusters" => {
                topo = topo.saturating_mul(n);
                have_topo = true;
            }
            _ => return Err(format!("-smp {v}: unknown property '{k}'")),
        }
    }
    let cpus = cpus.unwrap_or(if have_topo { topo } else { 1 });
    cfg.cpus = cpus;
    cfg.max_cpus = maxcpus.unwrap_or(cpus);
    Ok(())
}

fn parse_boot(cfg: &mut MachineConfig, v: &str) -> Result<(), String> {
    let check = |s: &str| -> Result<String, String> {
        if s.chars().all(|c| "abcdn".contains(c)) && s.len() <= 4 {
            Ok(s.to_string())
        } else {
            Err(format!(
                "-boot {v}: invalid boot device letters '{s}' (use a, c, d, n)"
            ))
        }
    };
    for (k, val) in split_opts("-boot", v, Some("order"))? {
        match k.as_str() {
            "order" => cfg.boot.order = check(&val)?,
            "once" => cfg.boot.once = Some(check(&val)?),
            "menu" => cfg.boot.menu = parse_bool("-boot", &k, &val)?,
            "strict" => cfg.boot.strict = parse_bool("-boot", &k, &val)?,
            "splash-time" => cfg.boot.splash_time = Some(parse_u32("-boot", &k, &val)?),
            "reboot-timeout" => {
                let t: i64 = val
                    .parse()
                    .map_err(|_| format!("-boot {v}: reboot-timeout: not a number"))?;
                cfg.boot.reboot_timeout = (t >= 0).then_some(t.min(0xffff) as u32);
            }
            "splash" => {}
            _ => return Err(format!("-boot {v}: unknown property '{k}'")),
        }
    }
    Ok(())
}

/// `-kernel`/`-initrd`/`-append`. As in QEMU, `-initrd` and `-append`
/// need `-kernel`, and `-initrd` is a comma-separated list with `,,` for a
/// literal comma.
fn kernel_config(
    kernel: Option<PathBuf>,
    initrd: Option<String>,
    append: Option<String>,
) -> Result<Option<KernelConfig>, String> {
    let Some(kernel) = kernel else {
        if initrd.is_some() {
            return Err("-initrd: only allowed with -kernel".into());
        }
        if append.is_some() {
            return Err("-append: only allowed with -kernel".into());
        }
        return Ok(None);
    };
    if !kernel.is_file() {
        let why = if kernel.exists() {
            "not a regular file"
        } else {
            "no such file"
        };
        return Err(format!("-kernel {}: {why}", kernel.display()));
    }
    let mut files = Vec::new();
    if let Some(list) = initrd {
        let mut cur = String::new();
        let mut chars = list.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    files.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        files.push(cur);
        if files.iter().any(|f| f.is_empty()) {
            return Err(format!("-initrd {list}: empty file name"));
        }
    }
    Ok(Some(KernelConfig {
        kernel,
        initrd: files,
        cmdline: append.unwrap_or_default(),
    }))
}

/// `-smbios type=N,field=value,...`: checked here by the SMBIOS builder,
/// which knows the fields of each type, and kept as key/value pairs.
fn parse_smbios(v: &str) -> Result<Vec<(String, String)>, String> {
    let o = split_opts("-smbios", v, None)?;
    vmm::smbios::Fields::parse(std::slice::from_ref(&o))?;
    Ok(o)
}

/// QEMU's x86 CPU models (a model name, or one of these followed by `-`
/// and a variant: `Haswell-noTSX-IBRS`, `EPYC-Rome-v2`).
const CPU_MODELS: &[&str] = &[
    "host",
    "max",
    "base",
    "qemu64",
    "qemu32",
    "kvm64",
    "kvm32",
    "486",
    "pentium",
    "pentium2",
    "pentium3",
    "coreduo",
    "core2duo",
    "n270",
    "athlon",
    "phenom",
    "Conroe",
    "Penryn",
    "Nehalem",
    "Westmere",
    "SandyBridge",
    "IvyBridge",
    "Haswell",
    "Broadwell",
    "Skylake",
    "Cascadelake",
    "Cooperlake",
    "Icelake",
    "SapphireRapids",
    "GraniteRapids",
    "SierraForest",
    "Snowridge",
    "Denverton",
    "KnightsMill",
    "Opteron_G1",
    "Opteron_G2",
    "Opteron_G3",
    "Opteron_G4",
    "Opteron_G5",
    "EPYC",
    "Dhyana",
    "YongFeng",
];

/// `-cpu MODEL[,+flag,-flag,flag=value,...]`. Strata gives the guest the
/// CPUID KVM supports whatever the model and flags say; an unknown model
/// is warned about, a malformed flag refused. `Ok(Some(text))` is
/// `-cpu help`.
fn parse_cpu(v: &str) -> Result<Option<String>, String> {
    let mut parts = v.split(',');
    let model = parts.next().unwrap_or("");
    if model == "help" || model == "?" {
        let mut text = String::from(
            "Available CPUs (Strata builds CPUID from KVM's supported set for every model):\n",
        );
        for m in CPU_MODELS {
            text.push_str(&format!("x86 {m}\n"));
        }
        return Ok(Some(text));
    }
    if model.is_empty() {
        return Err(format!("-cpu {v}: missing CPU model"));
    }
    let known = CPU_MODELS
        .iter()
        .any(|m| model == *m || model.strip_prefix(m).is_some_and(|r| r.starts_with('-')));
    if !known {
        warn(&format!(
            "-cpu {model}: unknown CPU model; Strata builds CPUID from KVM's supported set"
        ));
    }
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    for flag in parts {
        let name = flag
            .strip_prefix(['+', '-'])
            .or_else(|| flag.split_once('=').map(|(k, _)| k))
            .unwrap_or(flag);
        if !name_ok(name) {
            return Err(format!("-cpu {v}: invalid CPU feature '{flag}'"));
        }
    }
    Ok(None)
}

/// `-nic`, `-net` and `-netdev`: `none` is what Strata has; any other
/// backend of QEMU's is warned about (no network device yet).
fn parse_net(opt: &str, v: &str) -> Result<(), String> {
    const TYPES: &[&str] = &[
        "user",
        "tap",
        "bridge",
        "socket",
        "stream",
        "dgram",
        "vde",
        "l2tpv3",
        "vhost-user",
        "vhost-vdpa",
        "netmap",
        "af-xdp",
        "hubport",
        "nic",
    ];
    let ty = v.split(',').next().unwrap_or("");
    if ty == "none" && opt != "-netdev" {
        return Ok(());
    }
    if !TYPES.contains(&ty) {
        return Err(format!("{opt} {v}: invalid network backend type '{ty}'"));
    }
    warn(&format!(
        "{opt} {v}: Strata has no network device; the guest has no network"
    ));
    Ok(())
}

/// `-vga TYPE`: `none` is what Strata has.
fn parse_vga(v: &str) -> Result<(), String> {
    match v {
        "none" => Ok(()),
        "std" | "cirrus" | "virtio" | "qxl" | "vmware" | "xenfb" | "tcx" | "cg3" => {
            warn(&format!(
                "-vga {v}: Strata has no display device yet; ignoring"
            ));
            Ok(())
        }
        _ => Err(format!(
            "-vga {v}: invalid VGA type (std, cirrus, virtio, qxl, vmware, none)"
        )),
    }
}

/// `-display TYPE[,...]` (or `vnc=DISPLAY`): `none` is what Strata has.
fn parse_display(v: &str) -> Result<(), String> {
    let first = v.split(',').next().unwrap_or("");
    let ty = first.split('=').next().unwrap_or("");
    match ty {
        "none" => Ok(()),
        "gtk" | "sdl" | "curses" | "vnc" | "egl-headless" | "spice-app" | "cocoa" | "dbus" => {
            warn(&format!(
                "-display {v}: Strata has no display yet; ignoring"
            ));
            Ok(())
        }
        _ => Err(format!("-display {v}: unknown display type")),
    }
}

/// `-rtc base=utc|localtime|DATE,clock=host|rt|vm,driftfix=none|slew`:
/// the seconds to add to the host's UTC time for the guest's RTC, if
/// `base` is given (a later `-rtc clock=vm` keeps an earlier base). Strata's
/// RTC always follows the host clock and has no interrupt catch-up, so
/// `clock` and `driftfix` are only checked.
fn parse_rtc(v: &str) -> Result<Option<i64>, String> {
    let mut offset = None;
    for (k, val) in split_opts("-rtc", v, None)? {
        match k.as_str() {
            "base" => {
                offset = Some(match val.as_str() {
                    "utc" => 0,
                    "localtime" => local_utc_offset(),
                    d => {
                        let t = parse_rtc_date(d).ok_or_else(|| {
                            format!(
                                "-rtc {v}: invalid base '{d}' (utc, localtime, 2006-06-17T16:01:21 or 2006-06-17)"
                            )
                        })?;
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs() as i64);
                        t - now
                    }
                })
            }
            "clock" if matches!(val.as_str(), "host" | "rt" | "vm") => {}
            "driftfix" if matches!(val.as_str(), "none" | "slew") => {}
            "clock" | "driftfix" => return Err(format!("-rtc {v}: invalid {k} '{val}'")),
            _ => return Err(format!("-rtc {v}: unknown property '{k}'")),
        }
    }
    Ok(offset)
}

/// The host's offset from UTC now, in seconds (east positive).
fn local_utc_offset() -> i64 {
    // SAFETY: time(NULL) only returns the time; localtime_r writes the
    // zeroed `tm` we own and reads `now`, and returns NULL on failure.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return 0;
        }
        tm.tm_gmtoff
    }
}

/// `YYYY-MM-DDTHH:MM:SS` or `YYYY-MM-DD` (UTC) to seconds since 1970.
fn parse_rtc_date(s: &str) -> Option<i64> {
    let (date, time) = s.split_once('T').unwrap_or((s, "00:00:00"));
    let num = |p: &str, len: usize| -> Option<i64> {
        (p.len() == len && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse().ok())
            .flatten()
    };
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || t.len() != 3 {
        return None;
    }
    let (y, m, day) = (num(d[0], 4)?, num(d[1], 2)?, num(d[2], 2)?);
    let (hh, mm, ss) = (num(t[0], 2)?, num(t[1], 2)?, num(t[2], 2)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + hh * 3600 + mm * 60 + ss)
}

/// `-msg timestamp=on|off,guest-name=on|off`: checked; Strata's messages
/// carry neither.
fn parse_msg(v: &str) -> Result<(), String> {
    for (k, val) in split_opts("-msg", v, Some("timestamp"))? {
        match k.as_str() {
            "timestamp" | "guest-name" => {
                parse_bool("-msg", &k, &val)?;
            }
            _ => return Err(format!("-msg {v}: unknown property '{k}'")),
        }
    }
    Ok(())
}

/// `-overcommit mem-lock=on|off|on-fault,cpu-pm=on|off`: off is what
/// Strata does; on is warned about.
fn parse_overcommit(v: &str) -> Result<(), String> {
    let mut on = Vec::new();
    for (k, val) in split_opts("-overcommit", v, None)? {
        let set = match (k.as_str(), val.as_str()) {
            ("mem-lock", "on-fault") => true,
            ("mem-lock" | "cpu-pm", _) => parse_bool("-overcommit", &k, &val)?,
            _ => return Err(format!("-overcommit {v}: unknown property '{k}'")),
        };
        if set {
            on.push(format!("{k}={val}"));
        }
    }
    // Warned only once the whole value is known to be good.
    for o in on {
        warn(&format!(
            "-overcommit {o}: not supported by Strata; ignoring"
        ));
    }
    Ok(())
}

/// `-sandbox on|off[,obsolete=,elevateprivileges=,spawn=,resourcecontrol=]`.
fn parse_sandbox(v: &str) -> Result<(), String> {
    let mut enable = false;
    for (k, val) in split_opts("-sandbox", v, Some("enable"))? {
        match k.as_str() {
            "enable" => enable = parse_bool("-sandbox", &k, &val)?,
            "obsolete" | "elevateprivileges" | "spawn" | "resourcecontrol"
                if matches!(val.as_str(), "allow" | "deny" | "children") => {}
            "obsolete" | "elevateprivileges" | "spawn" | "resourcecontrol" => {
                return Err(format!("-sandbox {v}: invalid {k} '{val}'"))
            }
            _ => return Err(format!("-sandbox {v}: unknown property '{k}'")),
        }
    }
    if enable {
        warn(&format!(
            "-sandbox {v}: Strata has no seccomp sandbox yet; running without one"
        ));
    }
    Ok(())
}

/// The firmware file `-L` finds when `-bios` is not given.
const BIOS_NAME: &str = "bios-256k.bin";
/// Where QEMU's firmware is installed, searched after the `-L` directories.
const FIRMWARE_DIRS: &[&str] = &["/usr/share/seabios", "/usr/share/qemu"];

/// `-bios NAME`: the file as given, else NAME in the `-L` directories and
/// the system's firmware directories (QEMU's `qemu_find_file`).
fn find_bios(name: &str, dirs: &[PathBuf]) -> Result<PathBuf, String> {
    let p = PathBuf::from(name);
    if p.is_file() {
        return Ok(p);
    }
    if p.exists() {
        return Err(format!("-bios {name}: not a regular file"));
    }
    if p.is_relative() {
        let sys = FIRMWARE_DIRS.iter().map(PathBuf::from);
        if let Some(found) = dirs
            .iter()
            .cloned()
            .chain(sys)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
        {
            return Ok(found);
        }
    }
    Err(format!("-bios {name}: no such file"))
}

pub fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut cfg = MachineConfig::default();
    let mut serial: Vec<Option<CharDev>> = Vec::new();
    let mut chardevs = Chardevs::default();
    let mut monitors = Vec::new();
    let (mut nographic, mut nodefaults, mut accel_set) = (false, false, false);
    let (mut mem_backend, mut mem_backends, mut mem_given) =
        (None, Vec::<(String, u64, bool)>::new(), false);
    let mut numa = Numa::default();
    let mut snapshot = false;
    let mut drive_args: Vec<(String, String)> = Vec::new();
    let (mut kernel, mut initrd, mut append) = (None, None, None);
    let mut process = Process::default();
    let mut bios: Option<String> = None;
    // Options whose chardev is stdio, as typed: a daemon has no stdio.
    let mut stdio_users: Vec<String> = Vec::new();
    let (mut explicit_serial, mut explicit_monitor) = (false, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if !arg.starts_with('-') {
            // QEMU: a bare argument is the first hard disk.
            drive_args.push(("-hda".into(), arg.clone()));
            continue;
        }
        // QEMU accepts both -opt and --opt.
        let opt = arg
            .strip_prefix("--")
            .map(|s| format!("-{s}"))
            .unwrap_or_else(|| arg.clone());
        let Some(takes_value) = takes_value(&opt) else {
            return Err(format!("{opt}: invalid option"));
        };
        let value = if takes_value {
            match it.next() {
                Some(v) => v.as_str(),
                None => return Err(format!("{opt}: requires an argument")),
            }
        } else {
            ""
        };
        if let Some((_, _, why)) = IGNORED.iter().find(|(o, ..)| *o == opt) {
            if let Some(why) = why {
                warn(&format!("{opt}: {why}"));
            }
            continue;
        }
        if uses_stdio(&opt, value) {
            stdio_users.push(format!("{opt} {value}"));
        }
        explicit_serial |= opt == "-serial";
        explicit_monitor |= matches!(opt.as_str(), "-monitor" | "-qmp" | "-qmp-pretty" | "-mon");
        match opt.as_str() {
            "-help" | "-h" => return Ok(Parsed::Help),
            "-version" => return Ok(Parsed::Version),
            "-nographic" => nographic = true,
            "-nodefaults" => nodefaults = true,
            "-no-reboot" => cfg.no_reboot = true,
            "-snapshot" => snapshot = true,
            "-S" => cfg.paused = true,
            "-usb" => cfg.usb = true,
            "-enable-kvm" => {
                cfg.accel = Accel::Kvm;
                accel_set = true;
            }
            "-accel" => {
                parse_accel(&mut cfg, "-accel ", value)?;
                accel_set = true;
            }
            "-machine" | "-M" => {
                if let Some(help) =
                    parse_machine(&mut cfg, value, &mut accel_set, &mut mem_backend)?
                {
                    return Ok(Parsed::Print(help));
                }
            }
            "-m" => {
                let opts = split_opts("-m", value, Some("size"))?;
                for (k, v) in opts {
                    match k.as_str() {
                        "size" => {
                            cfg.mem_size = keyval::parse_size_str(&v, keyval::MIB)
                                .map_err(|e| format!("-m {value}: invalid size '{v}': {e}"))?;
                            mem_given = true;
                            if cfg.mem_size == 0 {
                                return Err(format!("-m {value}: guest memory cannot be zero"));
                            }
                        }
                        "slots" | "maxmem" => {}
                        _ => return Err(format!("-m {value}: unknown property '{k}'")),
                    }
                }
            }
            "-smp" => parse_smp(&mut cfg, value)?,
            "-numa" => parse_numa(value, &mut numa)?,
            "-bios" => bios = Some(value.to_string()),
            "-boot" => parse_boot(&mut cfg, value)?,
            "-serial" => match value.strip_prefix("chardev:") {
                Some(id) => {
                    chardevs.serial_ref(serial.len(), id, value);
                    serial.push(None);
                }
                None => serial.push(parse_chardev("-serial", value)?),
            },
            "-chardev" => chardevs.add(value)?,
            "-mon" => chardevs.mon(value)?,
            "-qmp" | "-qmp-pretty" | "-monitor" => {
                let m = crate::chardev_args::monitor(&opt, value, opt == "-qmp-pretty")?;
                monitors.extend(m);
            }
            "-debugcon" => cfg.debugcon = parse_chardev("-debugcon", value)?,
            "-global" => cfg.globals.push(
                vmm::device::parse_global(value).map_err(|e| format!("-global {value}: {e}"))?,
            ),
            "-display" => parse_display(value)?,
            "-vga" => parse_vga(value)?,
            "-nic" | "-net" | "-netdev" => parse_net(&opt, value)?,
            "-cpu" => {
                if let Some(help) = parse_cpu(value)? {
                    return Ok(Parsed::Print(help));
                }
            }
            "-rtc" => {
                if let Some(offset) = parse_rtc(value)? {
                    cfg.rtc_offset = offset;
                }
            }
            "-uuid" => {
                vmm::smbios::parse_uuid(value).map_err(|_| {
                    format!("-uuid {value}: not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
                })?;
                // QEMU's -uuid is the SMBIOS system UUID; a later
                // -smbios type=1,uuid= wins, as there.
                cfg.smbios.push(vec![
                    ("type".into(), "1".into()),
                    ("uuid".into(), value.into()),
                ]);
            }
            "-L" => {
                let d = PathBuf::from(value);
                if !d.is_dir() {
                    return Err(format!("-L {value}: no such directory"));
                }
                cfg.firmware_dirs.push(d);
            }
            "-msg" => parse_msg(value)?,
            "-overcommit" => parse_overcommit(value)?,
            "-sandbox" => parse_sandbox(value)?,
            "-pidfile" => process.pidfile = Some(PathBuf::from(value)),
            "-D" => process.log_file = Some(PathBuf::from(value)),
            "-daemonize" => process.daemonize = true,
            "-name" => {
                let o = split_opts("-name", value, Some("guest"))?;
                cfg.name = o.into_iter().find(|(k, _)| k == "guest").map(|(_, v)| v);
            }
            "-qtest" => {
                cfg.qtest = parse_chardev("-qtest", value)?;
                if !accel_set {
                    cfg.accel = Accel::Qtest;
                }
            }
            "-qtest-log" => cfg.qtest_log = Some(PathBuf::from(value)),
            "-incoming" => {
                cfg.incoming = Some(
                    vmm::migration::Uri::parse(value)
                        .map_err(|e| format!("-incoming {value}: {e}"))?,
                )
            }
            // Drives are desugared once the machine is known: it decides
            // how many units an IDE bus has.
            "-drive" | "-hda" | "-hdb" | "-hdc" | "-hdd" | "-cdrom" | "-fda" | "-fdb" => {
                drive_args.push((opt.clone(), value.to_string()))
            }
            "-blockdev" => cfg.blockdevs.push(value.to_string()),
            "-kernel" => kernel = Some(PathBuf::from(value)),
            "-initrd" => initrd = Some(value.to_string()),
            "-append" => append = Some(value.to_string()),
            "-smbios" => cfg.smbios.push(parse_smbios(value)?),
            "-device" => match DeviceSpec::parse(value) {
                Ok(DeviceArg::Spec(spec)) => {
                    if let Some(id) = &spec.id {
                        if cfg.devices.iter().any(|d| d.id.as_ref() == Some(id)) {
                            return Err(format!("-device {value}: Duplicate ID '{id}' for device"));
                        }
                    }
                    cfg.devices.push(spec)
                }
                Ok(DeviceArg::Help(text)) => return Ok(Parsed::Print(text)),
                Err(e) => return Err(format!("-device {value}: {e}")),
            },
            "-object" => {
                let props = split_opts("-object", value, Some("qom-type"))?;
                let get = |k: &str| props.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v);
                match get("qom-type").map(String::as_str) {
                    Some("iothread") => {
                        let id = get("id")
                            .filter(|v| !v.is_empty())
                            .ok_or_else(|| format!("-object {value}: iothread needs id="))?;
                        if cfg.iothreads.contains(id) {
                            return Err(format!("-object {value}: duplicate id '{id}'"));
                        }
                        cfg.iothreads.push(id.clone());
                        if let Some(v) = get("poll-max-ns") {
                            let ns = v.parse::<u64>().map_err(|_| {
                                format!(
                                    "-object {value}: poll-max-ns must be a number of nanoseconds"
                                )
                            })?;
                            cfg.iothread_poll_max_ns.push((id.clone(), ns));
                        }
                    }
                    // QEMU's main-loop object: here it tunes the loop of
                    // devices that name no iothread.
                    Some("main-loop") => {
                        if let Some(v) = get("poll-max-ns") {
                            let ns = v.parse::<u64>().map_err(|_| {
                                format!(
                                    "-object {value}: poll-max-ns must be a number of nanoseconds"
                                )
                            })?;
                            cfg.iothread_poll_max_ns
                                .push((devices::virtio::event_loop::MAIN_LOOP.to_string(), ns));
                        }
                    }
                    Some("secret" | "tls-creds-x509") => {
                        // Created by main before the machine, which opens
                        // the nbd nodes that use them.
                        let spec = block::objects::parse("-object", value)?;
                        if process.objects.iter().any(|o| o.id() == spec.id()) {
                            return Err(format!("-object {value}: duplicate id '{}'", spec.id()));
                        }
                        process.objects.push(spec);
                    }
                    Some(ty @ ("memory-backend-memfd" | "memory-backend-ram")) => {
                        let id = get("id")
                            .filter(|v| !v.is_empty())
                            .ok_or_else(|| format!("-object {value}: {ty} needs id="))?;
                        let size = get("size")
                            .ok_or_else(|| format!("-object {value}: {ty} needs size="))?;
                        let size = keyval::parse_size_str(size, 1)
                            .map_err(|e| format!("-object {value}: invalid size '{size}': {e}"))?;
                        // A memfd is shared unless told otherwise (QEMU's
                        // default for it); plain RAM is private.
                        let share = match get("share") {
                            Some(v) => parse_bool("-object", "share", v)?,
                            None => ty == "memory-backend-memfd",
                        };
                        if mem_backends.iter().any(|(i, _, _)| i == id) {
                            return Err(format!("-object {value}: duplicate id '{id}'"));
                        }
                        mem_backends.push((id.clone(), size, share));
                    }
                    _ => return Err(format!("-object {value}: unsupported object type")),
                }
            }
            _ => return Err(format!("{opt}: invalid option")),
        }
    }
    if let Some(name) = bios {
        cfg.bios = find_bios(&name, &cfg.firmware_dirs)?;
        cfg.bios_explicit = true;
    } else if let Some(p) = cfg
        .firmware_dirs
        .iter()
        .map(|d| d.join(BIOS_NAME))
        .find(|p| p.is_file())
    {
        cfg.bios = p;
    }
    let board = vmm::machine::board(&cfg);
    let mut drives = block::drive::DriveTable::with_max_devs(|i| board.units_per_bus(i));
    for (opt, value) in drive_args {
        let spec = match opt.as_str() {
            "-drive" => drives.parse_drive(&value),
            "-cdrom" => drives.cdrom(&value),
            o if o.starts_with("-hd") => drives.hd((o.as_bytes()[3] - b'a') as u32, &value),
            o => drives.fd((o.as_bytes()[3] - b'a') as u32, &value),
        };
        cfg.drives
            .push(spec.map_err(|e| format!("{opt} {value}: {e}"))?);
    }
    if snapshot {
        // QEMU: `-snapshot` is snapshot=on for every drive that does not
        // say snapshot=off.
        for d in &mut cfg.drives {
            d.snapshot.get_or_insert(true);
        }
    }
    cfg.kernel = kernel_config(kernel, initrd, append)?;
    if cfg.accel == Accel::Qtest && cfg.qtest.is_none() {
        return Err("-accel qtest: requires -qtest unix:PATH or -qtest stdio".into());
    }
    if cfg.accel == Accel::Kvm && cfg.qtest.is_some() {
        return Err("-qtest: requires the qtest accelerator (-machine accel=qtest)".into());
    }
    // One NUMA node's memdev is the machine's RAM, as memory-backend= is
    // (QEMU refuses both at once).
    let ram_from = match (&mem_backend, numa.memdev) {
        (Some(_), Some(_)) => {
            return Err("-numa node,memdev=: cannot be used with -machine memory-backend=".into())
        }
        (Some(id), None) => Some((id.clone(), "-machine memory-backend")),
        (None, Some(id)) => Some((id, "-numa node,memdev")),
        (None, None) => None,
    };
    if let Some((id, what)) = &ram_from {
        let Some(&(_, size, share)) = mem_backends.iter().find(|(i, _, _)| i == id) else {
            return Err(format!(
                "{what}={id}: no memory backend object with that id"
            ));
        };
        if mem_given && size != cfg.mem_size {
            return Err(format!(
                "{what}={id}: the backend's size ({} MiB) differs from -m ({} MiB)",
                size >> 20,
                cfg.mem_size >> 20
            ));
        }
        cfg.mem_size = size;
        cfg.shared_ram = share;
    }
    cfg.chardevs = chardevs.all();
    monitors.extend(chardevs.resolve(&mut serial)?);
    let monitor_on_stdio = monitors
        .iter()
        .any(|m| matches!(m.chardev, CharDev::Stdio { .. }));
    cfg.monitors = monitors;
    cfg.serial = if !serial.is_empty() {
        serial.into_iter().flatten().collect()
    } else if cfg.qtest.is_some() || monitor_on_stdio {
        // qtest owns the test's channel, or a monitor owns stdio; COM1
        // exists but prints nowhere.
        vec![CharDev::Null]
    } else if nodefaults {
        Vec::new()
    } else {
        vec![CharDev::Stdio { mux: true }]
    };
    if process.daemonize {
        // QEMU's refusals: a daemon's stdio is /dev/null. -nographic is
        // refused unless the serial port and monitor it would put on
        // stdio were given elsewhere (or -nodefaults removed them).
        if nographic && !nodefaults && !(explicit_serial && explicit_monitor) {
            return Err("-nographic cannot be used with -daemonize".into());
        }
        if let Some(user) = stdio_users.first() {
            return Err(format!("{user}: cannot use stdio with -daemonize"));
        }
        if !explicit_serial && !cfg.serial.is_empty() {
            // QEMU's default serial port without -nographic is a virtual
            // console, which prints nowhere without a display.
            cfg.serial = vec![CharDev::Null];
        }
    }
    let _ = nographic; // COM1 on mon:stdio is already the default.
    Ok(Parsed::Run(Box::new(cfg), process))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn cfg(s: &str) -> MachineConfig {
        match parse(&args(s)).unwrap() {
            Parsed::Run(c, _) => *c,
            _ => panic!(),
        }
    }

    #[test]
    fn options() {
        let c = cfg("-m 6G -smp 4 -M pc,accel=kvm -no-reboot -nographic");
        assert_eq!(c.mem_size, 6 << 30);
        assert_eq!((c.cpus, c.max_cpus), (4, 4));
        assert!(c.no_reboot);
        assert_eq!(c.serial, vec![CharDev::Stdio { mux: true }]);
        let c = cfg("-smp cores=2,threads=2 -nodefaults -boot d -debugcon file:/tmp/x -global isa-debugcon.iobase=0x402");
        assert_eq!(c.cpus, 4);
        assert!(c.serial.is_empty());
        assert_eq!(c.boot.order, "d");
        assert_eq!(vmm::device::debugcon::iobase(&c.globals), Ok(0x402));
        assert_eq!(c.debugcon, Some(CharDev::File("/tmp/x".into())));
        let c = cfg("-machine pc,accel=qtest -qtest unix:/tmp/q,,x -serial none");
        assert_eq!(c.accel, Accel::Qtest);
        assert_eq!(
            c.qtest,
            Some(CharDev::Unix {
                path: "/tmp/q,x".into(),
                server: false,
                wait: false
            })
        );
        assert!(c.serial.is_empty());
    }

    #[test]
    fn iothread_objects() {
        let c = cfg("-object iothread,id=io0 -object iothread,id=io1");
        assert_eq!(c.iothreads, vec!["io0".to_string(), "io1".to_string()]);
        let c = cfg("-object iothread,id=io0,poll-max-ns=0");
        assert_eq!(c.iothread_poll_max_ns, vec![("io0".to_string(), 0)]);
        assert!(parse(&args("-object iothread,id=a,poll-max-ns=x")).is_err());
        assert!(parse(&args("-object iothread,id=a -object iothread,id=a")).is_err());
        assert!(parse(&args("-object iothread")).is_err());
        assert!(parse(&args("-object memory-backend-ram,id=m")).is_err());
    }

    /// `-numa node,memdev=` gives the one node's RAM from a backend, as
    /// `-machine memory-backend=` does.
    #[test]
    fn numa_node_memdev() {
        let c = cfg("-object memory-backend-memfd,id=m,size=256M,share=on -numa node,memdev=m");
        assert!(c.shared_ram);
        assert_eq!(c.mem_size, 256 << 20);
        let c = cfg("-numa node -m 128");
        assert!(!c.shared_ram);
        let err = |a: &str| match parse(&args(a)) {
            Err(e) => e,
            Ok(_) => panic!("{a} parsed"),
        };
        assert!(err("-numa node,memdev=x").contains("-numa node,memdev=x: no memory backend"));
        assert!(err("-numa node -numa node").contains("one NUMA node"));
        assert!(err("-numa node,nodeid=1").contains("one NUMA node"));
        assert!(err("-numa dist,src=0,dst=0,val=10").contains("only 'node'"));
        assert!(err(
            "-object memory-backend-memfd,id=m,size=1G -numa node,memdev=m -machine memory-backend=m"
        )
        .contains("cannot be used with"));
    }

    #[test]
    fn secret_and_tls_objects() {
        let Ok(Parsed::Run(_, p)) = parse(&args(
            "-object secret,id=s0,data=pw -object tls-creds-x509,id=t0,dir=/pki,verify-peer=off",
        )) else {
            panic!("not parsed");
        };
        let ids: Vec<&str> = p.objects.iter().map(|o| o.id()).collect();
        assert_eq!(ids, ["s0", "t0"]);
        for bad in [
            "-object secret,id=s0,data=a -object secret,id=s0,data=b",
            "-object tls-creds-x509,id=t0",
            "-object tls-creds-x509,id=t0,dir=/pki,endpoint=peer",
        ] {
            let e = parse(&args(bad)).err().expect(bad);
            assert!(e.starts_with("-object "), "{e}");
        }
    }

    #[test]
    fn errors_name_the_option() {
        for (a, want) in [
            ("-frobnicate", "-frobnicate: invalid option"),
            ("-machine q99", "-machine q99: unsupported machine type"),
            ("-m 0", "-m 0: guest memory cannot be zero"),
            ("-m 12Q", "-m 12Q: invalid size"),
            (
                "-bios /nonexistent/bios.bin",
                "-bios /nonexistent/bios.bin: no such file",
            ),
            ("-smp x", "-smp: cpus=x: not a number"),
            ("-m", "-m: requires an argument"),
            (
                "-accel tcg",
                "-accel tcg: not supported; Strata runs only on KVM",
            ),
            (
                "-machine accel=tcg",
                "-machine accel=tcg: not supported; Strata runs only on KVM",
            ),
            (
                "-daemonize -nographic",
                "-nographic cannot be used with -daemonize",
            ),
            (
                "-daemonize -serial mon:stdio",
                "-serial mon:stdio: cannot use stdio with -daemonize",
            ),
            ("-cpu host,+", "-cpu host,+: invalid CPU feature '+'"),
            (
                "-nic bogus",
                "-nic bogus: invalid network backend type 'bogus'",
            ),
            ("-vga foo", "-vga foo: invalid VGA type"),
            ("-display foo", "-display foo: unknown display type"),
            ("-rtc base=2006-13-01", "-rtc base=2006-13-01: invalid base"),
            ("-rtc clock=wall", "-rtc clock=wall: invalid clock 'wall'"),
            ("-rtc driftfix=x", "-rtc driftfix=x: invalid driftfix 'x'"),
            ("-uuid 1234", "-uuid 1234: not a UUID"),
            (
                "-L /nonexistent/dir",
                "-L /nonexistent/dir: no such directory",
            ),
            ("-msg timestamp=maybe", "-msg"),
            (
                "-overcommit foo=on",
                "-overcommit foo=on: unknown property 'foo'",
            ),
            (
                "-sandbox on,spawn=x",
                "-sandbox on,spawn=x: invalid spawn 'x'",
            ),
        ] {
            let e = parse(&args(a))
                .err()
                .unwrap_or_else(|| panic!("{a} should fail"));
            assert!(e.starts_with(want), "{a}: {e}");
        }
    }

    #[test]
    fn compat_forms() {
        let c = cfg(
            "-cpu host,+x2apic,-vmx,level=13 -nic none -net none -vga none -display none \
             -no-hpet -no-user-config -nodefconfig -no-shutdown -k en-us -d guest_errors \
             -msg timestamp=on -overcommit mem-lock=off,cpu-pm=off -sandbox off \
             -rtc base=utc,clock=host,driftfix=slew",
        );
        assert_eq!(c.rtc_offset, 0);
        assert!(matches!(parse(&args("-cpu help")), Ok(Parsed::Print(_))));
        let c = cfg("-uuid 12345678-9abc-def0-1122-334455667788");
        assert_eq!(c.smbios.len(), 1);
        assert_eq!(c.smbios[0][1].1, "12345678-9abc-def0-1122-334455667788");
        match parse(&args("-pidfile /tmp/p -D /tmp/l")).unwrap() {
            Parsed::Run(_, p) => {
                assert_eq!(p.pidfile, Some(PathBuf::from("/tmp/p")));
                assert_eq!(p.log_file, Some(PathBuf::from("/tmp/l")));
            }
            _ => panic!(),
        }
        // A bare argument is -hda.
        let c = cfg("disk.img");
        assert_eq!(c.drives.len(), 1);
        assert!(cfg("-rtc base=localtime").rtc_offset.abs() <= 14 * 3600);
    }

    #[test]
    fn rtc_dates() {
        assert_eq!(parse_rtc_date("1970-01-01"), Some(0));
        assert_eq!(parse_rtc_date("2006-06-17T16:01:21"), Some(1150560081));
        assert_eq!(parse_rtc_date("2000-03-01"), Some(951868800));
        for bad in [
            "2006-6-17",
            "2006-06-17T25:00:00",
            "2006-06-17T1:2:3",
            "now",
            "2006-00-10",
        ] {
            assert_eq!(parse_rtc_date(bad), None, "{bad}");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let off = parse_rtc("base=2006-06-17T16:01:21").unwrap().unwrap();
        assert_eq!(parse_rtc("clock=vm"), Ok(None));
        assert_eq!(
            cfg("-rtc base=2006-06-17 -rtc clock=vm").rtc_offset,
            cfg("-rtc base=2006-06-17").rtc_offset
        );
        assert!((now + off - 1150560081).abs() <= 2);
    }

    #[test]
    fn bios_search_path() {
        let d = std::env::temp_dir().join(format!("strata-L-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("my-bios.bin"), b"x").unwrap();
        std::fs::write(d.join(BIOS_NAME), b"x").unwrap();
        let l = d.display().to_string();
        let c = cfg(&format!("-L {l} -bios my-bios.bin"));
        assert_eq!(c.bios, d.join("my-bios.bin"));
        assert!(c.bios_explicit);
        assert_eq!(c.firmware_dirs, vec![d.clone()]);
        // -L after -bios counts too, and without -bios it finds bios-256k.bin.
        assert_eq!(
            cfg(&format!("-bios my-bios.bin -L {l}")).bios,
            d.join("my-bios.bin")
        );
        let c = cfg(&format!("-L {l}"));
        assert_eq!(c.bios, d.join(BIOS_NAME));
        assert!(!c.bios_explicit);
        assert!(parse(&args("-bios my-bios.bin")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
