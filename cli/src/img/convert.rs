//! `convert`, `compare` and `dd`, following qemu-img's options and exit codes.
//!
//! `convert` writes every target through the block layer (see
//! [`convert`]). All-zero clusters are skipped (the new image reads as
//! zeroes) unless `-S 0`; with `-B` clusters equal to the backing file's
//! are skipped and zero clusters over non-zero backing data become zero
//! clusters of the format.

use super::{fail, open, parse_img_size, Fail, OpenSpec, R};
use block::backend::BlockBackend;
use block::graph::BlockGraph;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// `convert` options (qemu-img's letters).
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Compress the target (not supported by raw).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Do not create the target.
    #[arg(short = 'n')]
    pub no_create: bool,
    /// Source format.
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Target format.
    #[arg(short = 'O', default_value = "raw")]
    pub out_fmt: String,
    /// Target cache mode.
    #[arg(short = 't', default_value = "unsafe")]
    pub cache: String,
    /// Source cache mode.
    #[arg(short = 'T', default_value = "writeback")]
    pub src_cache: String,
    /// Zero run length that makes the target sparse (0: fully allocated).
    #[arg(short = 'S', default_value = "4k")]
    pub sparse: String,
    /// Parallel requests (1..16).
    #[arg(short = 'm', default_value_t = 8)]
    pub parallel: u32,
    /// Allow out-of-order writes.
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// The target is known to read as zeroes (with -n).
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Share the source with other users.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Target creation options.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Backing file of the target (only the differences are written).
    #[arg(short = 'B')]
    pub backing: Option<String>,
    /// Format of the target's backing file.
    #[arg(short = 'F')]
    pub backing_fmt: Option<String>,
    /// Internal snapshot of the source to convert.
    #[arg(short = 'l')]
    pub snapshot: Option<String>,
    /// Sources, then the target. Options may come between them (`-f
    /// dmg x.dmg -O raw out`), as qemu-img's getopt permits: clap counts
    /// the names before and after an option apart, so at least one each,
    /// and `convert` checks that there are two.
    #[arg(num_args = 1.., required = true)]
    pub files: Vec<String>,
}

/// A source image and its byte offset in the concatenated input.
type Source = (Arc<BlockBackend>, u64);

impl ConvertArgs {
    /// The source snapshot of `-l` (`snapshot.id=`, `snapshot.name=` or a
    /// bare id or name).
    fn source_snapshot(&self) -> R<Vec<(String, String)>> {
        snapshot_param(self.snapshot.as_deref())
    }

    /// Opens every source (all files but the last) in `graph`; returns each
    /// with its offset in the concatenated input, and the total size.
    fn open_sources(&self, graph: &BlockGraph) -> R<(Vec<Source>, u64)> {
        let snap = self.source_snapshot()?;
        let mut sources = Vec::new();
        let mut total = 0u64;
        for s in &self.files[..self.files.len() - 1] {
            let mut spec = OpenSpec::new(s);
            spec.fmt = self.fmt.as_deref();
            spec.force_share = self.force_share;
            spec.cache = Some(&self.src_cache);
            spec.snapshot = &snap;
            let b = open(graph, &spec)?;
            sources.push((b.clone(), total));
            total += b.len();
        }
        Ok((sources, total))
    }
}

/// `-l snapshot.id=ID,snapshot.name=NAME|ID_OR_NAME` -> the node options
/// that load that snapshot (none without `-l`).
pub(crate) fn snapshot_param(p: Option<&str>) -> R<Vec<(String, String)>> {
    match p {
        None => Ok(Vec::new()),
        Some(p) => cli::snapshot_param::node_options("-l", p).map_err(|e| Fail(e, 1)),
    }
}

/// Runs copies of `work` on `job` in parallel and waits for them all: `n`
/// (`-m`, QEMU's coroutine count) but no more threads than CPUs (at least
/// two, so reading overlaps writing). Each worker does blocking I/O on its
/// chunk; more threads than cores only add switches and buffers (measured:
/// raw->qcow2 of 512 MiB, 2 CPUs: 0.15 s with 2 threads, 0.24 s with 8).
fn run_workers<J: Send + Sync + 'static>(n: u32, job: &Arc<J>, work: fn(&J)) {
    let cpus = std::thread::available_parallelism().map_or(2, |c| c.get()) as u32;
    let n = n.min(cpus.max(2)).max(1);
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let j = job.clone();
            std::thread::spawn(move || work(&j))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

