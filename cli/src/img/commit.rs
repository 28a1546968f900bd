//! `commit [-b base] [-d] [-r rate] image`: copy everything the image (and
//! the images between it and `base`) allocate into `base` (by default the
//! image's own backing file), growing `base` if it is smaller, at most
//! `rate` bytes per second; then empty the image unless `-d` or `-b` is
//! given (qemu-img's semantics and messages).

use super::info::chain_status;
use super::{fail, open, Fail, OpenSpec, R};
use block::graph::BlockGraph;
use block::node::Node;
use std::sync::Arc;

/// `commit` options (qemu-img's letters).
#[derive(clap::Args, Debug)]
pub struct CommitArgs {
    /// Image format.
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Cache mode.
    #[arg(short = 't')]
    pub cache: Option<String>,
    /// The image to commit into (default: the backing file).
    #[arg(short = 'b')]
    pub base: Option<String>,
    /// Do not empty the image afterwards.
    #[arg(short = 'd')]
    pub no_empty: bool,
    /// Rate limit in bytes per second (size suffixes allowed; 0: none).
    #[arg(short = 'r', allow_hyphen_values = true)]
    pub rate: Option<String>,
    /// Progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image.
    pub filename: String,
}

fn canon(p: &str) -> String {
    std::fs::canonicalize(p)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| p.to_string())
}

/// `-r`: a size with qemu-img's suffixes, 0 to `i64::MAX`, with its two
/// messages (a negative number is out of range there, not malformed).
fn parse_rate(s: &str) -> R<u64> {
    use block::keyval::SizeError;
    let range = || {
        Fail(
            format!(
                "Invalid rate limit specified. Must be between 0 and {}.",
                i64::MAX
            ),
            1,
        )
    };
    if s.trim_start().starts_with('-') {
        return Err(range());
    }
    match block::keyval::parse_size_str(s, 1) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) | Err(SizeError::Overflow) => Err(range()),
        Err(SizeError::Invalid) => fail(format!("Invalid rate limit specified: '{s}'.")),
    }
}

/// Keeps a copy at `rate` bytes per second on average: after each chunk,
/// sleep until the time the bytes copied so far should have taken.
struct Throttle {
    rate: u64,
    start: std::time::Instant,
    done: u64,
}

