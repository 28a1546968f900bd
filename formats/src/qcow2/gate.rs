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

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

#[derive(Default)]
struct State {
    epoch: u64,
    /// Live tickets per epoch, oldest first; no entry at the front has a
    /// zero count (later ones may, until they reach the front).
    inflight: VecDeque<(u64, usize)>,
}

impl State {
    fn idle(&self) -> bool {
        self.inflight.is_empty()
    }
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
        match s.inflight.back_mut() {
            Some((e, n)) if *e == epoch => *n += 1,
            _ => s.inflight.push_back((epoch, 1)),
        }
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
        self.state().inflight.front().map(|&(e, _)| e)
    }

    /// Wait until no ticket is live.
    pub fn wait_idle(&self) {
        let mut s = self.state();
        while !s.idle() {
            s = self.idle.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.gate.state();
        if let Some((_, n)) = s.inflight.iter_mut().find(|(e, _)| *e == self.epoch) {
            *n = n.saturating_sub(1);
        }
        while s.inflight.front().is_some_and(|&(_, n)| n == 0) {
            s.inflight.pop_front();
        }
        if s.idle() {
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