pub(crate) struct Progress {
    pub(crate) on: bool,
    pub(crate) total: u64,
    pub(crate) done: AtomicU64,
    pub(crate) last: Mutex<f64>,
}

impl Progress {
    /// A progress meter for `total` bytes, printing only when `on`.
    pub(crate) fn new(on: bool, total: u64) -> Self {
        Progress {
            on,
            total,
            done: AtomicU64::new(0),
            last: Mutex::new(0.0),
        }
    }

    pub(crate) fn add(&self, n: u64) {
        let d = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if !self.on {
            return;
        }
        let pct = if self.total == 0 {
            100.0
        } else {
            d as f64 * 100.0 / self.total as f64
        };
        let mut l = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if pct - *l >= 1.0 || (pct >= 100.0 && *l < 100.0) {
            *l = pct;
            print!("    ({pct:.2}/100%)\r");
            let _ = std::io::stdout().flush();
        }
    }
    pub(crate) fn start(&self) {
        if self.on {
            print!("    (0.00/100%)\r");
            let _ = std::io::stdout().flush();
        }
    }
    pub(crate) fn finish(&self) {
        if self.on {
            println!("    (100.00/100%)");
        }
    }
}

const CHUNK: u64 = 2 << 20;

/// The sources' block status, remembered across chunks (as qemu-img's
/// convert does): each query asks for the rest of the source and the
/// answer serves every chunk it covers. Asking chunk by chunk costs time
/// quadratic in a run's length where the file system walks the run to
/// answer (`SEEK_HOLE` on tmpfs visits every page up to the hole: 15 % of
/// a raw->qcow2 convert's time there, before this).
#[derive(Default)]
struct StatusCache {
    /// Per source, the last answer.
    last: Mutex<Vec<Option<Run>>>,
}

/// `[start, end)` of a source and its status (zero, data).
type Run = (u64, u64, bool, bool);

impl StatusCache {
    /// Status at `off` of source number `i`: the length of the run (at
    /// most `lim`, at least 1) and whether it reads as zeroes without
    /// data (may be skipped).
    fn get(&self, i: usize, src: &BlockBackend, off: u64, lim: u64) -> Result<(u64, bool), String> {
        let hit =
            |e: &Run| (off >= e.0 && off < e.1).then(|| ((e.1 - off).min(lim).max(1), e.2 && !e.3));
        {
            let g = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = g.get(i).copied().flatten().as_ref().and_then(hit) {
                return Ok(r);
            }
        }
        let rest = src.len().saturating_sub(off).max(lim);
        let st = src.block_status(off, rest).map_err(|e| e.to_string())?;
        let e = (off, off + st.len.max(1), st.zero, st.data);
        let mut g = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() <= i {
            g.resize(i + 1, None);
        }
        g[i] = Some(e);
        Ok(hit(&e).unwrap_or((1, false)))
    }
}

/// The work-item loop of the convert jobs: workers take chunks in turn,
/// plan each (read, decide) in parallel, and write them in chunk order
/// when `ordered` (qemu-img's default; `-W` lifts it); the first error
/// stops everybody.
struct Chunks {
    total: u64,
    /// Bytes per work item.
    chunk: u64,
    next: AtomicU64,
    ordered: bool,
    /// The chunk whose turn it is to be written.
    write_turn: (Mutex<u64>, Condvar),
    progress: Progress,
    error: Mutex<Option<String>>,
}

impl Chunks {
    fn new(total: u64, chunk: u64, ordered: bool, progress: bool) -> Self {
        Chunks {
            total,
            chunk,
            next: AtomicU64::new(0),
            ordered,
            write_turn: (Mutex::new(0), Condvar::new()),
            progress: Progress::new(progress, total),
            error: Mutex::new(None),
        }
    }

    fn failed(&self) -> bool {
        self.error.lock().map(|e| e.is_some()).unwrap_or(true)
    }

