//! Device timers on the machine's [`Clock`]: one service per machine for
//! every device that must act at a time rather than on a guest access (a
//! USB host controller's frame clock, later EHCI's and xHCI's schedules,
//! a delayed interrupt).
//!
//! A device asks [`Timers::timer`] for a [`Timer`] with the callback to
//! run, and arms it for a clock time; the callback may re-arm it (a
//! periodic frame clock). Callbacks run without the service's lock held,
//! so a device may arm its timer while holding its own lock, and take
//! that lock in the callback.
//!
//! Who runs the callbacks depends on the clock: under KVM a thread
//! ([`Timers::spawn_thread`]) sleeps until the next deadline on the host
//! clock; under qtest nothing runs until the test steps the manual clock,
//! and `clock_step` then runs each deadline it passes, in order, with the
//! clock set to that deadline ([`Timers::advance`]), as QEMU's qtest does
//! with its virtual clock. Either way, a timer that is no longer armed or
//! whose [`Timer`] was dropped never runs.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use crate::clock::Clock;

type Callback = Arc<dyn Fn(u64) + Send + Sync>;

#[derive(Default)]
struct State {
    next_id: u64,
    /// Armed timers by (deadline, id): the earliest first.
    armed: BTreeSet<(u64, u64)>,
    /// Every live timer: its callback and deadline, if armed.
    entries: HashMap<u64, (Callback, Option<u64>)>,
}

/// The timers of one machine.
pub struct Timers {
    clock: Arc<dyn Clock>,
    st: Mutex<State>,
    /// Wakes the timer thread when a deadline earlier than the one it
    /// sleeps for is armed.
    cv: Condvar,
}

/// One device timer; dropping it cancels it.
pub struct Timer {
    id: u64,
    timers: Weak<Timers>,
}

/// The most deadlines one [`Timers::advance`] runs: a callback that keeps
/// re-arming itself for the current time must not hang the caller.
const MAX_RUNS_PER_ADVANCE: usize = 1 << 20;

impl Timers {
    /// The timers of a machine whose time is `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Timers {
            clock,
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
        })
    }

    /// The machine's time, in nanoseconds.
    pub fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    /// The machine's clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// A timer that runs `poll` on `dev` when it expires and re-arms for
    /// the deadline `poll` returns (`None`: stays disarmed until armed
    /// again), for devices that work in periods (a USB frame clock). The
    /// device locks only in the callback, not the service, so it may arm
    /// the returned timer while it holds its own lock.
    pub fn polling<D: Send + 'static>(
        self: &Arc<Self>,
        dev: Weak<Mutex<D>>,
        poll: impl Fn(&mut D) -> Option<u64> + Send + Sync + 'static,
    ) -> Arc<Timer> {
        let me: Arc<OnceLock<Weak<Timer>>> = Arc::default();
        let slot = me.clone();
        let timer = Arc::new(self.timer(move |_now| {
            let Some(d) = dev.upgrade() else { return };
            let next = poll(&mut d.lock().unwrap_or_else(|e| e.into_inner()));
            if let (Some(at), Some(t)) = (next, slot.get().and_then(Weak::upgrade)) {
                t.arm_at(at);
            }
        }));
        let _ = me.set(Arc::downgrade(&timer));
        timer
    }

    /// A new, disarmed timer that runs `callback(now)` when it expires.
    pub fn timer(self: &Arc<Self>, callback: impl Fn(u64) + Send + Sync + 'static) -> Timer {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.entries.insert(id, (Arc::new(callback), None));
        Timer {
            id,
            timers: Arc::downgrade(self),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, id: u64, at: Option<u64>) {
        let mut st = self.lock();
        let Some(entry) = st.entries.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut entry.1, at);
        if let Some(o) = old {
            st.armed.remove(&(o, id));
        }
        if let Some(a) = at {
            let earliest = st.armed.first().is_none_or(|&(d, _)| a < d);
            st.armed.insert((a, id));
            if earliest {
                self.cv.notify_all();
            }
        }
    }

    fn remove(&self, id: u64) {
        let mut st = self.lock();
        if let Some((_, Some(at))) = st.entries.remove(&id) {
            st.armed.remove(&(at, id));
        }
    }

    /// The earliest armed deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        self.lock().armed.first().map(|&(d, _)| d)
    }

    /// Runs every timer due at the clock's current time, each once (one
    /// re-armed for now or earlier waits for the next call); returns how
    /// many ran.
    pub fn run_due(&self) -> usize {
        let now = self.now();
        let due: Vec<Callback> = {
            let mut st = self.lock();
            let mut due = Vec::new();
            while let Some(&(at, id)) = st.armed.first() {
                if at > now {
                    break;
                }
                st.armed.remove(&(at, id));
                if let Some(e) = st.entries.get_mut(&id) {
                    e.1 = None;
                    due.push(e.0.clone());
                }
            }
            due
        };
        for cb in &due {
            cb(now);
        }
        due.len()
    }

    /// Moves a manual clock to `target` through every deadline on the
    /// way: `set_clock(d)` then the timers due at `d`, in deadline order
    /// (qtest's `clock_step`). Returns the number of timers run.
    pub fn advance(&self, target: u64, set_clock: impl Fn(u64)) -> usize {
        let mut ran = 0;
        while ran < MAX_RUNS_PER_ADVANCE {
            match self.next_deadline() {
                Some(d) if d <= target => {
                    if d > self.now() {
                        set_clock(d);
                    }
                    ran += self.run_due().max(1);
                }
                _ => break,
            }
        }
        if target > self.now() {
            set_clock(target);
        }
        ran
    }

    /// Runs the timers on a thread that sleeps until each deadline of a
    /// clock that moves by itself (the host's). The thread ends soon
    /// after the machine drops its last handle to these timers.
    pub fn spawn_thread(self: &Arc<Self>, name: &str) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // Hold the timers only while waiting a bounded time, so
                // that a machine torn down lets the thread see it.
                const CHECK: Duration = Duration::from_millis(100);
                while let Some(t) = weak.upgrade() {
                    t.run_due();
                    let st = t.lock();
                    let wait = match st.armed.first() {
                        Some(&(d, _)) => Duration::from_nanos(d.saturating_sub(t.now())).min(CHECK),
                        None => CHECK,
                    };
                    if !wait.is_zero() {
                        let _ = t.cv.wait_timeout(st, wait);
                    }
                }
            })
            .map(|_| ())
    }
}

