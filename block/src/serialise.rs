//! Serialising writes (QEMU's "serialising requests"): a write that
//! reads before it writes must not interleave with other writes to the
//! same bytes.
//!
//! The case is a file opened with O_DIRECT whose alignment is above one
//! byte. A write that does not cover whole alignment units reads its head
//! and tail units, merges the guest's bytes in and writes the units back
//! whole. Another write into those units between that read and that
//! write would be lost: the merge writes back the bytes it read. So such
//! a read-modify-write waits until no write overlapping its units is in
//! flight, and every write overlapping it waits until it is done. Writes
//! that cover whole units do not wait for each other, as without
//! O_DIRECT.
//!
//! Holders are [`InFlight`] guards: a synchronous writer blocks in
//! [`WriteRanges::begin`]; an asynchronous submitter that must not block
//! asks [`WriteRanges::try_begin`] and, when refused, hands the request to
//! a worker thread that may.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    next: u64,
    /// (id, start, end, serialising) of every write in flight.
    held: Vec<(u64, u64, u64, bool)>,
}

/// The writes in flight on one file, by the byte ranges they cover.
#[derive(Default)]
pub struct WriteRanges {
    st: Mutex<State>,
    cv: Condvar,
}

/// A write in flight on `[start, end)`; dropping it ends it.
pub struct InFlight {
    ranges: Arc<WriteRanges>,
    id: u64,
}

impl WriteRanges {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conflicts(st: &State, start: u64, end: u64, serialising: bool) -> bool {
        st.held
            .iter()
            .any(|&(_, s, e, ser)| (ser || serialising) && s < end && start < e)
    }

    fn hold(self: &Arc<Self>, st: &mut State, start: u64, end: u64, ser: bool) -> InFlight {
        let id = st.next;
        st.next += 1;
        st.held.push((id, start, end, ser));
        InFlight {
            ranges: self.clone(),
            id,
        }
    }

    /// Starts a write on `[start, end)` (whole alignment units), waiting
    /// for the writes it must not interleave with: a `serialising` one
    /// waits for every overlapping write, any write for an overlapping
    /// serialising one.
    pub fn begin(self: &Arc<Self>, start: u64, end: u64, serialising: bool) -> InFlight {
        let mut st = self.lock();
        while Self::conflicts(&st, start, end, serialising) {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        self.hold(&mut st, start, end, serialising)
    }

    /// Starts a write on `[start, end)` that does not serialise, unless
    /// it would have to wait.
    pub fn try_begin(self: &Arc<Self>, start: u64, end: u64) -> Option<InFlight> {
        let mut st = self.lock();
        if Self::conflicts(&st, start, end, false) {
            return None;
        }
        Some(self.hold(&mut st, start, end, false))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut st = self.ranges.lock();
        st.held.retain(|h| h.0 != self.id);
        drop(st);
        self.ranges.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn plain_writes_overlap_but_not_a_serialising_one() {
        let r = Arc::new(WriteRanges::default());
        let a = r.begin(0, 4096, false);
        let b = r.try_begin(0, 4096).expect("plain writes do not wait");
        drop((a, b));
        let rmw = r.begin(0, 4096, true);
        assert!(r.try_begin(4096, 8192).is_some(), "no overlap");
        assert!(r.try_begin(512, 1024).is_none(), "overlaps the RMW");
        // A blocked writer goes on once the RMW ends.
        let (tx, rx) = mpsc::channel();
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            let _g = r2.begin(0, 512, false);
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(rmw);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_serialising_write_waits_for_plain_ones() {
        let r = Arc::new(WriteRanges::default());
        let plain = r.try_begin(0, 4096).unwrap();
        let (tx, rx) = mpsc::channel();
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            let _g = r2.begin(1024, 2048, true);
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(plain);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        t.join().unwrap();
    }
}
