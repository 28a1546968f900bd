//! What the copying jobs share: reading a range of one node and writing it
//! to another under the job's error policy, and finding what a chain's
//! layers hold.

use super::{Ctl, Failure};
use crate::bitmap::DirtyBitmap;
use crate::node::Node;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// Largest chunk a job copies at once (QEMU's default `buf-size` for
/// mirror is 16 MiB across requests; one request is 1 MiB at most).
pub const MAX_CHUNK: u64 = 1 << 20;

/// The front-to-back pass of commit and stream: `step(off, max)` handles
/// the run at `off` (at most `max` bytes) and returns its length; before
/// each run the job may pause or end (`Ctl::check`), after it progress
/// and the speed limit are accounted.
pub fn each_run(
    ctl: &Ctl,
    len: u64,
    mut step: impl FnMut(u64, u64) -> Result<u64, Failure>,
) -> Result<(), Failure> {
    let mut off = 0;
    while off < len {
        ctl.check()?;
        let n = step(off, (len - off).min(MAX_CHUNK))?.max(1);
        ctl.advance(n);
        ctl.throttle(n)?;
        off += n;
    }
    Ok(())
}

/// Run `op` until it succeeds, or the job's error policy for a read
/// (`write` false) or write says otherwise: `Ok(false)` when the error
/// was ignored and the range is to be skipped.
fn under_policy(
    ctl: &Ctl,
    write: bool,
    mut op: impl FnMut() -> crate::error::BlockResult<()>,
) -> Result<bool, Failure> {
    loop {
        match op() {
            Ok(()) => return Ok(true),
            Err(e) => {
                if !ctl.on_error(write, &e)? {
                    return Ok(false);
                }
            }
        }
    }
}

/// Read `[off, off+buf.len())` of `src`, under the source error policy.
/// `Ok(false)`: the error was ignored and the range is to be skipped.
pub fn read(ctl: &Ctl, src: &Node, off: u64, buf: &mut [u8]) -> Result<bool, Failure> {
    under_policy(ctl, false, || {
        src.read_vectored(off, &mut [IoSliceMut::new(buf)])
    })
}

/// Write `buf` at `off` of `dst` (or zeroes when `zero`), under the target
/// error policy. `Ok(false)`: ignored.
pub fn write(ctl: &Ctl, dst: &Node, off: u64, buf: &[u8], zero: bool) -> Result<bool, Failure> {
    under_policy(ctl, true, || {
        if zero {
            dst.write_zeroes(off, buf.len() as u64, false, false)
        } else {
            dst.write_vectored(off, &[IoSlice::new(buf)], false)
        }
    })
}

/// Copy `[off, off+len)` (whole clusters of the target, `off` aligned)
/// from `src` into `dst` compressed, under the error policies.
pub fn copy_compressed(
    ctl: &Ctl,
    src: &Node,
    dst: &Node,
    off: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<bool, Failure> {
    let b = &mut buf[..len as usize];
    if !read(ctl, src, off, b)? {
        return Ok(false);
    }
    under_policy(ctl, true, || dst.write_compressed(off, b))
}

/// Copy `[off, off+len)` from `src` to `dst` through `buf` (at least
/// `len` bytes). Zero runs become write-zeroes, or nothing when the target
/// reads as zeroes already (`dst_zeroed`). Returns false if an error was
/// ignored on the way.
pub fn copy_range(
    ctl: &Ctl,
    src: &Node,
    dst: &Node,
    off: u64,
    len: u64,
    buf: &mut [u8],
    dst_zeroed: bool,
) -> Result<bool, Failure> {
    let mut done = 0;
    let mut ok = true;
    while done < len {
        let n = (len - done).min(buf.len() as u64);
        let pos = off + done;
        let st = src.block_status(pos, n).ok();
        let run = st.map_or(n, |e| e.len.clamp(1, n));
        let zero = st.is_some_and(|e| e.zero && !e.data);
        let b = &mut buf[..run as usize];
        if zero {
            if !dst_zeroed {
                ok &= write(ctl, dst, pos, b, true)?;
            }
        } else if read(ctl, src, pos, b)? {
            ok &= write(ctl, dst, pos, b, false)?;
        } else {
            ok = false;
        }
        done += run;
    }
    Ok(ok)
}

/// True if `[off, off+len)` (its first run) is allocated in `top` or a
/// layer below it down to, not including, `base` (None: the whole chain).
/// Returns the length of the run the answer holds for.
pub fn allocated_above(
    top: &Arc<Node>,
    base: Option<&Arc<Node>>,
    off: u64,
    len: u64,
) -> (bool, u64) {
    let mut n = top.clone();
    let mut run = len;
    loop {
        if base.is_some_and(|b| Arc::ptr_eq(b, &n)) {
            return (false, run);
        }
        let Ok(e) = n.block_status(off, run) else {
            return (true, run);
        };
        run = e.len.clamp(1, run);
        if e.allocated {
            return (true, run);
        }
        match n.child("backing") {
            Some(b) if off < b.len() => n = b,
            _ => return (false, run),
        }
    }
}

/// Mark in `bitmap` what `top` down to `base` holds.
pub fn mark_allocated(
    ctl: Option<&Ctl>,
    bitmap: &DirtyBitmap,
    top: &Arc<Node>,
    base: Option<&Arc<Node>>,
    len: u64,
) -> Result<(), Failure> {
    let mut off = 0;
    while off < len {
        if let Some(c) = ctl {
            c.check()?;
        }
        let (alloc, n) = allocated_above(top, base, off, (len - off).min(1 << 30));
        if alloc {
            bitmap.set_range(off, n);
        }
        off += n;
    }
    Ok(())
}

/// Mark in `bitmap` every range of `node` that does not read as zeroes.
pub fn mark_data(
    ctl: Option<&Ctl>,
    bitmap: &DirtyBitmap,
    node: &Node,
    len: u64,
) -> Result<(), Failure> {
    let mut off = 0;
    while off < len {
        if let Some(c) = ctl {
            c.check()?;
        }
        let want = (len - off).min(1 << 30);
        let (data, n) = match node.block_status(off, want) {
            Ok(e) => (e.data || !e.zero, e.len.clamp(1, want)),
            Err(_) => (true, want),
        };
        if data {
            bitmap.set_range(off, n);
        }
        off += n;
    }
    Ok(())
}
