//! `strata`: runs a PC guest, with qemu-system-x86_64's command line.

use std::path::Path;

use cli::system_args::{parse, Parsed, Process, USAGE};

/// Strata's log: stderr, or the `-D` file.
fn init_log(log_file: Option<&Path>) -> Result<(), String> {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if let Some(p) = log_file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| format!("-D {}: {e}", p.display()))?;
        b.target(env_logger::Target::Pipe(Box::new(f)));
    }
    b.init();
    Ok(())
}

/// Runs the machine with `-pidfile` written around it, detached first
/// with `-daemonize`.
fn run(cfg: vmm::config::MachineConfig, process: &Process) -> Result<i32, String> {
    init_log(process.log_file.as_deref())?;
    for o in &process.objects {
        block::objects::add(o)?;
    }
    vmm::validate(&cfg).map_err(|e| e.to_string())?;
    let keep_stderr = process.log_file.is_some();
    cli::daemon::around(process, "-pidfile", keep_stderr, |ready| {
        vmm::run(cfg, ready).map_err(|e| e.to_string())
    })
}

fn main() {
    // Before anything is opened: the descriptors `addr.type=fd` may name.
    vmm::inherited_fds::record();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match parse(&args) {
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            0
        }
        Ok(Parsed::Print(text)) => {
            print!("{text}");
            0
        }
        Ok(Parsed::Version) => {
            println!(
                "QEMU emulator version {}.{}.{}{}",
                vmm::QEMU_VERSION.0,
                vmm::QEMU_VERSION.1,
                vmm::QEMU_VERSION.2,
                vmm::package_version()
            );
            println!(
                "Copyright (c) the Strata developers (a KVM PC emulator with QEMU's command line)"
            );
            0
        }
        Ok(Parsed::Run(cfg, process)) => match run(*cfg, &process) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("strata: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("strata: {e}");
            1
        }
    };
    std::process::exit(code);
}
