//! `strata`: runs a PC guest, with qemu-system-x86_64's command line.

use cli::system_args::{parse, Parsed, USAGE};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
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
            println!("Strata emulator version {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Parsed::Run(cfg)) => match vmm::validate(&cfg).and_then(|_| vmm::run(*cfg)) {
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
