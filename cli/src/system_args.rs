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
  -m SIZE                           guest RAM (bare numbers are MiB; K/M/G/T suffixes)
  -smp N[,cores=,threads=,sockets=,maxcpus=]  virtual CPUs
  -bios FILE                        firmware (default /usr/share/seabios/bios-256k.bin)
  -boot [order=]DRIVES[,once=,menu=on|off,splash-time=,reboot-timeout=,strict=on|off]
  -serial DEV                       stdio, mon:stdio, file:PATH, unix:PATH[,server][,nowait], null, none
  -debugcon DEV                     isa-debugcon on port 0xe9 (see -global)
  -global DRIVER.PROP=VALUE         default of a device property (e.g. isa-debugcon.iobase=0x402)
  -nographic, -display none         no display (Strata never has one); -nographic wires COM1 to stdio
  -nodefaults                       no default serial port
  -no-reboot                        exit instead of rebooting when the guest resets
  -snapshot                         write to temporary overlays; the disk images stay unchanged
  -name NAME, -S                    guest name; start with vCPUs stopped
  -drive file=F[,if=ide|virtio|none,format=,media=disk|cdrom,cache=,aio=,...]
  -hda/-hdb/-hdc/-hdd F, -cdrom F, -fda/-fdb F   legacy drive shortcuts
  -blockdev driver=...,node-name=...  (or JSON)   a block node
  -device DRIVER[,drive=ID,...]     a device (-device help, -device DRIVER,help)
  -object iothread,id=ID            an I/O thread (virtio-blk-pci iothread=ID)
  -qtest unix:PATH|stdio            qtest protocol (with -accel qtest)
  -kernel FILE                      boot a bzImage, PVH ELF vmlinux or multiboot kernel directly
                                    (with -bios or -boot menu=on: bzImage/multiboot through SeaBIOS)
  -initrd FILE[,FILE2...]           initrds (concatenated) or multiboot modules (FILE ARGS each)
  -append CMDLINE                   kernel command line
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
];

pub enum Parsed {
    Run(Box<MachineConfig>),
    Help,
    Version,
    /// A help listing (`-device help`, `-machine help`): print it, exit 0.
    Print(String),
}

/// Splits a QEMU option value into key/value pairs with the project's
/// keyval grammar: `,,` escapes, an implied first key, bare flags = on.
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

/// Parses a chardev spec as `-serial` and `-debugcon` take it.
pub fn parse_chardev(opt: &str, spec: &str) -> Result<Option<CharDev>, String> {
    let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
    Ok(Some(match kind {
        "none" => return Ok(None),
        "null" => CharDev::Null,
        "stdio" => CharDev::Stdio { mux: false },
        "mon" if rest == "stdio" => CharDev::Stdio { mux: true },
        "file" if !rest.is_empty() => CharDev::File(PathBuf::from(rest)),
        "unix" if !rest.is_empty() => {
            let mut opts = split_opts(opt, rest, Some("path"))?;
            let path = PathBuf::from(opts.remove(0).1);
            let (mut server, mut wait) = (false, true);
            for (k, v) in opts {
                match k.as_str() {
                    "server" => server = parse_bool(opt, &k, &v)?,
                    "wait" => wait = parse_bool(opt, &k, &v)?,
                    "nowait" => wait = false,
                    _ => return Err(format!("{opt} {spec}: unknown unix socket option '{k}'")),
                }
            }
            CharDev::Unix { path, server, wait }
        }
        _ => return Err(format!("{opt} {spec}: unsupported character device")),
    }))
}

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
                parse_accel(cfg, &val)?;
                *accel_set = true;
            }
            "usb" => {
                if parse_bool("-machine", &k, &val)? {
                    eprintln!("strata: warning: -machine usb=on: Strata has no USB controller yet");
                }
            }
            k if IGNORED_MACHINE_PROPS.contains(&k) => {}
            _ => return Err(format!("-machine {v}: unknown property '{k}'")),
        }
    }
    Ok(None)
}

