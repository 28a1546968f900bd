//! An event loop thread (`event-manager`): what QEMU calls an iothread.
//!
//! Device queue handlers are subscribers: they watch their queues'
//! notification eventfds and their block completion eventfd, and run
//! entirely on this thread. The loop is steered from other threads (the
//! vCPU that sets DRIVER_OK or resets the device) through the
//! event-manager's remote endpoint. [`IoThreads`] is a machine's registry
//! of them, by `-object iothread,id=...` id.
//!
//! A loop can also be *manual* ([`EventLoop::manual`]): no thread, the
//! owner calls [`EventLoop::poll`]. The `pc_io` fuzz harness uses it so
//! that virtqueue processing runs deterministically on the fuzzer's thread
//! and a loop that never goes idle is caught (see `vmm::harness`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{
    EventManager, MutEventSubscriber, RemoteEndpoint, SubscriberId, SubscriberOps,
};

pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// QEMU's default `poll-max-ns` for an iothread.
pub const DEFAULT_POLL_MAX_NS: u64 = 32768;

/// A source of work that a polling loop checks while it spins, before
/// it sleeps in epoll (QEMU's adaptive polling): a virtqueue's available
/// ring, the completion queue of an io_uring.
pub trait Poller: Send + Sync {
    /// True when work is waiting; the poller has made its eventfd
    /// readable, so that the loop's next dispatch runs it.
    fn poll(&self) -> bool;
    /// Turns the driver's notifications off while the loop spins (the
    /// driver need not exit to kick a loop that is looking anyway) and
    /// back on before the loop sleeps.
    fn set_notifications(&self, on: bool);
}

thread_local! {
    /// The pollers of the loop running on this thread.
    static POLLERS: RefCell<Vec<Weak<dyn Poller>>> = const { RefCell::new(Vec::new()) };
}

/// Registers `p` with the loop of the calling thread (a subscriber's
/// `init` runs there). It is polled for as long as it lives.
pub fn add_poller(p: Weak<dyn Poller>) {
    POLLERS.with(|v| {
        let mut v = v.borrow_mut();
        v.retain(|w| w.strong_count() > 0);
        v.push(p);
    });
}

/// Calls `f` on every live poller of this thread; true if any `f` did.
fn any_poller(mut f: impl FnMut(&dyn Poller) -> bool) -> bool {
    POLLERS.with(|v| {
        let mut hit = false;
        for w in v.borrow().iter() {
            if let Some(p) = w.upgrade() {
                hit |= f(&*p);
            }
        }
        hit
    })
}

/// How long the loop spins before it sleeps, adapted to the gaps between
/// events: it grows while events arrive soon after the loop went to
/// sleep (spinning a little longer would have caught them without a
/// wake-up), and shrinks while the loop sleeps longer (spinning was
/// wasted). It starts at the maximum: a loop that polls keeps finding
/// work at depth 1 (the driver's next request follows the completion
/// within microseconds), one that sleeps first may never see gaps short
/// enough to start.
struct AdaptivePoll {
    max: Duration,
    now: Duration,
}

impl AdaptivePoll {
    const START: Duration = Duration::from_micros(4);

    fn slept(&mut self, d: Duration) {
        if self.max.is_zero() {
            return;
        }
        // The sleep includes the loop's own wake-up, which is slow on a
        // loaded or nested host: an event within twice the maximum still
        // says spinning would have caught it.
        if d <= self.max * 2 {
            self.now = (self.now * 2).clamp(Self::START, self.max);
        } else {
            self.now /= 2;
            if self.now < Self::START {
                self.now = Duration::ZERO;
            }
        }
    }

    /// Spins up to the current polling time; true if a poller found
    /// work (then the loop dispatches without sleeping).
    fn spin(&self) -> bool {
        if self.now.is_zero() {
            return false;
        }
        any_poller(|p| {
            p.set_notifications(false);
            false
        });
        let deadline = Instant::now() + self.now;
        let mut hit = false;
        while !hit {
            hit = any_poller(|p| p.poll());
            if Instant::now() >= deadline {
                break;
            }
            std::hint::spin_loop();
        }
        any_poller(|p| {
            p.set_notifications(true);
            false
        });
        if !hit {
            // The driver may have published work while notifications
            // were off, without kicking: look once more after turning
            // them on (pairs with the driver's barrier between its index
            // update and its look at the flags).
            std::sync::atomic::fence(Ordering::SeqCst);
            hit = any_poller(|p| p.poll());
        }
        hit
    }
}