    /// The first error, if any.
    fn take_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// One worker: `plan` chunk after chunk, then `write` it (in turn when
    /// ordered); `state` is the worker's own, shared by both.
    fn run<S: Default, P>(
        &self,
        plan: impl Fn(u64, &mut S) -> Result<P, String>,
        write: impl Fn(P, &mut S) -> Result<(), String>,
    ) {
        let mut state = S::default();
        let (m, cv) = &self.write_turn;
        loop {
            let idx = self.next.fetch_add(1, Ordering::Relaxed);
            if idx * self.chunk >= self.total || self.failed() {
                // Let ordered writers behind us proceed.
                if self.ordered {
                    let _g = m.lock();
                    cv.notify_all();
                }
                return;
            }
            let r = plan(idx, &mut state);
            if self.ordered {
                let mut turn = m.lock().unwrap_or_else(|e| e.into_inner());
                while *turn != idx {
                    if self.failed() {
                        return;
                    }
                    turn = cv.wait(turn).unwrap_or_else(|e| e.into_inner());
                }
            }
            let res = r.and_then(|p| write(p, &mut state));
            self.progress
                .add(self.chunk.min(self.total - idx * self.chunk));
            if self.ordered {
                let mut turn = m.lock().unwrap_or_else(|e| e.into_inner());
                *turn += 1;
                cv.notify_all();
            }
            if let Err(e) = res {
                let mut g = self.error.lock().unwrap_or_else(|e| e.into_inner());
                g.get_or_insert(e);
                cv.notify_all();
                return;
            }
        }
    }
}

/// Planned writes: (target offset, length, data or `None` for zeroes).
type Plan = Vec<(u64, u64, Option<(Arc<Vec<u8>>, usize)>)>;

struct Job {
    sources: Vec<(Arc<BlockBackend>, u64)>, // backend and its start in the target
    target: Arc<BlockBackend>,
    sparse: u64,
    target_zero: bool,
    work: Chunks,
    status: StatusCache,
}

impl Job {
    fn source_at(&self, pos: u64) -> (usize, &Arc<BlockBackend>, u64, u64) {
        for (i, (b, start)) in self.sources.iter().enumerate() {
            if pos >= *start && pos < start + b.len() {
                return (i, b, pos - start, start + b.len());
            }
        }
        let i = self.sources.len() - 1;
        let (b, s) = &self.sources[i];
        (i, b, pos - s, s + b.len())
    }

    /// Plan the writes of one chunk: (target offset, data or None for
    /// zeroes). Data is read into buffers of earlier chunks from `spare`
    /// when they are free again (fresh zeroed memory per chunk cost a page
    /// fault per 4 KiB).
    fn plan(&self, idx: u64, spare: &mut Vec<Vec<u8>>) -> Result<Plan, String> {
        let start = idx * CHUNK;
        let end = (start + CHUNK).min(self.work.total);
        let mut ops = Vec::new();
        let mut pos = start;
        while pos < end {
            let (i, src, soff, send) = self.source_at(pos);
            let lim = end.min(send) - pos;
            let (len, skip) = self.status.get(i, src, soff, lim)?;
            if skip {
                if self.sparse == 0 {
                    ops.push((pos, len, Some((Arc::new(vec![0u8; len as usize]), 0))));
                } else if !self.target_zero {
                    ops.push((pos, len, None));
                }
            } else {
                let mut buf = spare.pop().unwrap_or_default();
                buf.resize(len as usize, 0);
                src.read_at(soff, &mut buf).map_err(|e| e.to_string())?;
                if self.sparse == 0 {
                    ops.push((pos, len, Some((Arc::new(buf), 0))));
                } else {
                    // Split into sparse-size pieces aligned in the target.
                    let buf = Arc::new(buf);
                    let mut p = 0u64;
                    let mut run_start = 0u64;
                    let mut run_zero: Option<bool> = None;
                    while p < len {
                        let boundary =
                            ((pos + p).checked_div(self.sparse).unwrap_or(0) + 1) * self.sparse;
                        let q = (boundary - pos).min(len);
                        let z = block::iov::is_zero_buf(&buf[p as usize..q as usize]);
                        match run_zero {
                            Some(rz) if rz == z => {}
                            Some(rz) => {
                                push_run(&mut ops, pos, &buf, run_start, p, rz, self.target_zero);
                                run_start = p;
                            }
                            None => {}
                        }
                        run_zero = Some(z);
                        p = q;
                    }
                    if let Some(rz) = run_zero {
                        push_run(&mut ops, pos, &buf, run_start, len, rz, self.target_zero);
                    }
                }
            }
            pos += len;
        }
        Ok(ops)
    }

