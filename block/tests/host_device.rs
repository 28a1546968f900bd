//! host_device on a loop device (skipped when loop devices are not
//! available): size via ioctl, logical block size detection, O_DIRECT with
//! read-modify-write on a 4K-sector device, BLKDISCARD and BLKZEROOUT.

mod common;

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;
use common::*;
use std::process::Command;

struct Loop(String);
impl Loop {
    fn attach(file: &str, sector: u32) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "--sector-size", &sector.to_string(), file])
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(Loop(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn host_device_on_4k_loop_with_o_direct() {
    let dir = TempDir::new("hostdev");
    let img = dir.file("backing.img", 8 << 20);
    let Some(lo) = Loop::attach(&img, 4096) else {
        eprintln!("no loop device; skipped");
        return;
    };
    let g = BlockGraph::new();
    let n = g
        .blockdev_add_str(&format!(
            "driver=raw,node-name=d,discard=unmap,cache.direct=on,file.driver=host_device,file.filename={},file.aio=io_uring",
            lo.0
        ))
        .unwrap();
    let blk = BlockBackend::new("d", n.clone(), BackendConfig::default()).unwrap();
    assert_eq!(blk.len(), 8 << 20, "size via BLKGETSIZE64");
    assert_eq!(
        blk.request_alignment(),
        4096,
        "logical block size via BLKSSZGET"
    );
    // Unaligned I/O works on the 4K device through read-modify-write.
    let data = pattern(5000, 3);
    blk.write_at(1234, &data).unwrap();
    let mut back = vec![0u8; 5000];
    blk.read_at(1234, &mut back).unwrap();
    assert_eq!(back, data);
    let mut edge = [0xffu8; 2];
    blk.read_at(1233, &mut edge[..1]).unwrap();
    blk.read_at(6234, &mut edge[1..]).unwrap();
    assert_eq!(edge, [0, 0]);
    // Zeroes and discard via ioctls.
    blk.write_at(1 << 20, &vec![0xaa; 65536]).unwrap();
    blk.write_zeroes(1 << 20, 32768, false).unwrap();
    let mut b = vec![0xffu8; 65536];
    blk.read_at(1 << 20, &mut b).unwrap();
    assert!(b[..32768].iter().all(|&x| x == 0));
    assert!(b[32768..].iter().all(|&x| x == 0xaa));
    blk.discard(2 << 20, 1 << 20).unwrap();
    blk.flush().unwrap();
    // The file protocol refuses the device.
    let e = g
        .blockdev_add_str(&format!("driver=file,node-name=f,filename={}", lo.0))
        .unwrap_err();
    assert!(e.to_string().contains("to be a regular file"), "{e}");
    drop(blk);
    drop(n);
    drop(g);
    drop(lo);
    let raw = std::fs::read(&img).unwrap();
    assert_eq!(&raw[1234..6234], &data[..]);
}
