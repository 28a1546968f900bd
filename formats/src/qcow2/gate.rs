//! In-flight I/O tracking for a qcow2 image: why a host cluster that is
//! freed can be reused safely while data I/O runs without the metadata lock.
//!
//! Every data read or write that runs outside the metadata lock holds a
//! [`Ticket`], taken under the lock when the request was mapped. Tickets are
//! stamped with the current *epoch*. When a flush has made the L2 changes
//! that dropped references durable, the freed clusters are stamped with the
//! epoch at that moment and the epoch advances ([`Gate::bump`]); a cluster
//! goes back to the allocator only once no ticket of that epoch or an older
//! one is left ([`Gate::oldest`]), because only those requests could have
//! mapped it. A ticket is `Send`, so an asynchronous request can carry it to
//! its completion on another thread; nothing ever blocks on a ticket except
//! [`Gate::wait_idle`] (operations that need the image to themselves, such
//! as snapshots, check and close).

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

#[derive(Default)]
struct State {
    epoch: u64,
    /// Live tickets per epoch.
    inflight: BTreeMap<u64, usize>,
}

/// The tracker shared by an image and its tickets.
#[derive(Default)]
pub struct Gate {
    st: Mutex<State>,
    idle: Condvar,
}

/// Proof that a request's mapping is still valid: held until its data I/O
/// is done.
pub struct Ticket {
    gate: Arc<Gate>,
    epoch: u64,
}

impl Gate {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket of the current epoch. Call with the metadata lock held,
    /// right after mapping.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        let mut s = self.state();
        let epoch = s.epoch;
        *s.inflight.entry(epoch).or_insert(0) += 1;
        Ticket {
            gate: self.clone(),
            epoch,
        }
    }

    /// Close the current epoch and return it.
    pub fn bump(&self) -> u64 {
        let mut s = self.state();
        let e = s.epoch;
        s.epoch += 1;
        e
    }

    /// The epoch of the oldest live ticket, if any.
    pub fn oldest(&self) -> Option<u64> {
        self.state().inflight.keys().next().copied()
    }

    /// Wait until no ticket is live.
    pub fn wait_idle(&self) {
        let mut s = self.state();
        while !s.inflight.is_empty() {
            s = self.idle.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.gate.state();
        if let Some(n) = s.inflight.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                s.inflight.remove(&self.epoch);
            }
        }
        if s.inflight.is_empty() {
            self.gate.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_track_the_oldest_ticket() {
        let g = Arc::new(Gate::default());
        assert_eq!(g.oldest(), None);
        let a = g.ticket();
        assert_eq!(g.bump(), 0);
        let b = g.ticket();
        assert_eq!(g.oldest(), Some(0));
        drop(a);
        assert_eq!(g.oldest(), Some(1));
        let h = std::thread::spawn({
            let g = g.clone();
            move || g.wait_idle()
        });
        drop(b);
        h.join().unwrap();
        assert_eq!(g.oldest(), None);
    }
}