    fn run_worker(&self) {
        self.work.run(
            |idx, spare: &mut Vec<Vec<u8>>| self.plan(idx, spare),
            |ops, spare| {
                for (off, len, data) in ops {
                    match &data {
                        Some((d, s)) => self.target.write_at(off, &d[*s..*s + len as usize]),
                        // Written as zeroes, not deallocated: the target
                        // is opened with discard=unmap for cluster formats.
                        None => self.target.write_zeroes(off, len, false),
                    }
                    .map_err(|e| e.to_string())?;
                    // The chunk's buffer is free once its last piece is out.
                    if let Some(b) = data.and_then(|(d, _)| Arc::into_inner(d)) {
                        if b.capacity() >= CHUNK as usize / 2 && spare.len() < 2 {
                            spare.push(b);
                        }
                    }
                }
                Ok(())
            },
        )
    }
}

fn push_run(
    ops: &mut Plan,
    pos: u64,
    buf: &Arc<Vec<u8>>,
    a: u64,
    b: u64,
    zero: bool,
    target_zero: bool,
) {
    if zero {
        if !target_zero {
            ops.push((pos + a, b - a, None));
        }
    } else {
        ops.push((pos + a, b - a, Some((buf.clone(), a as usize))));
    }
}

/// `convert`: into any format whose class creates images. The target is
/// created with the `-o` options (and `-B`/`-F`), opened through the
/// block layer and written through it; `-c` sends compressed writes
/// (`IoFlags::COMPRESSED`), which formats without compression refuse.
/// A target with clusters is filled cluster by cluster (whole clusters
/// can be compressed; with `-B` only the clusters that differ from the
/// backing file are written, zero ones over backing data as zero
/// clusters); one without (raw) in runs of the sparse size.
pub fn convert(a: ConvertArgs) -> R<i32> {
    let class = super::create::class_of(&a.out_fmt)?;
    if super::create::wants_help(&a.options) {
        print!("{}", block::format::options_help(class.create_options()));
        return Ok(0);
    }
    if a.files.len() < 2 {
        return fail("Must specify image file name");
    }
    if a.backing.is_some() && !class.supports_backing() {
        return fail(format!(
            "Backing file not supported for file format '{}'",
            a.out_fmt
        ));
    }
    if a.compress && !class.can_compress() {
        return fail("Compression not supported for this file format");
    }
    if a.target_is_zero && !a.no_create {
        return fail("--target-is-zero requires use of -n flag");
    }
    if !(1..=16).contains(&a.parallel) {
        return fail("Invalid number of coroutines specified. Must be between 1 and 16.");
    }
    let bad_sparse = "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 2097152. Select 0 to disable sparse detection (fully allocates output).";
    let sparse = block::keyval::parse_size_str(&a.sparse, 1)
        .ok()
        .filter(|s| (*s == 0 || s % 512 == 0) && *s <= CHUNK)
        .ok_or_else(|| Fail(bad_sparse.into(), 1))?;
    super::cache_mode(&a.cache)?;
    super::cache_mode(&a.src_cache)?;
    if a.no_create && a.backing.is_some() {
        return fail("-B is not supported with -n");
    }
    let target = &a.files[a.files.len() - 1];
    let graph = BlockGraph::new();
    let (sources, total) = a.open_sources(&graph)?;
    // -o backing_file=... is the same as -B.
    let mut opts = super::create::parse_options(
        &*class,
        &a.options,
        None,
        a.backing.as_deref(),
        a.backing_fmt.as_deref(),
    )?;
    let with_backing = opts.backing_file().is_some();
    if !a.no_create {
        if with_backing && !class.supports_backing() {
            return fail(format!(
                "Backing file not supported for file format '{}'",
                a.out_fmt
            ));
        }
        opts.set("size", block::format::OptValue::Num(total));
        // The backing file is opened with the target below.
        super::create::make(&*class, &mut opts, true, target, true)?;
    }
    let tgraph = BlockGraph::new();
    let mut spec = OpenSpec::new(target);
    spec.fmt = Some(&a.out_fmt);
    spec.read_only = false;
    spec.cache = Some(&a.cache);
    // Zero runs of a cluster target deallocate, as qemu-img's do.
    spec.discard_unmap = true;
    spec.extra = super::key_secrets(&opts);
    let tb = open(&tgraph, &spec)?;
    if tb.len() < total {
        return fail(format!(
            "Output image is too small: {} bytes needed, {} available",
            total,
            tb.len()
        ));
    }
    let Some(root) = tb.root() else {
        return fail(format!("Could not open '{target}': no medium"));
    };
    if a.compress && root.driver().info().is_some_and(|i| i.encrypted) {
        return fail("Compression and encryption not supported at the same time");
    }
    if a.compress && !root.driver().can_compress() {
        return fail(format!(
            "Compression not supported for '{target}' (its format options rule compressed writes out)"
        ));
    }
    let cluster = root.driver().info().and_then(|i| i.cluster_size);
    let progress = a.progress && !a.quiet;
    let err = match cluster {
        Some(cs) => {
            // Compressed output goes cluster by cluster and out of order
            // anyway: small work items keep the buffers (and the peak
            // memory) small.
            let chunk = if a.compress {
                (cs * 4).clamp(256 << 10, CHUNK)
            } else {
                CHUNK
            };
            let job = Arc::new(QJob {
                sources,
                target: tb.clone(),
                backing: if with_backing {
                    root.child("backing")
                } else {
                    None
                },
                cs,
                sparse,
                target_zero: !a.no_create || a.target_is_zero,
                compress: a.compress,
                // Compressed clusters are packed in the order they are
                // written; ordering would serialise the compression.
                work: Chunks::new(total, chunk, !a.out_of_order && !a.compress, progress),
                status: StatusCache::default(),
            });
            job.work.progress.start();
            run_workers(a.parallel, &job, |j| j.run_worker());
            let e = job.work.take_error();
            if e.is_none() {
                job.work.progress.finish();
            }
            e
        }
        None => {
            let job = Arc::new(Job {
                sources,
                target: tb.clone(),
                sparse,
                target_zero: !a.no_create || a.target_is_zero,
                work: Chunks::new(total, CHUNK, !a.out_of_order, progress),
                status: StatusCache::default(),
            });
            job.work.progress.start();
            run_workers(a.parallel, &job, |j| j.run_worker());
            let e = job.work.take_error();
            if e.is_none() {
                job.work.progress.finish();
            }
            e
        }
    };
    if let Some(e) = err {
        return fail(format!("error while converting: {e}"));
    }
    tb.flush()
        .map_err(|e| Fail(format!("error while flushing the target: {e}"), 1))?;
    root.close()
        .map_err(|e| Fail(format!("error while flushing the target: {e}"), 1))?;
    Ok(0)
}