fn parse_accel(cfg: &mut MachineConfig, v: &str) -> Result<(), String> {
    let first = v.split(':').next().unwrap_or("");
    let name = first.split(',').next().unwrap_or("");
    cfg.accel = match name {
        "kvm" => Accel::Kvm,
        "qtest" => Accel::Qtest,
        "tcg" | "xen" | "hvf" | "whpx" | "nvmm" => {
            return Err(format!(
                "-accel {name}: not supported; KVM is Strata's only accelerator"
            ))
        }
        _ => return Err(format!("-accel {v}: unknown accelerator")),
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

pub fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut cfg = MachineConfig::default();
    let mut serial: Vec<Option<CharDev>> = Vec::new();
    let (mut nographic, mut nodefaults, mut accel_set) = (false, false, false);
    let mut snapshot = false;
    let mut drive_args: Vec<(String, String)> = Vec::new();
    let (mut kernel, mut initrd, mut append) = (None, None, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        // QEMU accepts both -opt and --opt.
        let opt = arg
            .strip_prefix("--")
            .map(|s| format!("-{s}"))
            .unwrap_or_else(|| arg.clone());
        let takes_value = opt.starts_with('-')
            && !matches!(
                opt.as_str(),
                "-nographic"
                    | "-nodefaults"
                    | "-no-reboot"
                    | "-snapshot"
                    | "-enable-kvm"
                    | "-S"
                    | "-version"
                    | "-help"
                    | "-h"
            );
        if !opt.starts_with('-') {
            return Err(format!(
                "{arg}: unexpected argument (disk images are not supported yet)"
            ));
        }
        let known = KNOWN_WITH_VALUE.contains(&opt.as_str()) || !takes_value;
        if !known {
            return Err(format!("{opt}: invalid option"));
        }
        let value = if takes_value {
            match it.next() {
                Some(v) => v.as_str(),
                None => return Err(format!("{opt}: requires an argument")),
            }
        } else {
            ""
        };
        match opt.as_str() {
            "-help" | "-h" => return Ok(Parsed::Help),
            "-version" => return Ok(Parsed::Version),
            "-nographic" => nographic = true,
            "-nodefaults" => nodefaults = true,
            "-no-reboot" => cfg.no_reboot = true,
            "-snapshot" => snapshot = true,
            "-S" => cfg.paused = true,
            "-enable-kvm" => {
                cfg.accel = Accel::Kvm;
                accel_set = true;
            }
            "-accel" => {
                parse_accel(&mut cfg, value)?;
                accel_set = true;
            }
            "-machine" | "-M" => {
                if let Some(help) = parse_machine(&mut cfg, value, &mut accel_set)? {
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
            "-bios" => {
                let p = PathBuf::from(value);
                if !p.is_file() {
                    let why = if p.exists() {
                        "not a regular file"
                    } else {
                        "no such file"
                    };
                    return Err(format!("-bios {value}: {why}"));
                }
                cfg.bios = p;
                cfg.bios_explicit = true;
            }
            "-boot" => parse_boot(&mut cfg, value)?,
            "-serial" => serial.push(parse_chardev("-serial", value)?),
            "-debugcon" => cfg.debugcon = parse_chardev("-debugcon", value)?,
            "-global" => cfg.globals.push(
                vmm::device::parse_global(value).map_err(|e| format!("-global {value}: {e}"))?,
            ),
            "-display" => match value.split(',').next() {
                Some("none") => {}
                _ => {
                    return Err(format!(
                        "-display {value}: Strata has no display; use -display none"
                    ))
                }
            },
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
                    }
                    _ => return Err(format!("-object {value}: unsupported object type")),
                }
            }
            _ => return Err(format!("{opt}: invalid option")),
        }
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
    cfg.serial = if !serial.is_empty() {
        serial.into_iter().flatten().collect()
    } else if cfg.qtest.is_some() {
        // qtest owns the test's channel; COM1 exists but prints nowhere.
        vec![CharDev::Null]
    } else if nodefaults {
        Vec::new()
    } else {
        vec![CharDev::Stdio { mux: true }]
    };
    let _ = nographic; // COM1 on mon:stdio is already the default.
    Ok(Parsed::Run(Box::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn cfg(s: &str) -> MachineConfig {
        match parse(&args(s)).unwrap() {
            Parsed::Run(c) => *c,
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
                wait: true
            })
        );
        assert!(c.serial.is_empty());
    }

    #[test]
    fn iothread_objects() {
        let c = cfg("-object iothread,id=io0 -object iothread,id=io1");
        assert_eq!(c.iothreads, vec!["io0".to_string(), "io1".to_string()]);
        assert!(parse(&args("-object iothread,id=a -object iothread,id=a")).is_err());
        assert!(parse(&args("-object iothread")).is_err());
        assert!(parse(&args("-object memory-backend-ram,id=m")).is_err());
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
            ("-accel tcg", "-accel tcg: not supported"),
        ] {
            let e = parse(&args(a))
                .err()
                .unwrap_or_else(|| panic!("{a} should fail"));
            assert!(e.starts_with(want), "{a}: {e}");
        }
    }
}
