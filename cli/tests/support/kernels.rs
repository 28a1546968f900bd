//! The project's test kernels (images/build.sh), built once per test run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The directory holding testkernel.bzImage, testkernel-pvh.elf and
/// testkernel-mb.elf.
pub fn dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let images = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images");
        let out = Command::new("sh")
            .arg(images.join("build.sh"))
            .output()
            .expect("run images/build.sh");
        assert!(
            out.status.success(),
            "images/build.sh failed (needs gcc and binutils):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        images.join("out")
    })
    .clone()
}

pub fn path(name: &str) -> String {
    dir().join(name).display().to_string()
}

/// FNV-1a 32, as the test kernel computes it.
pub fn fnv(data: &[u8]) -> u32 {
    data.iter()
        .fold(2166136261u32, |h, &b| (h ^ b as u32).wrapping_mul(16777619))
}
