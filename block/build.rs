//! Finds the optional system libraries of protocol drivers. A driver
//! whose library is missing is left out of the build, with a warning
//! naming the Debian package to install; nothing is stubbed.

use std::path::Path;

/// Whether `header` is in the system include directory and `lib` can be
/// linked from the multiarch or plain library directories.
fn have(header: &str, lib: &str) -> bool {
    let lib_dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ];
    Path::new("/usr/include").join(header).exists()
        && lib_dirs
            .iter()
            .any(|d| Path::new(d).join(format!("lib{lib}.so")).exists())
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(have_rbd)");
    println!("cargo::rerun-if-changed=/usr/include/rbd/librbd.h");
    println!("cargo::rerun-if-changed=build.rs");
    if have("rbd/librbd.h", "rbd") && have("rados/librados.h", "rados") {
        println!("cargo::rustc-cfg=have_rbd");
        println!("cargo::rustc-link-lib=rbd");
        println!("cargo::rustc-link-lib=rados");
    } else {
        println!(
            "cargo::warning=the rbd block driver is left out: librbd and librados were not found (install Debian's librbd-dev and librados-dev, then rebuild)"
        );
    }
}