pub struct EventLoop {
    name: String,
    runner: Runner,
}

enum Runner {
    Thread {
        remote: RemoteEndpoint<Subscriber>,
        stop: Arc<AtomicBool>,
        thread: Mutex<Option<JoinHandle<()>>>,
    },
    /// Polled by its owner on the owner's thread.
    Manual(Mutex<EventManager<Subscriber>>),
}

impl EventLoop {
    /// Starts the loop thread, named after the iothread id, without
    /// polling.
    pub fn new(name: &str) -> Result<Arc<Self>, String> {
        Self::with_polling(name, 0)
    }

    /// Starts the loop thread; before it sleeps it polls for up to
    /// `poll_max_ns` nanoseconds (adaptively; 0: never).
    pub fn with_polling(name: &str, poll_max_ns: u64) -> Result<Arc<Self>, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("iothread-{name}"))
            .spawn(move || {
                let mut em = match EventManager::<Subscriber>::new() {
                    Ok(em) => em,
                    Err(e) => {
                        let _ = tx.send(Err(format!("event loop: {e}")));
                        return;
                    }
                };
                let _ = tx.send(Ok(em.remote_endpoint()));
                let mut poll = AdaptivePoll {
                    max: Duration::from_nanos(poll_max_ns),
                    now: Duration::from_nanos(poll_max_ns),
                };
                while !stop2.load(Ordering::Acquire) {
                    let r = if poll.spin() {
                        em.run_with_timeout(0)
                    } else if poll.max.is_zero() {
                        // Polling off: the sleep's length decides nothing,
                        // so it is not timed (two clock reads per wake-up).
                        em.run()
                    } else {
                        let t0 = Instant::now();
                        let r = em.run();
                        poll.slept(t0.elapsed());
                        r
                    };
                    if let Err(e) = r {
                        log::error!("event loop: {e}");
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start iothread '{name}': {e}"))?;
        let remote = rx
            .recv()
            .map_err(|_| format!("iothread '{name}' died at start"))??;
        Ok(Arc::new(EventLoop {
            name: name.to_string(),
            runner: Runner::Thread {
                remote,
                stop,
                thread: Mutex::new(Some(thread)),
            },
        }))
    }

    /// A loop without a thread: events are dispatched only by
    /// [`EventLoop::poll`].
    pub fn manual(name: &str) -> Result<Arc<Self>, String> {
        let em = EventManager::<Subscriber>::new().map_err(|e| format!("event loop: {e}"))?;
        Ok(Arc::new(EventLoop {
            name: name.to_string(),
            runner: Runner::Manual(Mutex::new(em)),
        }))
    }

    /// Dispatches the events that are ready now, without waiting; returns
    /// how many there were. Only manual loops can be polled (a threaded
    /// loop answers 0). Must not be called from a subscriber.
    pub fn poll(&self) -> usize {
        match &self.runner {
            Runner::Thread { .. } => 0,
            Runner::Manual(em) => crate::bus::lock(em).run_with_timeout(0).unwrap_or(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a subscriber; its `init` runs on the loop thread (on the
    /// caller's, for a manual loop).
    pub fn add(&self, s: Subscriber) -> Result<SubscriberId, String> {
        match &self.runner {
            Runner::Thread { remote, .. } => remote
                .call_blocking(move |ops| -> Result<SubscriberId, event_manager::Error> {
                    Ok(ops.add_subscriber(s))
                })
                .map_err(|e| format!("iothread '{}': {e}", self.name)),
            Runner::Manual(em) => Ok(crate::bus::lock(em).add_subscriber(s)),
        }
    }

    /// Removes a subscriber and hands it back (so that the caller drops it,
    /// outside the loop). Must not be called from the loop thread itself.
    pub fn remove(&self, id: SubscriberId) -> Option<Subscriber> {
        match &self.runner {
            Runner::Thread { remote, .. } => remote
                .call_blocking(move |ops| ops.remove_subscriber(id))
                .ok(),
            Runner::Manual(em) => crate::bus::lock(em).remove_subscriber(id).ok(),
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        if let Runner::Thread {
            remote,
            stop,
            thread,
        } = &self.runner
        {
            stop.store(true, Ordering::Release);
            let _ = remote.kick();
            if let Some(t) = thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = t.join();
            }
        }
    }
}

/// The event loops of a machine: one per `-object iothread`, created when
/// a device first names it, plus the main loop for devices that name none.
pub struct IoThreads {
    ids: Vec<String>,
    /// `poll-max-ns` per loop name, where it differs from the default.
    poll: BTreeMap<String, u64>,
    loops: BTreeMap<String, Arc<EventLoop>>,
    /// When set, loops are manual and each one started is also recorded
    /// here for the owner to poll.
    manual: Option<ManualLoops>,
}

/// The manual loops of a machine, for the owner that polls them.
pub type ManualLoops = Arc<Mutex<Vec<Arc<EventLoop>>>>;

/// The loop of devices that name no iothread.
pub const MAIN_LOOP: &str = "main-loop";

impl IoThreads {
    /// A registry that knows the iothread ids `ids` (the machine's
    /// `-object iothread` objects) and has started none of them yet.
    pub fn new(ids: &[String]) -> Self {
        IoThreads {
            ids: ids.to_vec(),
            poll: BTreeMap::new(),
            loops: BTreeMap::new(),
            manual: None,
        }
    }

    /// Like [`IoThreads::new`], but every loop is manual and is pushed to
    /// `into` when started.
    pub fn manual(ids: &[String], into: ManualLoops) -> Self {
        IoThreads {
            manual: Some(into),
            ..IoThreads::new(ids)
        }
    }

    /// Sets the `poll-max-ns` of loop `name` (an iothread id, or
    /// [`MAIN_LOOP`]) before it starts; the default is
    /// [`DEFAULT_POLL_MAX_NS`] for every threaded loop, the main one
    /// included, which is a thread of its own here, not QEMU's main loop.
    pub fn set_poll_max_ns(&mut self, name: &str, ns: u64) {
        self.poll.insert(name.to_string(), ns);
    }

    /// The loop of iothread `id` (the main loop for `None`), started on
    /// first use; an error for an id that was never declared.
    pub fn get(&mut self, id: Option<&str>) -> Result<Arc<EventLoop>, String> {
        let name = match id {
            Some(i) if self.ids.iter().any(|x| x == i) => i,
            Some(i) => {
                return Err(format!(
                    "iothread '{i}' does not exist (use -object iothread,id={i})"
                ))
            }
            None => MAIN_LOOP,
        };
        if let Some(l) = self.loops.get(name) {
            return Ok(l.clone());
        }
        let l = match &self.manual {
            Some(into) => {
                let l = EventLoop::manual(name)?;
                crate::bus::lock(into).push(l.clone());
                l
            }
            None => EventLoop::with_polling(
                name,
                self.poll.get(name).copied().unwrap_or(DEFAULT_POLL_MAX_NS),
            )?,
        };
        self.loops.insert(name.to_string(), l.clone());
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iothreads_are_shared_by_id_and_unknown_ids_are_refused() {
        let mut t = IoThreads::new(&["io0".to_string()]);
        let a = t.get(Some("io0")).unwrap();
        let b = t.get(Some("io0")).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.name(), "io0");
        assert_eq!(t.get(None).unwrap().name(), MAIN_LOOP);
        let e = t.get(Some("io1")).err().unwrap();
        assert!(e.contains("iothread 'io1' does not exist"), "{e}");
    }

    /// A subscriber counting the events of one eventfd.
    struct Counter(
        vmm_sys_util::eventfd::EventFd,
        Arc<std::sync::atomic::AtomicUsize>,
    );
    impl MutEventSubscriber for Counter {
        fn process(&mut self, _: event_manager::Events, _: &mut event_manager::EventOps) {
            let _ = self.0.read();
            self.1.fetch_add(1, Ordering::SeqCst);
        }
        fn init(&mut self, ops: &mut event_manager::EventOps) {
            ops.add(event_manager::Events::new(
                &self.0,
                event_manager::EventSet::IN,
            ))
            .unwrap();
        }
    }

    #[test]
    fn manual_loops_dispatch_only_when_polled() {
        let into = ManualLoops::default();
        let mut t = IoThreads::manual(&[], into.clone());
        let l = t.get(None).unwrap();
        assert_eq!(into.lock().unwrap().len(), 1);
        let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let id = l
            .add(Box::new(Counter(efd.try_clone().unwrap(), n.clone())))
            .unwrap();
        assert_eq!(l.poll(), 0);
        efd.write(1).unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 0, "nothing runs without a poll");
        assert_eq!(l.poll(), 1);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(l.poll(), 0);
        assert!(l.remove(id).is_some());
    }
}