/// `compare`: 0 identical, 1 different, 2 error.
#[allow(clippy::too_many_arguments)]
pub fn compare(
    fmt1: Option<&str>,
    fmt2: Option<&str>,
    progress: bool,
    quiet: bool,
    strict: bool,
    force_share: bool,
    src_cache: Option<&str>,
    f1: &str,
    f2: &str,
) -> R<i32> {
    let as2 = |f: Fail| Fail(f.0, 2);
    let graph = BlockGraph::new();
    let mut s1 = OpenSpec::new(f1);
    s1.fmt = fmt1;
    s1.force_share = force_share;
    s1.cache = Some(src_cache.unwrap_or("writeback"));
    let b1 = open(&graph, &s1).map_err(as2)?;
    let mut s2 = OpenSpec::new(f2);
    s2.fmt = fmt2;
    s2.force_share = force_share;
    s2.cache = s1.cache;
    let g2 = BlockGraph::new();
    let b2 = open(&g2, &s2).map_err(as2)?;
    let (l1, l2) = (b1.len(), b2.len());
    let say = |m: &str| {
        if !quiet {
            println!("{m}");
        }
    };
    if l1 != l2 {
        if strict {
            say("Strict mode: Image size mismatch!");
            return Ok(1);
        }
        say("Warning: Image size mismatch!");
    }
    let common = l1.min(l2);
    let step = 1u64 << 20;
    let mut a = vec![0u8; step as usize];
    let mut b = vec![0u8; step as usize];
    let mut off = 0;
    let prog = Progress::new(progress && !quiet, l1.max(l2));
    prog.start();
    let (r1, r2) = (b1.root(), b2.root());
    while off < common {
        let mut n = step.min(common - off);
        if let (true, Some(r1), Some(r2)) = (strict, &r1, &r2) {
            // qemu-img compares the block status flags in strict mode.
            let st = |r: &block::node::Node, size: u64| {
                super::info::chain_status(r, off, size - off, 0)
                    .map(|e| {
                        let eof = e.start + e.length >= size;
                        (e, eof)
                    })
                    .map_err(|e| Fail(e.0, 2))
            };
            let ((x, ex), (y, ey)) = (st(r1, l1)?, st(r2, l2)?);
            let flags = |e: &super::info::MapEntry, eof: bool| {
                (e.present, e.data, e.zero, e.offset.is_some(), eof)
            };
            if flags(&x, ex) != flags(&y, ey) {
                prog.finish();
                say(&format!("Strict mode: Offset {off} block status mismatch!"));
                return Ok(1);
            }
            n = n.min(x.length).min(y.length).max(1);
        }
        let z1 = b1
            .block_status(off, n)
            .map_err(|e| Fail(e.to_string(), 2))?;
        let z2 = b2
            .block_status(off, n)
            .map_err(|e| Fail(e.to_string(), 2))?;
        if z1.zero && !z1.data && z2.zero && !z2.data {
            let skip = z1.len.min(z2.len).clamp(1, n);
            off += skip;
            prog.add(skip);
            continue;
        }
        let (x, y) = (&mut a[..n as usize], &mut b[..n as usize]);
        b1.read_at(off, x)
            .map_err(|e| Fail(format!("Error while reading offset {off} of {f1}: {e}"), 2))?;
        b2.read_at(off, y)
            .map_err(|e| Fail(format!("Error while reading offset {off} of {f2}: {e}"), 2))?;
        if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
            prog.finish();
            say(&format!(
                "Content mismatch at offset {}!",
                (off + i as u64) & !511
            ));
            return Ok(1);
        }
        off += n;
        prog.add(n);
    }
    // The larger image's tail must read as zeroes.
    let (big, bl, name) = if l1 > l2 {
        (&b1, l1, f1)
    } else {
        (&b2, l2, f2)
    };
    while off < bl {
        let n = step.min(bl - off);
        let x = &mut a[..n as usize];
        big.read_at(off, x).map_err(|e| {
            Fail(
                format!("Error while reading offset {off} of {name}: {e}"),
                2,
            )
        })?;
        if let Some(i) = x.iter().position(|&p| p != 0) {
            prog.finish();
            say(&format!(
                "Content mismatch at offset {}!",
                (off + i as u64) & !511
            ));
            return Ok(1);
        }
        off += n;
        prog.add(n);
    }
    prog.finish();
    say("Images are identical.");
    Ok(0)
}

