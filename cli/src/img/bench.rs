//! `bench`: qemu-img's simple I/O benchmark, same flags and output, run
//! through the asynchronous BlockBackend API with `-d` requests in flight.

use super::{fail, open, Fail, OpenSpec, R};
use block::backend::CompletionQueue;
use block::driver::IoRequest;
use block::graph::BlockGraph;
use block::iov::{AlignedBuf, IoVecs};
use std::time::Instant;

/// `bench` options (qemu-img's letters).
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    pub count: u64,
    /// Requests in flight.
    #[arg(short = 'd', default_value_t = 64)]
    pub depth: u32,
    /// Image format.
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// I/O engine (threads, native, io_uring).
    #[arg(short = 'i')]
    pub aio: Option<String>,
    /// Native AIO (same as -i native).
    #[arg(short = 'n')]
    pub native: bool,
    /// Start offset.
    #[arg(short = 'o', default_value = "0")]
    pub offset: String,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Buffer size per request.
    #[arg(short = 's', default_value = "4096")]
    pub size: String,
    /// Step between requests (default: the buffer size).
    #[arg(short = 'S')]
    pub step: Option<String>,
    /// Cache mode.
    #[arg(short = 't', default_value = "writeback")]
    pub cache: String,
    /// Write instead of read.
    #[arg(short = 'w')]
    pub write: bool,
    /// Share the image.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Byte pattern written.
    #[arg(long = "pattern", default_value_t = 0)]
    pub pattern: u8,
    /// Flush every N requests (writes only).
    #[arg(long = "flush-interval")]
    pub flush_interval: Option<u64>,
    /// Do not wait for in-flight requests before flushing.
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// Image.
    pub filename: String,
}

fn size_arg(s: &str, what: &str) -> R<u64> {
    block::keyval::parse_size_str(s, 1).map_err(|_| Fail(format!("Invalid {what} specified"), 1))
}

/// Run the benchmark.
pub fn bench(a: BenchArgs) -> R<i32> {
    if a.depth == 0 {
        return fail("Invalid queue depth specified");
    }
    let bufsize = size_arg(&a.size, "buffer size")?;
    if bufsize == 0 || bufsize > (1 << 30) {
        return fail("Invalid buffer size specified");
    }
    let step = match &a.step {
        Some(s) => size_arg(s, "step size")?,
        None => bufsize,
    };
    let offset = size_arg(&a.offset, "offset")?;
    if a.flush_interval.is_some() && !a.write {
        return fail("--flush-interval is only available in write tests");
    }
    if a.flush_interval.is_some_and(|f| f < a.depth as u64) {
        return fail("Flush interval can't be smaller than depth");
    }
    let aio = if a.native {
        Some("native")
    } else {
        a.aio.as_deref()
    };
    let graph = BlockGraph::new();
    let mut spec = OpenSpec::new(&a.filename);
    spec.fmt = a.fmt.as_deref();
    spec.read_only = !a.write;
    spec.force_share = a.force_share;
    spec.cache = Some(&a.cache);
    spec.aio = aio;
    let blk = open(&graph, &spec)?;
    let size = blk.len();
    if offset.checked_add(bufsize).is_none_or(|e| e > size) {
        return fail("Offset + buffer size is larger than the image size");
    }
    if !a.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            a.count,
            if a.write { "write" } else { "read" },
            bufsize,
            a.depth,
            offset,
            step
        );
        if let Some(f) = a.flush_interval {
            println!("Sending flush every {f} requests");
        }
    }
    let depth = (a.depth as u64).min(a.count.max(1)) as usize;
    let mut bufs: Vec<AlignedBuf> = (0..depth)
        .map(|_| AlignedBuf::new(bufsize as usize, 4096))
        .collect();
    for b in bufs.iter_mut() {
        b.fill(a.pattern);
    }
    let q = CompletionQueue::new()?;
    let mut next_off = offset;
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut in_flight = 0usize;
    let mut flushes_in_flight = 0usize;
    let start = Instant::now();
    let mut submit =
        |tag: usize, submitted: &mut u64, in_flight: &mut usize, bufs: &mut [AlignedBuf]| {
            let b = &mut bufs[tag];
            // SAFETY: `bufs` outlives every request: the loop below waits for
            // all completions before returning, and each buffer is used by at
            // most one request at a time (its tag).
            let iov = unsafe { IoVecs::from_raw(&[(b.as_mut_ptr(), b.len())]) };
            let req = if a.write {
                IoRequest::write(next_off, iov, false)
            } else {
                IoRequest::read(next_off, iov)
            };
            blk.submit(req, q.completion(tag as u64));
            *submitted += 1;
            *in_flight += 1;
            next_off += step;
            if size > 0 {
                next_off %= size;
            }
            if next_off + bufsize > size {
                next_off = 0;
            }
        };
    for tag in 0..depth {
        if submitted < a.count {
            submit(tag, &mut submitted, &mut in_flight, &mut bufs);
        }
    }
    let flush_tag = u64::MAX;
    let mut err: Option<String> = None;
    while completed < a.count || flushes_in_flight > 0 {
        for (tag, _req, r) in q.wait() {
            if tag == flush_tag {
                flushes_in_flight -= 1;
                if let Err(e) = r {
                    err.get_or_insert(format!("Failed flush request: {e}"));
                }
                continue;
            }
            in_flight -= 1;
            completed += 1;
            if let Err(e) = r {
                err.get_or_insert(format!("Failed request: {e}"));
            }
            if err.is_some() {
                continue;
            }
            if let Some(fi) = a.flush_interval.filter(|f| *f > 0) {
                if submitted.is_multiple_of(fi) && submitted < a.count {
                    if a.no_drain {
                        blk.submit(IoRequest::flush(), q.completion(flush_tag));
                        flushes_in_flight += 1;
                    } else if in_flight > 0 {
                        // Drain: hold this slot until every request completed.
                        continue;
                    } else {
                        blk.flush()
                            .map_err(|e| Fail(format!("Failed flush request: {e}"), 1))?;
                        for t in 0..depth {
                            if submitted < a.count {
                                submit(t, &mut submitted, &mut in_flight, &mut bufs);
                            }
                        }
                        continue;
                    }
                }
            }
            if submitted < a.count {
                submit(tag as usize, &mut submitted, &mut in_flight, &mut bufs);
            }
        }
        if err.is_some() && in_flight == 0 && flushes_in_flight == 0 {
            break;
        }
    }
    if let Some(e) = err {
        return fail(e);
    }
    let secs = start.elapsed().as_secs_f64();
    if !a.quiet {
        println!("Run completed in {secs:3.3} seconds.");
    }
    Ok(0)
}
