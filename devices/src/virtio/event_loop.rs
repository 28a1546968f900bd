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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{
    EventManager, MutEventSubscriber, RemoteEndpoint, SubscriberId, SubscriberOps,
};

pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

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
    /// Starts the loop thread, named after the iothread id.
    pub fn new(name: &str) -> Result<Arc<Self>, String> {
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
                while !stop2.load(Ordering::Acquire) {
                    if let Err(e) = em.run() {
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
            None => EventLoop::new(name)?,
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