impl Timer {
    /// Arms the timer for clock time `at_ns` (replacing any earlier
    /// arming); a time already past runs at the next chance.
    pub fn arm_at(&self, at_ns: u64) {
        if let Some(t) = self.timers.upgrade() {
            t.set(self.id, Some(at_ns));
        }
    }

    /// Arms the timer `ns` nanoseconds from now.
    pub fn arm_in(&self, ns: u64) {
        if let Some(t) = self.timers.upgrade() {
            let at = t.now().saturating_add(ns);
            t.set(self.id, Some(at));
        }
    }

    /// Disarms the timer.
    pub fn cancel(&self) {
        if let Some(t) = self.timers.upgrade() {
            t.set(self.id, None);
        }
    }

    /// The machine's time.
    pub fn now(&self) -> u64 {
        self.timers.upgrade().map_or(0, |t| t.now())
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some(t) = self.timers.upgrade() {
            t.remove(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn manual_clock_runs_each_deadline_in_order() {
        let clock = Arc::new(ManualClock::default());
        let timers = Timers::new(clock.clone());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let slot: Arc<Mutex<Option<Timer>>> = Arc::default();
        let slot2 = slot.clone();
        // A 1 ms periodic timer, as a USB frame clock.
        let t = timers.timer(move |now| {
            s.lock().unwrap().push(now);
            if let Some(t) = &*slot2.lock().unwrap() {
                t.arm_at(now + 1_000_000);
            }
        });
        t.arm_at(1_000_000);
        *slot.lock().unwrap() = Some(t);
        let ran = timers.advance(3_500_000, |ns| clock.set(ns));
        assert_eq!(ran, 3);
        assert_eq!(*seen.lock().unwrap(), vec![1_000_000, 2_000_000, 3_000_000]);
        assert_eq!(clock.now_ns(), 3_500_000);
        assert_eq!(timers.next_deadline(), Some(4_000_000));
        // Dropping the timer cancels it.
        *slot.lock().unwrap() = None;
        assert_eq!(timers.next_deadline(), None);
        assert_eq!(timers.advance(10_000_000, |ns| clock.set(ns)), 0);
    }

    #[test]
    fn a_timer_rearming_for_now_cannot_hang_advance() {
        let clock = Arc::new(ManualClock::default());
        let timers = Timers::new(clock.clone());
        let slot: Arc<Mutex<Option<Timer>>> = Arc::default();
        let slot2 = slot.clone();
        let t = timers.timer(move |now| {
            if let Some(t) = &*slot2.lock().unwrap() {
                t.arm_at(now);
            }
        });
        t.arm_at(5);
        *slot.lock().unwrap() = Some(t);
        assert_eq!(timers.advance(10, |ns| clock.set(ns)), MAX_RUNS_PER_ADVANCE);
    }

    #[test]
    fn the_thread_runs_timers_on_the_host_clock() {
        let timers = Timers::new(Arc::new(crate::clock::HostClock::new()));
        timers.spawn_thread("timers-test").unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let t = timers.timer(move |_| {
            h.fetch_add(1, Ordering::SeqCst);
        });
        t.arm_in(2_000_000);
        let start = std::time::Instant::now();
        while hits.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }
}
