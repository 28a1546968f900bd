//! An event loop thread (`event-manager`): what QEMU calls an iothread.
//!
//! Device queue handlers are subscribers: they watch their queues'
//! notification eventfds and their block completion eventfd, and run
//! entirely on this thread. The loop is steered from other threads (the
//! vCPU that sets DRIVER_OK or resets the device) through the
//! event-manager's remote endpoint. [`IoThreads`] is a machine's registry
//! of them, by `-object iothread,id=...` id.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, MutEventSubscriber, RemoteEndpoint, SubscriberId};

pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

pub struct EventLoop {
    name: String,
    remote: RemoteEndpoint<Subscriber>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
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
            remote,
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a subscriber; its `init` runs on the loop thread.
    pub fn add(&self, s: Subscriber) -> Result<SubscriberId, String> {
        self.remote
            .call_blocking(move |ops| -> Result<SubscriberId, event_manager::Error> {
                Ok(ops.add_subscriber(s))
            })
            .map_err(|e| format!("iothread '{}': {e}", self.name))
    }

    /// Removes a subscriber and hands it back (so that the caller drops it,
    /// outside the loop). Must not be called from the loop thread itself.
    pub fn remove(&self, id: SubscriberId) -> Option<Subscriber> {
        self.remote
            .call_blocking(move |ops| ops.remove_subscriber(id))
            .ok()
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.remote.kick();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// The event loops of a machine: one per `-object iothread`, created when
/// a device first names it, plus the main loop for devices that name none.
pub struct IoThreads {
    ids: Vec<String>,
    loops: BTreeMap<String, Arc<EventLoop>>,
}

/// The loop of devices that name no iothread.
pub const MAIN_LOOP: &str = "main-loop";

impl IoThreads {
    /// A registry that knows the iothread ids `ids` (the machine's
    /// `-object iothread` objects) and has started none of them yet.
    pub fn new(ids: &[String]) -> Self {
        IoThreads {
            ids: ids.to_vec(),
            loops: BTreeMap::new(),
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
        let l = EventLoop::new(name)?;
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
}
