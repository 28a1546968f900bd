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
    cli::daemon::around(process, "--pidfile", false, |ready| {
        vmm::storage_daemon::run(cfg, startup, ready)
            .map_err(|e| cli::storage_daemon::double_dash(e.to_string()))
    })
}

fn main() {
    // Before anything is opened: the descriptors `addr.type=fd` may name.
    vmm::inherited_fds::record();
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
