//! `bench`: qemu-img's simple I/O benchmark, same flags and output, run
//! through the asynchronous BlockBackend API with `-d` requests in flight.

use super::{fail, open, Fail, OpenSpec, R};
use block::backend::BlockBackend;
use block::driver::IoRequest;
use block::graph::BlockGraph;
use block::iov::{AlignedBuf, IoVecs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

struct Inner {
    next_off: u64,
    submitted: u64,
    completed: u64,
    in_flight: usize,
    held: Vec<usize>,
    error: Option<String>,
    done: bool,
}

/// The benchmark loop, driven by completions (as QEMU's is): each
/// completion callback submits the next request on the I/O thread, so no
/// request waits for the main thread.
struct State {
    blk: Arc<BlockBackend>,
    inner: Mutex<Inner>,
    cv: Condvar,
    bufs: Vec<(usize, usize)>,
    count: u64,
    write: bool,
    step: u64,
    bufsize: u64,
    size: u64,
    flush_interval: Option<u64>,
    no_drain: bool,
}

thread_local! {
    /// Buffers whose next request waits for the `issue` running on this
    /// thread: a driver may complete a request inside `submit` (null-co,
    /// qcow2 reads of unallocated clusters), and issuing the next request
    /// from there would nest one call per request until the stack overflows.
    static PENDING: std::cell::RefCell<Option<Vec<usize>>> = const { std::cell::RefCell::new(None) };
}

impl State {
    /// Submit the next request using buffer `tag`, if any remain. Calls
    /// made from inside a submit on this thread are queued and run by the
    /// outermost call, in a loop.
    fn issue(st: &Arc<State>, tag: usize) {
        let nested = PENDING.with(|p| {
            let mut p = p.borrow_mut();
            match p.as_mut() {
                Some(q) => {
                    q.push(tag);
                    true
                }
                None => {
                    *p = Some(Vec::new());
                    false
                }
            }
        });
        if nested {
            return;
        }
        let mut tag = tag;
        loop {
            Self::issue_one(st, tag);
            let next = PENDING.with(|p| {
                let mut p = p.borrow_mut();
                let q = p.as_mut().and_then(|q| q.pop());
                if q.is_none() {
                    *p = None;
                }
                q
            });
            match next {
                Some(t) => tag = t,
                None => return,
            }
        }
    }

    fn issue_one(st: &Arc<State>, tag: usize) {
        let off = {
            let mut g = st.inner.lock().unwrap_or_else(|e| e.into_inner());
            if g.submitted >= st.count || g.error.is_some() {
                return;
            }
            let off = g.next_off;
            g.submitted += 1;
            g.in_flight += 1;
            let mut n = off + st.step;
            if st.size > 0 {
                n %= st.size;
            }
            if n + st.bufsize > st.size {
                n = 0;
            }
            g.next_off = n;
            off
        };
        let (p, l) = st.bufs[tag];
        // SAFETY: the buffers outlive every request (bench() waits for
        // `done`, set only when nothing is in flight) and each buffer is used
        // by one request at a time (its tag).
        let iov = unsafe { IoVecs::from_raw(&[(p as *mut u8, l)]) };
        let req = if st.write {
            IoRequest::write(off, iov, false)
        } else {
            IoRequest::read(off, iov)
        };
        let st2 = st.clone();
        st.blk
            .submit(req, Box::new(move |_req, r| State::completed(&st2, tag, r)));
    }

    fn completed(st: &Arc<State>, tag: usize, r: block::error::BlockResult<()>) {
        enum Next {
            Issue,
            Hold,
            FlushAsync,
            FlushDrained(Vec<usize>),
            Finish,
            Nothing,
        }
        let next = {
            let mut g = st.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.in_flight -= 1;
            g.completed += 1;
            if let Err(e) = r {
                g.error.get_or_insert(format!("Failed request: {e}"));
            }
            if g.completed >= st.count || (g.error.is_some() && g.in_flight == 0) {
                if g.in_flight == 0 {
                    Next::Finish
                } else {
                    Next::Nothing
                }
            } else if g.error.is_some() {
                Next::Nothing
            } else {
                match st.flush_interval {
                    Some(fi) if g.submitted.is_multiple_of(fi) && g.submitted < st.count => {
                        if st.no_drain {
                            Next::FlushAsync
                        } else {
                            g.held.push(tag);
                            if g.in_flight == 0 {
                                Next::FlushDrained(std::mem::take(&mut g.held))
                            } else {
                                Next::Hold
                            }
                        }
                    }
                    _ => Next::Issue,
                }
            }
        };
        match next {
            Next::Issue => State::issue(st, tag),
            Next::Hold | Next::Nothing => {}
            Next::FlushAsync => {
                st.blk.submit(IoRequest::flush(), Box::new(|_, _| {}));
                State::issue(st, tag);
            }
            Next::FlushDrained(tags) => {
                if let Err(e) = st.blk.flush() {
                    let mut g = st.inner.lock().unwrap_or_else(|e| e.into_inner());
                    g.error.get_or_insert(format!("Failed flush request: {e}"));
                    g.done = true;
                    st.cv.notify_all();
                    return;
                }
                for t in tags {
                    State::issue(st, t);
                }
            }
            Next::Finish => {
                let mut g = st.inner.lock().unwrap_or_else(|e| e.into_inner());
                g.done = true;
                st.cv.notify_all();
            }
        }
    }
}

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
    block::keyval::parse_size_str(s, 1)
        .map_err(|_| Fail(format!("Invalid {what} specified: '{s}'."), 1))
}

