//! I/O throttling for `BlockBackend` (QEMU's `-drive throttling.*` options,
//! documented in QEMU's `docs/throttle.txt`): leaky buckets for IOPS and
//! bytes per second, total/read/write, each with an optional burst (`*-max`
//! over `*-max-length` seconds), `iops-size`, and `throttling.group` to share
//! one set of buckets between drives.
//!
//! Each request reserves its units in every bucket that applies and is
//! dispatched once the buckets have leaked enough ("virtual scheduling"),
//! which keeps requests in arrival order. Without a burst setting a bucket
//! holds a tenth of a second of its rate, as in QEMU.

use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One limit: average rate, optional burst rate and its length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    /// Units per second (0: unlimited).
    pub avg: u64,
    /// Burst rate (0: none).
    pub max: u64,
    /// Burst length in seconds (default 1).
    pub max_length: u64,
}

/// All limits of a backend or group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// `bps-total`, `bps-read`, `bps-write`.
    pub bps: [Limit; 3],
    /// `iops-total`, `iops-read`, `iops-write`.
    pub iops: [Limit; 3],
    /// `iops-size`: a request counts as `len / iops_size` operations.
    pub iops_size: u64,
}

impl ThrottleConfig {
    /// True if any limit is set.
    pub fn enabled(&self) -> bool {
        self.bps.iter().chain(self.iops.iter()).any(|l| l.avg > 0)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    level: f64,
}

/// Shared throttling state (one per backend, or per group).
#[derive(Debug)]
pub struct Throttle {
    /// Last update, the buckets, and the limits (QMP
    /// `block_set_io_throttle` changes them while requests flow).
    state: Mutex<(Instant, [Bucket; 6], ThrottleConfig)>,
}

impl Throttle {
    /// A throttle with `cfg`.
    pub fn new(cfg: ThrottleConfig) -> Arc<Throttle> {
        Arc::new(Throttle {
            state: Mutex::new((Instant::now(), [Bucket::default(); 6], cfg)),
        })
    }

    /// The throttle of group `name`, created with `cfg` on first use
    /// (`-drive throttling.group=` semantics).
    pub fn group(name: &str, cfg: ThrottleConfig) -> Arc<Throttle> {
        let mut g = groups().lock().unwrap_or_else(|e| e.into_inner());
        g.entry(name.to_string())
            .or_insert_with(|| Throttle::new(cfg))
            .clone()
    }

    /// Define group `name` (`-object throttle-group,id=name,...`); an
    /// existing group of that name is an error.
    pub fn define_group(name: &str, cfg: ThrottleConfig) -> Result<Arc<Throttle>, String> {
        let mut g = groups().lock().unwrap_or_else(|e| e.into_inner());
        if g.contains_key(name) {
            return Err(format!("Throttle group '{name}' already exists"));
        }
        let t = Throttle::new(cfg);
        g.insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// An existing group.
    pub fn lookup_group(name: &str) -> Option<Arc<Throttle>> {
        groups()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The configuration.
    pub fn config(&self) -> ThrottleConfig {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2
    }

    /// Replaces the limits; the buckets keep their levels.
    pub fn set_config(&self, cfg: ThrottleConfig) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2 = cfg;
    }

    /// Reserve a request of `bytes` (a write if `write`) and return how
    /// long it must wait before being dispatched.
    pub fn reserve(&self, write: bool, bytes: u64) -> Duration {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let cfg = st.2;
        let now = Instant::now();
        let elapsed = now.duration_since(st.0).as_secs_f64();
        st.0 = now;
        let ops = if cfg.iops_size > 0 {
            (bytes as f64 / cfg.iops_size as f64).max(1.0)
        } else {
            1.0
        };
        let dir = if write { 2 } else { 1 };
        let mut wait = 0.0f64;
        let limits = [
            (0usize, cfg.bps[0], bytes as f64),
            (dir, cfg.bps[dir], bytes as f64),
            (3, cfg.iops[0], ops),
            (3 + dir, cfg.iops[dir], ops),
        ];
        // Every bucket leaks at its own rate, requests of either kind or not.
        for (i, bk) in st.1.iter_mut().enumerate() {
            let lim = if i < 3 { cfg.bps[i] } else { cfg.iops[i - 3] };
            if lim.avg > 0 {
                bk.level = (bk.level - elapsed * lim.avg as f64).max(0.0);
            }
        }
        for (b, lim, _) in limits {
            if lim.avg == 0 {
                continue;
            }
            let cap = if lim.max > 0 {
                lim.max as f64 * lim.max_length.max(1) as f64
            } else {
                lim.avg as f64 / 10.0
            };
            let level = st.1[b].level;
            if level > cap {
                wait = wait.max((level - cap) / lim.avg as f64);
            }
        }
        for (b, lim, units) in limits {
            if lim.avg > 0 {
                st.1[b].level += units;
            }
        }
        // Bounded so that `Instant + delay` can never overflow.
        Duration::from_secs_f64(wait.clamp(0.0, 1e7))
    }
}

fn groups() -> &'static Mutex<HashMap<String, Arc<Throttle>>> {
    static GROUPS: OnceLock<Mutex<HashMap<String, Arc<Throttle>>>> = OnceLock::new();
    GROUPS.get_or_init(|| Mutex::new(HashMap::new()))
}

type Job = Box<dyn FnOnce() + Send>;

struct Timed {
    at: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Earliest first in a max-heap.
        o.at.cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

struct Timer {
    q: Mutex<(BinaryHeap<Timed>, u64)>,
    cv: Condvar,
}

fn timer() -> &'static Timer {
    static T: OnceLock<Timer> = OnceLock::new();
    T.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("block-throttle".into())
            .spawn(timer_loop);
        Timer {
            q: Mutex::new((BinaryHeap::new(), 0)),
            cv: Condvar::new(),
        }
    })
}

fn timer_loop() {
    let t = timer();
    let mut g = t.q.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        match g.0.peek().map(|x| x.at) {
            Some(at) if at <= now => {
                if let Some(x) = g.0.pop() {
                    drop(g);
                    (x.job)();
                    g = t.q.lock().unwrap_or_else(|e| e.into_inner());
                }
            }
            Some(at) => {
                g =
                    t.cv.wait_timeout(g, at - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
            }
            None => {
                g = t.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

/// Run `job` after `delay` on the throttle timer thread.
pub fn run_after(delay: Duration, job: Job) {
    let t = timer();
    let mut g = t.q.lock().unwrap_or_else(|e| e.into_inner());
    g.1 += 1;
    let seq = g.1;
    g.0.push(Timed {
        at: Instant::now() + delay,
        seq,
        job,
    });
    t.cv.notify_one();
}
