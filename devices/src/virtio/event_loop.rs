//! An event loop thread (`event-manager`): what QEMU calls an iothread.
//!
//! Device queue handlers are subscribers: they watch their queues'
//! notification eventfds and their block completion eventfd, and run
//! entirely on this thread. The loop is steered from other threads (the
//! vCPU that sets DRIVER_OK or resets the device) through the
//! event-manager's remote endpoint.

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