impl Throttle {
    fn new(rate: u64) -> Self {
        Throttle {
            rate,
            start: std::time::Instant::now(),
            done: 0,
        }
    }
    fn account(&mut self, n: u64) {
        if self.rate == 0 {
            return;
        }
        self.done += n;
        let due = std::time::Duration::from_secs_f64(self.done as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// `commit`.
pub fn commit(a: CommitArgs) -> R<i32> {
    // Options are checked before any image is opened, as qemu-img does.
    let rate = match &a.rate {
        Some(r) => parse_rate(r)?,
        None => 0,
    };
    if let Some(c) = &a.cache {
        super::cache_mode(c)?;
    }
    // qemu-img opens the image read-write first: refuse, as it does, while
    // another process uses it (its write lock is taken again to empty it).
    {
        let pg = BlockGraph::new();
        let f = super::convert::file_node(&pg, &a.filename, false, None)?;
        super::try_lock(f, &a.filename, true, false)?;
    }
    let g = BlockGraph::new();
    let mut spec = OpenSpec::new(&a.filename);
    spec.fmt = a.fmt.as_deref();
    // Read-only, sharing writes: the base is opened for writing below.
    spec.force_share = true;
    let top = open(&g, &spec)?;
    let Some(root) = top.root() else {
        return fail(format!("Could not open '{}': no medium", a.filename));
    };
    // The chain below the image, with the names to open each one by.
    let mut chain: Vec<Arc<Node>> = vec![root.clone()];
    while let Some(b) = chain[chain.len() - 1].child("backing") {
        chain.push(b.clone());
    }
    if chain.len() < 2 {
        return fail("Image does not have a backing file");
    }
    let base_idx = match &a.base {
        None => 1,
        Some(b) => {
            let want = canon(b);
            chain
                .iter()
                .position(|n| n.filename().map(|f| canon(&f)) == Some(want.clone()))
                .filter(|i| *i > 0)
                .ok_or_else(|| {
                    Fail(
                        format!(
                            "Did not find '{b}' in the backing chain of '{}'",
                            a.filename
                        ),
                        1,
                    )
                })?
        }
    };
    // Reopen the chain from the base up in one graph: the base read-write,
    // the images above it read-only with the base (or the image below) as
    // their backing node, so that nothing holds a lock against our writes.
    let names: Vec<(String, &'static str)> = chain[..=base_idx]
        .iter()
        .map(|n| (n.filename().unwrap_or_default(), n.driver_name()))
        .collect();
    drop(top);
    drop(chain);
    drop(root);
    drop(g);
    let g = BlockGraph::new();
    let (base_name, base_fmt) = names[base_idx].clone();
    let open_err =
        |f: &str, e: block::error::BlockError| Fail(format!("Could not open '{f}': {e}"), 1);
    let mut below = g
        .open_image(
            &base_name,
            Some(base_fmt),
            false,
            &[("node-name", "commit-base")],
        )
        .map_err(|e| open_err(&base_name, e))?;
    let base_node = below.clone();
    for i in (0..base_idx).rev() {
        let (f, fmt) = &names[i];
        let nn = format!("commit-top{i}");
        below = g
            .open_image(
                f,
                Some(fmt),
                true,
                &[("node-name", &nn), ("backing", below.name())],
            )
            .map_err(|e| open_err(f, e))?;
    }
    let _ = g.take_warnings();
    let root = below;
    let mk = |n: Arc<Node>, ro: bool| {
        block::backend::BlockBackend::new(
            "",
            n,
            block::backend::BackendConfig {
                read_only: ro,
                write_cache: true,
                shared: block::driver::Perms::ALL,
                resize: !ro,
                ..Default::default()
            },
        )
    };
    // The images above the base are read through their nodes directly: no
    // user, so they claim nothing on the base that the writer needs.
    let base = mk(base_node, false).map_err(|e| open_err(&base_name, e))?;
    let size = root.len();
    if base.len() < size {
        base.truncate(size)
            .map_err(|e| Fail(format!("Could not resize '{base_name}': {e}"), 1))?;
    }
    let step = 2u64 << 20;
    let mut buf = vec![0u8; step as usize];
    let mut off = 0u64;
    let prog = super::convert::Progress::new(a.progress && !a.quiet, size);
    prog.start();
    // As in QEMU's commit job, only the bytes copied count against -r.
    let mut throttle = Throttle::new(rate);
    while off < size {
        let e = chain_status(&root, off, (size - off).min(step), 0)?;
        let len = e.length.clamp(1, size - off);
        if e.present && (e.depth as usize) < base_idx {
            if e.zero && !e.data {
                base.write_zeroes(off, len, true)
            } else {
                let b = &mut buf[..len as usize];
                root.read_vectored(off, &mut [std::io::IoSliceMut::new(b)])
                    .map_err(|e| Fail(format!("Error while reading '{}': {e}", a.filename), 1))?;
                base.write_at(off, b)
            }
            .map_err(|e| Fail(format!("Error while writing to '{base_name}': {e}"), 1))?;
            throttle.account(len);
        }
        off += len;
        prog.add(len);
    }
    prog.finish();
    base.flush()?;
    drop(base);
    drop(root);
    drop(g);
    if !a.no_empty && a.base.is_none() && !a.filename.is_empty() {
        let g = BlockGraph::new();
        let mut spec = OpenSpec::new(&a.filename);
        spec.fmt = a.fmt.as_deref();
        spec.read_only = false;
        spec.cache = a.cache.as_deref();
        let blk = open(&g, &spec)?;
        if let Some(img) = blk.root() {
            // Formats that cannot drop their clusters keep them, as
            // qemu-img leaves such images as they are.
            match img.driver().make_empty() {
                Ok(()) | Err(block::error::BlockError::Unsupported(_)) => {}
                Err(e) => return fail(format!("Could not empty '{}': {e}", a.filename)),
            }
            img.close().map_err(|e| Fail(e.to_string(), 1))?;
        }
    }
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}