/// Run the benchmark.
pub fn bench(a: BenchArgs) -> R<i32> {
    if a.depth == 0 {
        return fail("Invalid queue depth specified");
    }
    let bufsize = size_arg(&a.size, "buffer size")?;
    if bufsize == 0 || bufsize > (1 << 30) {
        return fail(format!("Invalid buffer size specified: '{}'.", a.size));
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
    if super::cache_mode(&a.cache).is_err() {
        return fail("Invalid cache mode");
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
    let bufs: Vec<AlignedBuf> = (0..depth)
        .map(|_| {
            let mut b = AlignedBuf::new(bufsize as usize, 4096);
            b.fill(a.pattern);
            b
        })
        .collect();
    let st = Arc::new(State {
        blk: blk.clone(),
        inner: Mutex::new(Inner {
            next_off: offset,
            submitted: 0,
            completed: 0,
            in_flight: 0,
            held: Vec::new(),
            error: None,
            done: false,
        }),
        cv: Condvar::new(),
        bufs: bufs
            .iter()
            .map(|b| (b.as_ptr() as usize, b.len()))
            .collect(),
        count: a.count,
        write: a.write,
        step,
        bufsize,
        size,
        flush_interval: a.flush_interval.filter(|f| *f > 0),
        no_drain: a.no_drain,
    });
    let start = Instant::now();
    if a.count == 0 {
        st.inner.lock().unwrap_or_else(|e| e.into_inner()).done = true;
    }
    for tag in 0..depth {
        State::issue(&st, tag);
    }
    let err = {
        let mut g = st.inner.lock().unwrap_or_else(|e| e.into_inner());
        while !g.done {
            g = st.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.error.take()
    };
    drop(bufs);
    if let Some(e) = err {
        return fail(e);
    }
    let secs = start.elapsed().as_secs_f64();
    if !a.quiet {
        println!("Run completed in {secs:3.3} seconds.");
    }
    // A clean close, as qemu-img's: formats clear their in-use marks
    // (qed's need-check, parallels' in-use) and write metadata back.
    if let Some(root) = blk.root() {
        root.close().map_err(|e| Fail(e.to_string(), 1))?;
    }
    Ok(0)
}