/// `dd [-f fmt] [-O fmt] [-U] bs=N count=N skip=N if=IN of=OUT`.
pub fn dd(fmt: Option<&str>, out_fmt: &str, force_share: bool, operands: &[String]) -> R<i32> {
    if out_fmt != "raw" {
        return fail(format!("Unknown file format '{out_fmt}'"));
    }
    let mut bs = 512u64;
    let mut count = None;
    let mut skip = 0u64;
    let (mut inf, mut outf) = (None, None);
    for op in operands {
        let Some((k, v)) = op.split_once('=') else {
            return fail(format!("unrecognized operand {op}"));
        };
        match k {
            "bs" => {
                bs = block::keyval::parse_size_str(v, 1)
                    .ok()
                    .filter(|b| *b > 0 && *b <= i32::MAX as u64)
                    .ok_or_else(|| Fail(format!("invalid number: '{v}'"), 1))?;
            }
            "count" => {
                count = Some(
                    v.parse::<u64>()
                        .map_err(|_| Fail(format!("invalid number: '{v}'"), 1))?,
                )
            }
            "skip" => {
                skip = v
                    .parse::<u64>()
                    .map_err(|_| Fail(format!("invalid number: '{v}'"), 1))?
            }
            "if" => inf = Some(v.to_string()),
            "of" => outf = Some(v.to_string()),
            _ => return fail(format!("unrecognized operand {op}")),
        }
    }
    let (Some(inf), Some(outf)) = (inf, outf) else {
        return fail("Must specify both input and output files");
    };
    let graph = BlockGraph::new();
    let mut s = OpenSpec::new(&inf);
    s.fmt = fmt;
    s.force_share = force_share;
    let src = open(&graph, &s)?;
    // As qemu-img dd computes it: `count` limits the input end (counted
    // from the start of the input), and `skip` is then taken off that.
    let start = skip.saturating_mul(bs);
    let mut end = src.len();
    if let Some(c) = count {
        end = end.min(c.saturating_mul(bs));
    }
    let size = end.saturating_sub(start);
    super::create::create(
        "raw",
        &[],
        true,
        &outf,
        Some(&size.to_string()),
        None,
        None,
        true,
    )?;
    let g2 = BlockGraph::new();
    let mut t = OpenSpec::new(&outf);
    t.fmt = Some("raw");
    t.read_only = false;
    let dst = open(&g2, &t)?;
    let mut buf = vec![0u8; bs as usize];
    let mut done = 0u64;
    while done < size {
        let n = bs.min(size - done) as usize;
        src.read_at(start + done, &mut buf[..n])
            .map_err(|e| Fail(format!("error while reading from input image file: {e}"), 1))?;
        dst.write_at(done, &buf[..n])
            .map_err(|e| Fail(format!("error while writing to output image file: {e}"), 1))?;
        done += n as u64;
    }
    dst.flush()?;
    let _ = parse_img_size;
    Ok(0)
}

