//! `strata-storage-daemon`: block graphs exported over NBD and
//! vhost-user-blk, with qemu-storage-daemon's command line and QMP.

use cli::storage_daemon::{parse, DaemonArgs, USAGE};
use vmm::storage_daemon::Startup;

fn run(
    cfg: vmm::config::MachineConfig,
    process: &cli::system_args::Process,
    startup: Vec<Startup>,
) -> Result<i32, String> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    for o in &process.objects {
        block::objects::add(o).map_err(cli::storage_daemon::double_dash)?;
    }
    // The daemon moves to / once ready: keep the pid file's name valid
    // for its removal at exit.
    let pidfile = match &process.pidfile {
        Some(p) if process.daemonize => {
            Some(std::path::absolute(p).map_err(|e| format!("--pidfile {}: {e}", p.display()))?)
        }
        p => p.clone(),
    };
    // Before anything starts a thread.
    let daemon = if process.daemonize {
        Some(cli::daemon::detach()?)
    } else {
        None
    };
    if let Some(p) = &pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("--pidfile {}: {e}", p.display()))?;
    }
    let r = vmm::storage_daemon::run(cfg, startup, || {
        if let Some(d) = daemon {
            d.ready(false);
        }
    })
    .map_err(|e| cli::storage_daemon::double_dash(e.to_string()));
    if let Some(p) = &pidfile {
        let _ = std::fs::remove_file(p);
    }
    r
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match parse(&args) {
        Ok(DaemonArgs::Help) => {
            print!("{USAGE}");
            0
        }
        Ok(DaemonArgs::Version) => {
            println!(
                "strata-storage-daemon version {}.{}.{}{}",
                vmm::QEMU_VERSION.0,
                vmm::QEMU_VERSION.1,
                vmm::QEMU_VERSION.2,
                vmm::package_version()
            );
            0
        }
        Ok(DaemonArgs::Run(cfg, process, startup)) => match run(*cfg, &process, startup) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("strata-storage-daemon: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("strata-storage-daemon: {e}");
            1
        }
    };
    std::process::exit(code);
}
