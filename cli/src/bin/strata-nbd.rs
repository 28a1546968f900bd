//! `strata-nbd`: the qemu-nbd-compatible NBD server. The work is in
//! `cli/src/nbd/`; main only forwards the arguments and the exit code.
//! (Rust programs ignore SIGPIPE already: a client that vanishes makes
//! writes fail with EPIPE instead of killing the server.)

#[path = "../nbd/mod.rs"]
mod nbd;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(nbd::main_with_args(args));
}
