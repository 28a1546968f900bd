//! QMP's asynchronous events (qapi/qmp-spec.rst, "Asynchronous events"):
//! every client that has finished capabilities negotiation gets each event,
//! in order with its responses, stamped with the host's wall-clock time.
//!
//! Each client has an outbound queue drained by its own writer thread, so
//! whoever emits an event (the main loop, a device thread, an I/O thread)
//! never blocks on a slow or stuck client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use devices::bus::lock;
use serde_json::Value;

/// What a client's writer thread is given.
pub enum Out {
    /// Text to send as it is (JSON messages end in CR LF).
    Line(String),
    /// Answer when everything before this has been written.
    Flush(mpsc::Sender<()>),
}

/// How many messages a client's queue holds. A client that lets this many
/// pile up unread (it stopped reading, and its socket buffer is full) is
/// dropped, so a stuck client cannot make Strata buffer without bound.
pub const QUEUE_LEN: usize = 4096;

/// A client's outbound queue.
pub type OutQueue = mpsc::SyncSender<Out>;

/// A new client queue and its receiving end.
pub fn queue() -> (OutQueue, mpsc::Receiver<Out>) {
    mpsc::sync_channel(QUEUE_LEN)
}

/// The clients that receive events.
#[derive(Default)]
pub struct Events {
    clients: Mutex<Vec<(u64, OutQueue)>>,
    next: AtomicU64,
}

impl Events {
    /// Adds a client's queue; events go to it from now on.
    pub fn subscribe(&self, out: OutQueue) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.clients).push((id, out));
        id
    }

    pub fn unsubscribe(&self, id: u64) {
        lock(&self.clients).retain(|(i, _)| *i != id);
    }

    /// Sends `event` with `data` (omitted when `None`) to every client.
    pub fn emit(&self, event: &str, data: Option<Value>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut v = serde_json::json!({
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
            "event": event,
        });
        if let Some(d) = data {
            v["data"] = d;
        }
        log::debug!("QMP event {v}");
        let text = format!("{v}\r\n");
        // Never blocks: a full queue drops the client (see QUEUE_LEN).
        lock(&self.clients).retain(|(_, tx)| tx.try_send(Out::Line(text.clone())).is_ok());
    }

    /// Waits (up to `timeout` in all) until every client's queue has been
    /// written: the last response and event reach clients before exit.
    pub fn flush(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let acks: Vec<_> = lock(&self.clients)
            .iter()
            .filter_map(|(_, tx)| {
                let (atx, arx) = mpsc::channel();
                tx.try_send(Out::Flush(atx)).ok().map(|_| arx)
            })
            .collect();
        for a in acks {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let _ = a.recv_timeout(left);
        }
    }
}
