//! `rebase [-u] -b backing [-F fmt] image`: change an image's backing file.
//! The safe mode first copies into the image every cluster it does not
//! allocate itself and whose contents differ between the old and the new
//! backing chain, so that the guest-visible contents stay the same; `-u`
//! only rewrites the header (qemu-img's semantics and messages). Any
//! format whose class supports backing files.

use super::convert::open_backing_node;
use super::{fail, Fail, OpenSpec, R};
use block::format::resolve_backing;
use block::graph::BlockGraph;
use std::io::{IoSlice, IoSliceMut};

/// `rebase` options (qemu-img's letters).
#[derive(clap::Args, Debug)]
pub struct RebaseArgs {
    /// Image format.
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Cache mode of the image.
    #[arg(short = 't')]
    pub cache: Option<String>,
    /// Cache mode of the backing files.
    #[arg(short = 'T')]
    pub src_cache: Option<String>,
    /// Progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Unsafe: change the header only.
    #[arg(short = 'u')]
    pub unsafe_mode: bool,
    /// Compress the clusters that are copied (whole clusters only).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Share the images.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// New backing file ("" for none).
    #[arg(short = 'b')]
    pub backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F')]
    pub backing_fmt: Option<String>,
    /// The image.
    pub filename: String,
}

/// `rebase`.
pub fn rebase(a: RebaseArgs) -> R<i32> {
    // qemu-img: without -b, unsafe mode removes the backing file.
    let backing = a
        .backing
        .clone()
        .or_else(|| a.unsafe_mode.then(String::new));
    let Some(newb) = backing else {
        return fail("Must specify backing file (-b) or use unsafe mode (-u)");
    };
    if let Some(c) = &a.cache {
        super::cache_mode(c)?;
    }
    let newb = (!newb.is_empty()).then_some(newb);
    if let Some(f) = a.fmt.as_deref() {
        let c = BlockGraph::new().class(f);
        if c.as_ref().is_some_and(|c| !c.supports_backing()) {
            return fail(format!(
                "Format driver '{f}' does not support backing files"
            ));
        }
    }
    let g = BlockGraph::new();
    let mut spec = OpenSpec::new(&a.filename);
    spec.fmt = a.fmt.as_deref();
    spec.read_only = false;
    spec.cache = a.cache.as_deref();
    if let Some(c) = &a.src_cache {
        super::cache_mode(c)?;
    }
    let blk = super::open(&g, &spec)?;
    let Some(img) = blk.root() else {
        return fail(format!("Could not open '{}': no medium", a.filename));
    };
    if !g
        .class(img.driver_name())
        .is_some_and(|c| c.supports_backing())
    {
        return fail(format!(
            "Could not open '{}': this image format does not support backing files",
            a.filename
        ));
    }
    let mut fmt = a.backing_fmt.clone();
    if !a.unsafe_mode {
        let ng = BlockGraph::new();
        let new_node = match &newb {
            Some(b) => {
                let path = resolve_backing(&a.filename, b);
                let n = open_backing_node(&ng, &path, fmt.as_deref())?;
                if fmt.is_none() {
                    fmt = Some(n.driver_name().to_string());
                }
                Some(n)
            }
            None => None,
        };
        let size = img.len();
        // Compare and copy by the image's clusters (whole ones can be
        // compressed); formats without clusters use 64 KiB.
        let cs = img
            .driver()
            .info()
            .and_then(|i| i.cluster_size)
            .unwrap_or(65536);
        let step = (cs * 16).max(1 << 20);
        let mut old = vec![0u8; step as usize];
        let mut new = vec![0u8; step as usize];
        let mut off = 0u64;
        let prog = super::convert::Progress::new(a.progress && !a.quiet, size);
        prog.start();
        while off < size {
            let st = img
                .block_status(off, (size - off).min(step))
                .map_err(|e| Fail(e.to_string(), 1))?;
            let len = st.len.clamp(1, size - off);
            prog.add(len);
            if st.allocated {
                off += len;
                continue;
            }
            let n = len as usize;
            img.read_vectored(off, &mut [IoSliceMut::new(&mut old[..n])])
                .map_err(|e| Fail(format!("error while reading image: {e}"), 1))?;
            new[..n].fill(0);
            if let Some(b) = &new_node {
                if off < b.len() {
                    let m = ((b.len() - off) as usize).min(n);
                    b.read_vectored(off, &mut [IoSliceMut::new(&mut new[..m])])
                        .map_err(|e| {
                            Fail(format!("error while reading from new backing file: {e}"), 1)
                        })?;
                }
            }
            // Write the clusters (of the image's grid) that differ.
            let mut p = 0usize;
            while p < n {
                let abs = off + p as u64;
                let q = ((abs / cs + 1) * cs - off).min(len) as usize;
                if old[p..q] != new[p..q] {
                    let whole = abs.is_multiple_of(cs) && (q - p) as u64 == cs.min(size - abs);
                    if a.compress && whole {
                        img.write_compressed(abs, &old[p..q])
                    } else {
                        img.write_vectored(abs, &[IoSlice::new(&old[p..q])], false)
                    }
                    .map_err(|e| Fail(format!("error while writing to the image: {e}"), 1))?;
                }
                p = q;
            }
            off += len;
        }
        prog.finish();
    } else if fmt.is_none() {
        if let Some(b) = &newb {
            // Record the format when the new file can be probed.
            let ng = BlockGraph::new();
            let path = resolve_backing(&a.filename, b);
            if let Ok(n) = ng.open_image(&path, None, true, &[("force-share", "on")]) {
                fmt = Some(n.driver_name().to_string());
            }
        }
    }
    img.driver()
        .set_backing_file(newb.as_deref(), fmt.as_deref())
        .map_err(|e| {
            Fail(
                format!(
                    "Could not change the backing file to '{}': {e}",
                    newb.as_deref().unwrap_or("")
                ),
                1,
            )
        })?;
    img.close().map_err(|e| Fail(e.to_string(), 1))?;
    drop(blk);
    Ok(0)
}
