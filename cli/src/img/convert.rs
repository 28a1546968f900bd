//! `convert`, `compare` and `dd`, following qemu-img's options and exit codes.

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
    /// Sources, then the target.
    #[arg(num_args = 2.., required = true)]
    pub files: Vec<String>,
}

struct Progress {
    on: bool,
    total: u64,
    done: AtomicU64,
    last: Mutex<f64>,
}

impl Progress {
    fn add(&self, n: u64) {
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
    fn start(&self) {
        if self.on {
            print!("    (0.00/100%)\r");
            let _ = std::io::stdout().flush();
        }
    }
    fn finish(&self) {
        if self.on {
            println!("    (100.00/100%)");
        }
    }
}

const CHUNK: u64 = 2 << 20;

/// Planned writes: (target offset, length, data or `None` for zeroes).
type Plan = Vec<(u64, u64, Option<(Arc<Vec<u8>>, usize)>)>;

struct Job {
    sources: Vec<(Arc<BlockBackend>, u64)>, // backend and its start in the target
    target: Arc<BlockBackend>,
    total: u64,
    sparse: u64,
    target_zero: bool,
    next: AtomicU64,
    write_turn: (Mutex<u64>, Condvar),
    ordered: bool,
    progress: Progress,
    error: Mutex<Option<String>>,
}

impl Job {
    fn source_at(&self, pos: u64) -> (&Arc<BlockBackend>, u64, u64) {
        for (b, start) in &self.sources {
            if pos >= *start && pos < start + b.len() {
                return (b, pos - start, start + b.len());
            }
        }
        let (b, s) = &self.sources[self.sources.len() - 1];
        (b, pos - s, s + b.len())
    }

    /// Plan the writes of one chunk: (target offset, data or None for zeroes).
    fn plan(&self, idx: u64) -> Result<Plan, String> {
        let start = idx * CHUNK;
        let end = (start + CHUNK).min(self.total);
        let mut ops = Vec::new();
        let mut pos = start;
        while pos < end {
            let (src, soff, send) = self.source_at(pos);
            let lim = end.min(send) - pos;
            let st = src.block_status(soff, lim).map_err(|e| e.to_string())?;
            let len = st.len.clamp(1, lim);
            if st.zero && !st.data {
                if self.sparse == 0 {
                    ops.push((pos, len, Some((Arc::new(vec![0u8; len as usize]), 0))));
                } else if !self.target_zero {
                    ops.push((pos, len, None));
                }
            } else {
                let mut buf = vec![0u8; len as usize];
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
        loop {
            let idx = self.next.fetch_add(1, Ordering::Relaxed);
            if idx * CHUNK >= self.total || self.error.lock().map(|e| e.is_some()).unwrap_or(true) {
                // Let ordered writers behind us proceed.
                if self.ordered {
                    let (m, cv) = &self.write_turn;
                    let _g = m.lock();
                    cv.notify_all();
                }
                return;
            }
            let r = self.plan(idx);
            if self.ordered {
                let (m, cv) = &self.write_turn;
                let mut turn = m.lock().unwrap_or_else(|e| e.into_inner());
                while *turn != idx {
                    if self.error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        return;
                    }
                    turn = cv.wait(turn).unwrap_or_else(|e| e.into_inner());
                }
            }
            let res = r.and_then(|ops| {
                for (off, len, data) in ops {
                    match data {
                        Some((d, s)) => self.target.write_at(off, &d[s..s + len as usize]),
                        None => self.target.write_zeroes(off, len, true),
                    }
                    .map_err(|e| e.to_string())?;
                }
                Ok(())
            });
            let chunk_len = CHUNK.min(self.total - idx * CHUNK);
            self.progress.add(chunk_len);
            if self.ordered {
                let (m, cv) = &self.write_turn;
                let mut turn = m.lock().unwrap_or_else(|e| e.into_inner());
                *turn += 1;
                cv.notify_all();
            }
            if let Err(e) = res {
                let mut g = self.error.lock().unwrap_or_else(|e| e.into_inner());
                g.get_or_insert(e);
                let (_, cv) = &self.write_turn;
                cv.notify_all();
                return;
            }
        }
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

/// `convert`.
pub fn convert(a: ConvertArgs) -> R<i32> {
    if a.out_fmt != "raw" {
        return fail(format!("Unknown file format '{}'", a.out_fmt));
    }
    if a.compress {
        return fail("Compression not supported for this file format");
    }
    if a.target_is_zero && !a.no_create {
        return fail("--target-is-zero requires use of -n flag");
    }
    if !(1..=16).contains(&a.parallel) {
        return fail("Invalid number of coroutines specified. Must be between 1 and 16.");
    }
    let sparse = block::keyval::parse_size_str(&a.sparse, 1)
        .ok()
        .filter(|s| *s == 0 || s % 512 == 0)
        .ok_or_else(|| Fail("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 2097152. Select 0 to disable sparse detection (fully allocates output).".into(), 1))?;
    if sparse > CHUNK {
        return fail("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 2097152. Select 0 to disable sparse detection (fully allocates output).");
    }
    super::cache_mode(&a.cache)?;
    super::cache_mode(&a.src_cache)?;
    let (srcs, target) = a.files.split_at(a.files.len() - 1);
    let target = &target[0];
    let graph = BlockGraph::new();
    let mut sources = Vec::new();
    let mut total = 0u64;
    for s in srcs {
        let mut spec = OpenSpec::new(s);
        spec.fmt = a.fmt.as_deref();
        spec.force_share = a.force_share;
        spec.cache = Some(&a.src_cache);
        let b = open(&graph, &spec)?;
        sources.push((b.clone(), total));
        total += b.len();
    }
    let mut prealloc_opts = Vec::new();
    for o in &a.options {
        prealloc_opts.push(o.clone());
    }
    if !a.no_create {
        super::info::create(
            "raw",
            &prealloc_opts,
            true,
            target,
            Some(&total.to_string()),
        )?;
    }
    let tgraph = BlockGraph::new();
    let mut spec = OpenSpec::new(target);
    spec.fmt = Some("raw");
    spec.read_only = false;
    spec.cache = Some(&a.cache);
    let tb = open(&tgraph, &spec)?;
    if tb.len() < total {
        return fail(format!(
            "Output image is too small: {} bytes needed, {} available",
            total,
            tb.len()
        ));
    }
    let job = Arc::new(Job {
        sources,
        target: tb.clone(),
        total,
        sparse,
        target_zero: !a.no_create || a.target_is_zero,
        next: AtomicU64::new(0),
        write_turn: (Mutex::new(0), Condvar::new()),
        ordered: !a.out_of_order,
        progress: Progress {
            on: a.progress && !a.quiet,
            total,
            done: AtomicU64::new(0),
            last: Mutex::new(0.0),
        },
        error: Mutex::new(None),
    });
    job.progress.start();
    let threads: Vec<_> = (0..a.parallel)
        .map(|_| {
            let j = job.clone();
            std::thread::spawn(move || j.run_worker())
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    if let Some(e) = job.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return fail(format!("error while converting: {e}"));
    }
    tb.flush()
        .map_err(|e| Fail(format!("error while flushing the target: {e}"), 1))?;
    job.progress.finish();
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
    let prog = Progress {
        on: progress && !quiet,
        total: l1.max(l2),
        done: AtomicU64::new(0),
        last: Mutex::new(0.0),
    };
    prog.start();
    while off < common {
        let n = step.min(common - off);
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
    super::info::create("raw", &[], true, &outf, Some(&size.to_string()))?;
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