/// Open a `file` protocol node with a `-t` cache mode.
pub(crate) fn file_node(
    g: &BlockGraph,
    filename: &str,
    read_only: bool,
    cache: Option<&str>,
) -> R<Arc<block::node::Node>> {
    use block::keyval::{Map, Options, Value};
    let mut m = Map::new();
    m.insert("driver".into(), Value::Str("file".into()));
    m.insert("filename".into(), Value::Str(filename.into()));
    if read_only {
        m.insert("read-only".into(), Value::Str("on".into()));
    }
    if let Some(c) = cache {
        let (direct, no_flush, _) = super::cache_mode(c)?;
        let mut cm = Map::new();
        cm.insert("direct".into(), Value::Str(on_off(direct).into()));
        cm.insert("no-flush".into(), Value::Str(on_off(no_flush).into()));
        m.insert("cache".into(), Value::Map(cm));
    }
    g.open_options(Options::new("file", m), None, false)
        .map_err(|e| Fail(format!("Could not open '{filename}': {e}"), 1))
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Open `path` (already resolved) read-only as a backing node.
pub(crate) fn open_backing_node(
    g: &BlockGraph,
    path: &str,
    fmt: Option<&str>,
) -> R<Arc<block::node::Node>> {
    let n = g
        .open_image(path, fmt, true, &[("force-share", "on")])
        .map_err(|e| Fail(format!("Could not open backing file '{path}': {e}"), 1))?;
    let _ = g.take_warnings();
    Ok(n)
}

/// One planned write into a target with clusters: data at a target
/// offset from a range of the chunk's buffer, or zeroes.
enum QOp {
    Data(u64, usize, usize),
    Zero(u64, u64),
}

/// The writes of one chunk and the buffer their data lives in.
struct QPlan {
    buf: Vec<u8>,
    ops: Vec<QOp>,
}

struct QJob {
    sources: Vec<(Arc<BlockBackend>, u64)>,
    target: Arc<BlockBackend>,
    /// The target's backing file, compared against to write differences only.
    backing: Option<Arc<block::node::Node>>,
    cs: u64,
    sparse: u64,
    target_zero: bool,
    compress: bool,
    work: Chunks,
    status: StatusCache,
}

impl QJob {
    /// Read `[start, end)` of the concatenated sources into `buf` (whose
    /// old contents are garbage). Runs the sources report as zeroes are
    /// neither read nor written: their ranges (relative to `start`, in
    /// order) are returned instead.
    fn read_sources(
        &self,
        start: u64,
        end: u64,
        buf: &mut [u8],
    ) -> Result<Vec<(usize, usize)>, String> {
        let mut zeros: Vec<(usize, usize)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let i = self
                .sources
                .iter()
                .position(|(b, s)| pos >= *s && pos < s + b.len())
                .unwrap_or(self.sources.len() - 1);
            let (src, s0) = (&self.sources[i].0, self.sources[i].1);
            let soff = pos - s0;
            let lim = (end - pos).min(src.len().saturating_sub(soff));
            if lim == 0 {
                break;
            }
            let (len, skip) = self.status.get(i, src, soff, lim)?;
            let (a, b) = ((pos - start) as usize, (pos - start + len) as usize);
            if !skip {
                src.read_at(soff, &mut buf[a..b])
                    .map_err(|e| e.to_string())?;
            } else {
                match zeros.last_mut() {
                    Some((_, e)) if *e == a => *e = b,
                    _ => zeros.push((a, b)),
                }
            }
            pos += len;
        }
        // Past the end of the sources: zeroes.
        let (a, b) = ((pos - start) as usize, buf.len());
        if a < b {
            match zeros.last_mut() {
                Some((_, e)) if *e == a => *e = b,
                _ => zeros.push((a, b)),
            }
        }
        Ok(zeros)
    }

    /// Plan one chunk, reading into `spare` (a buffer of an earlier chunk)
    /// when it fits: no fresh zeroed memory per chunk.
    fn plan(&self, idx: u64, spare: Option<Vec<u8>>) -> Result<QPlan, String> {
        let start = idx * self.work.chunk;
        let end = (start + self.work.chunk).min(self.work.total);
        let n = (end - start) as usize;
        let mut buf = spare
            .filter(|b| b.len() == n)
            .unwrap_or_else(|| vec![0u8; n]);
        let zeros = self.read_sources(start, end, &mut buf)?;
        let back = match &self.backing {
            Some(b) if start < b.len() => {
                let mut v = vec![0u8; (end - start) as usize];
                let n = (b.len() - start).min(end - start) as usize;
                b.read_vectored(start, &mut [std::io::IoSliceMut::new(&mut v[..n])])
                    .map_err(|e| e.to_string())?;
                Some(v)
            }
            Some(_) => Some(vec![0u8; (end - start) as usize]),
            None => None,
        };
        let mut ops = Vec::new();
        let mut p = 0usize;
        let cs = self.cs as usize;
        let mut zi = 0usize;
        while p < buf.len() {
            let q = (p + cs).min(buf.len());
            let off = start + p as u64;
            // Zero runs in this piece: whole (no need to look at the
            // bytes) or partial (the buffer gets its zeroes now).
            while zi < zeros.len() && zeros[zi].1 <= p {
                zi += 1;
            }
            let mut whole_zero = false;
            let mut k = zi;
            while k < zeros.len() && zeros[k].0 < q {
                let (a, b) = (zeros[k].0.max(p), zeros[k].1.min(q));
                if a == p && b == q {
                    whole_zero = true;
                }
                k += 1;
            }
            if whole_zero && back.is_none() && self.sparse != 0 {
                if !self.target_zero {
                    push_zero(&mut ops, off, (q - p) as u64);
                }
                p = q;
                continue;
            }
            for &(a, b) in zeros[zi..k].iter() {
                buf[a.max(p)..b.min(q)].fill(0);
            }
            let piece = &buf[p..q];
            match &back {
                Some(bk) if bk[p..q] == *piece => {}
                Some(_) => {
                    if self.sparse != 0 && block::iov::is_zero_buf(piece) {
                        // Zero over backing data: a zero cluster.
                        push_zero(&mut ops, off, (q - p) as u64);
                    } else {
                        ops.push(QOp::Data(off, p, q));
                    }
                }
                None => {
                    if self.sparse == 0 || !block::iov::is_zero_buf(piece) {
                        ops.push(QOp::Data(off, p, q));
                    } else if !self.target_zero {
                        push_zero(&mut ops, off, (q - p) as u64);
                    }
                }
            }
            p = q;
        }
        Ok(QPlan { buf, ops })
    }

    /// Write a planned chunk; the buffer comes back for the next one.
    fn write(&self, plan: QPlan) -> (Result<(), String>, Vec<u8>) {
        let QPlan { buf, ops } = plan;
        let mut ops = ops.into_iter().peekable();
        let mut r = Ok(());
        while let Some(op) = ops.next() {
            r = match op {
                QOp::Data(off, a, b) if self.compress => {
                    self.target.write_compressed_at(off, &buf[a..b])
                }
                QOp::Data(off, a, mut b) => {
                    // Contiguous data goes out as one write.
                    while let Some(QOp::Data(o2, a2, b2)) = ops.peek() {
                        if *a2 != b || *o2 != off + (b - a) as u64 {
                            break;
                        }
                        b = *b2;
                        ops.next();
                    }
                    self.target.write_at(off, &buf[a..b])
                }
                QOp::Zero(off, len) => self.target.write_zeroes(off, len, true),
            }
            .map_err(|e| e.to_string());
            if r.is_err() {
                break;
            }
        }
        (r, buf)
    }

    fn run_worker(&self) {
        // A worker's chunk buffer goes from one chunk to the next.
        self.work.run(
            |idx, spare: &mut Option<Vec<u8>>| self.plan(idx, spare.take()),
            |plan, spare| {
                let (r, buf) = self.write(plan);
                *spare = Some(buf);
                r
            },
        )
    }
}

fn push_zero(ops: &mut Vec<QOp>, off: u64, len: u64) {
    if let Some(QOp::Zero(o, l)) = ops.last_mut() {
        if *o + *l == off {
            *l += len;
            return;
        }
    }
    ops.push(QOp::Zero(off, len));
}
