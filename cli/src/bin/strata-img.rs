//! `strata-img`: the qemu-img-compatible image tool. The work is in
//! `cli/src/img/`; main only forwards the arguments and the exit code.

#[path = "../img/mod.rs"]
mod img;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(img::main_with_args(args));
}
