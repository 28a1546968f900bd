//! `strata-img`: the qemu-img-compatible image tool. The work is in
//! `cli/src/img/`; main only forwards the arguments and the exit code.

#[path = "../img/mod.rs"]
mod img;

fn main() {
    // Die quietly on a closed pipe (`strata-img map ... | head`), as C tools
    // such as qemu-img do, instead of panicking in println!.
    // SAFETY: setting SIGPIPE to its default action before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(img::main_with_args(args));
}
