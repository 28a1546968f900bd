//! The queue side of a virtio device, shared by every device type: an
//! event-loop subscriber ([`QueueWorker`]) that pops available chains,
//! hands them to a device-specific [`QueueHandler`], collects the
//! completions of the asynchronous work the handler started, puts used
//! entries in the rings and interrupts the driver at most once per batch.
//!
//! Per notification of a queue the worker pops every available chain and
//! lets the handler start each one (virtio 1.2, section 2.7.13); with
//! RING_EVENT_IDX it disables notifications while it pops and, when it
//! enables them again, goes round once more if the driver added chains
//! meanwhile (2.7.10). Then the handler may send what it held back
//! ([`QueueHandler::end_pass`], for request merging), and the worker
//! completes what has finished and checks, per queue that got used
//! entries, whether the driver wants an interrupt.
//!
//! Completions travel through a [`Completer`]: the handler gets one per
//! request it starts asynchronously and moves it into the completion
//! callback (of the block layer, for example), which may run on any
//! thread, or inside the submission itself. Completions that arrive while
//! the worker is busy with the queues are picked up at the end of that
//! pass with no system call; others wake the worker through an eventfd.
//!
//! A driver can break a queue (an available index more than the queue
//! size ahead of the device's, or rings the device cannot read). The
//! worker then stops processing that queue until the device is reset,
//! and says so once in the log, rather than spinning on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use block::aio::RingHost;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;

use super::chain::ChainHead;
use super::event_loop::{add_poller, Poller};
use super::{Activation, ActiveQueue, VirtioInterrupt};
use crate::GuestMem;

/// What a device does with the chains of its queues.
pub trait QueueHandler: Send + 'static {
    /// What asynchronous work reports when it is done (for a block
    /// device, the block layer's result).
    type Output: Send + 'static;
    /// What the worker keeps for a request while it is in flight, and
    /// hands back with its output (for virtio-blk, the status byte's
    /// address and the used length).
    type Token: Send + 'static;
    /// The device's name in log messages ("virtio-blk").
    const NAME: &'static str;

    /// Starts the chain at `at`, popped from queue `queue` (its position in
    /// the activation's list). The handler either ends the request at once
    /// with [`QueueIo::finish`] (a malformed chain, a request answered
    /// without I/O), or starts asynchronous work with [`QueueIo::submit`]
    /// and moves the returned [`Completer`] into the work's completion.
    /// It must not leave the chain without either: the driver would wait
    /// for it forever.
    fn start(&mut self, io: &mut QueueIo<Self::Output, Self::Token>, queue: usize, at: ChainHead);

    /// Every chain available at the notification has been started (also
    /// called before a reset waits for the requests in flight). A handler
    /// that held requests back to merge them submits them now.
    fn end_pass(&mut self, _io: &mut QueueIo<Self::Output, Self::Token>) {}

    /// Asynchronous work of `req` finished with `out`: end the request
    /// ([`QueueIo::finish`]) or start more work for it.
    fn complete(
        &mut self,
        io: &mut QueueIo<Self::Output, Self::Token>,
        req: InFlight<Self::Token>,
        out: Self::Output,
    );

    /// Work of `req` finished while the device is being reset: the queue
    /// is going away and gets no used entry; the handler may still leave
    /// an error in the request's buffers.
    fn abandon(&mut self, _mem: &GuestMem, _req: InFlight<Self::Token>, _out: Self::Output) {}
}

/// A request the worker is waiting for.
#[derive(Debug)]
pub struct InFlight<T> {
    /// The queue's position in the activation's list.
    pub queue: usize,
    /// The chain's head index, for the used ring.
    pub head: u16,
    pub token: T,
}

/// Outputs of asynchronous work, on their way back to the worker.
struct Completions<O> {
    items: Mutex<Vec<(usize, O)>>,
    /// The worker's wake-up: an eventfd that completions from other
    /// threads write, and that io_uring rings the worker submits to signal
    /// themselves, so their completions run here, on the worker's thread.
    host: Arc<RingHost>,
    /// The worker is in a pass and will look at `items` before it ends:
    /// no need to wake it.
    in_pass: AtomicBool,
}

impl<O> Completions<O> {
    /// Wakes the worker unless it is going to look anyway.
    fn kick(&self) {
        // Pairs with the stores in `process_completions`: either the
        // worker sees the item in its last look, or we see the flag clear.
        if !self.in_pass.load(Ordering::SeqCst) {
            self.host.wake();
        }
    }

    fn take(&self, into: &mut Vec<(usize, O)>) {
        into.clear();
        std::mem::swap(&mut *crate::bus::lock(&self.items), into);
    }
}

/// Completes one request started with [`QueueIo::submit`]; `Send`, so it
/// can travel to whatever thread finishes the work. Each must be
/// completed exactly once: a dropped `Completer` leaves its request in
/// flight, and a reset would wait for it forever.
#[must_use = "a request whose Completer is dropped never completes"]
pub struct Completer<O> {
    cq: Arc<Completions<O>>,
    slot: usize,
}

impl<O> Completer<O> {
    /// Hands `out` back to the worker.
    pub fn complete(self, out: O) {
        crate::bus::lock(&self.cq.items).push((self.slot, out));
        self.cq.kick();
    }

    /// Completes several requests with the same output (one piece of work
    /// that stood for all of them, such as merged reads), with one lock.
    pub fn complete_all(all: Vec<Completer<O>>, out: O)
    where
        O: Clone,
    {
        let Some(first) = all.first() else {
            return;
        };
        let cq = first.cq.clone();
        let mut others = Vec::new();
        {
            let mut items = crate::bus::lock(&cq.items);
            for c in all {
                if Arc::ptr_eq(&c.cq, &cq) {
                    items.push((c.slot, out.clone()));
                } else {
                    others.push(c);
                }
            }
        }
        cq.kick();
        for c in others {
            c.complete(out.clone());
        }
    }
}

/// The worker's state that a [`QueueHandler`] works with: guest memory,
/// the rings, the requests in flight.
pub struct QueueIo<O, T> {
    /// Shared with the requests in flight, whose buffers point into it.
    mem: Arc<GuestMem>,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    cq: Arc<Completions<O>>,
    inflight: Vec<Option<InFlight<T>>>,
    free: Vec<usize>,
    busy: usize,
    /// Queues with new used entries since the last interrupt check.
    dirty: Vec<bool>,
    name: &'static str,
}

impl<O, T> QueueIo<O, T> {
    /// Guest memory.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// Guest memory as a shared handle, for buffers that outlive this
    /// call ([`crate::dma::GuestSgList::to_iovecs`]).
    pub fn mem_arc(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// Ends the request of chain `head` on queue `queue`: a used entry of
    /// `used_len` bytes (what the device wrote into the chain's buffers).
    /// The interrupt, if the driver wants one, comes at the end of the
    /// batch.
    pub fn finish(&mut self, queue: usize, head: u16, used_len: u32) {
        let Some(aq) = self.queues.get_mut(queue) else {
            return;
        };
        if let Err(e) = aq.queue.add_used(&*self.mem, head, used_len) {
            log::warn!("{}: cannot add a used entry: {e}", self.name);
        }
        self.dirty[queue] = true;
    }

    /// Registers the request of chain `head` on queue `queue` as in
    /// flight, keeping `token` for its completion, and returns the
    /// [`Completer`] its asynchronous work must complete.
    pub fn submit(&mut self, queue: usize, head: u16, token: T) -> Completer<O> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.inflight.push(None);
                self.inflight.len() - 1
            }
        };
        self.inflight[slot] = Some(InFlight { queue, head, token });
        self.busy += 1;
        Completer {
            cq: self.cq.clone(),
            slot,
        }
    }

    /// Requests submitted and not completed.
    pub fn in_flight(&self) -> usize {
        self.busy
    }

    /// The device's index of the queue at position `queue` of the
    /// activation's list (which holds only the queues the driver enabled).
    pub fn queue_index(&self, queue: usize) -> Option<u16> {
        self.queues.get(queue).map(|q| q.index)
    }

    fn signal(&mut self) {
        for (qi, aq) in self.queues.iter_mut().enumerate() {
            if !std::mem::take(&mut self.dirty[qi]) {
                continue;
            }
            if aq.queue.needs_notification(&*self.mem).unwrap_or(true) {
                self.interrupt.signal_queue(aq.index);
            }
        }
    }
}

/// Event-loop token for the completion eventfd (queues use their
/// position in the list).
const COMPLETION_TOKEN: u32 = u32::MAX;

/// Runs the queues of one activated device with handler `H`. It is an
/// event-manager subscriber ([`super::event_loop::EventLoop::add`]), but
/// its methods can also be driven directly (tests, the benchmark).
pub struct QueueWorker<H: QueueHandler> {
    io: QueueIo<H::Output, H::Token>,
    handler: H,
    done: Vec<(usize, H::Output)>,
    /// Queues the driver broke; not processed until the device is reset.
    stopped: Vec<bool>,
    /// Per queue, the driver's available index as last read: heads up to
    /// it are popped without reading it again.
    avail_seen: Vec<u16>,
    /// What a polling loop looks at, per queue.
    polls: Vec<Arc<QueuePoll>>,
    /// Set by a device that stops rather than resets: the requests still
    /// in flight when the worker drains then end in the used ring, as if
    /// the worker had run until they completed (a vhost-user frontend
    /// stopping a ring expects every request it was handed to be answered
    /// before it learns where to resume).
    complete_on_drain: Arc<std::sync::atomic::AtomicBool>,
}

/// VRING_USED_F_NO_NOTIFY (virtio 1.2, section 2.7.10).
const USED_F_NO_NOTIFY: u16 = 1;

/// A queue as its polling loop sees it ([`Poller`]): its available index
/// against the worker's, and the switch for the driver's notifications.
struct QueuePoll {
    mem: Arc<GuestMem>,
    avail_idx: GuestAddress,
    used_flags: GuestAddress,
    /// `avail_event` (after the used ring), with RING_EVENT_IDX.
    avail_event: Option<GuestAddress>,
    notify: Arc<super::Notifier>,
    host: Arc<RingHost>,
    /// The worker's next available index, and whether the queue is
    /// still served (not once it is stopped or the worker drains: its
    /// rings may then be the driver's again).
    state: Mutex<(u16, bool)>,
}

impl Poller for QueuePoll {
    fn poll(&self) -> bool {
        {
            let st = crate::bus::lock(&self.state);
            if !st.1 {
                return false;
            }
            let idx: u16 = match self.mem.load(self.avail_idx, Ordering::Acquire) {
                Ok(i) => i,
                Err(_) => return false,
            };
            if idx != st.0 {
                let _ = self.notify.write(1);
                return true;
            }
        }
        if self.host.ready() {
            self.host.wake();
            return true;
        }
        false
    }

    fn set_notifications(&self, on: bool) {
        let st = crate::bus::lock(&self.state);
        if !st.1 {
            return;
        }
        // Only the device writes these fields.
        let _ = match self.avail_event {
            // An event index already behind the driver: no kick until it
            // is set to the worker's index again.
            Some(a) => self.mem.store(
                if on { st.0 } else { st.0.wrapping_sub(1) },
                a,
                Ordering::Release,
            ),
            None => self.mem.store(
                if on { 0u16 } else { USED_F_NO_NOTIFY },
                self.used_flags,
                Ordering::Release,
            ),
        };
    }
}

impl<H: QueueHandler> QueueWorker<H> {
    /// A worker for the queues of `a`.
    pub fn with_handler(a: Activation, handler: H) -> Result<Self, String> {
        let cq = Arc::new(Completions {
            items: Mutex::new(Vec::new()),
            host: RingHost::new().map_err(|e| format!("eventfd: {e}"))?,
            in_pass: AtomicBool::new(false),
        });
        let n = a.queues.len();
        // Nothing announced yet beyond where each queue starts.
        let a_next_avail = a.queues.iter().map(|q| q.queue.next_avail()).collect();
        Ok(QueueWorker {
            io: QueueIo {
                mem: Arc::new(a.mem),
                queues: a.queues,
                interrupt: a.interrupt,
                cq,
                inflight: Vec::new(),
                free: Vec::new(),
                busy: 0,
                dirty: vec![false; n],
                name: H::NAME,
            },
            handler,
            complete_on_drain: Default::default(),
            done: Vec::new(),
            stopped: vec![false; n],
            avail_seen: a_next_avail,
            polls: Vec::new(),
        })
    }

    /// Tells the pollers how far the worker got in queue `qi`.
    fn publish(&self, qi: usize) {
        if let (Some(p), Some(aq)) = (self.polls.get(qi), self.io.queues.get(qi)) {
            let mut st = crate::bus::lock(&p.state);
            st.0 = aq.queue.next_avail();
            st.1 = !self.stopped[qi];
        }
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The switch that makes [`Self::drain`] complete the requests in
    /// flight instead of abandoning them.
    pub fn complete_on_drain(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.complete_on_drain.clone()
    }

    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// Requests submitted and not completed.
    pub fn in_flight(&self) -> usize {
        self.io.busy
    }

    /// True once queue `qi` was stopped because the driver broke it.
    pub fn is_stopped(&self, qi: usize) -> bool {
        self.stopped.get(qi).copied().unwrap_or(false)
    }

    /// Handles a notification of queue `qi` (its position in the list):
    /// starts every available chain, then completes what has finished.
    pub fn process_queue(&mut self, qi: usize) {
        let Some(aq) = self.io.queues.get(qi) else {
            return;
        };
        if self.stopped[qi] {
            return;
        }
        // Completions during this pass are collected at its end, without
        // an eventfd round trip.
        self.io.cq.in_pass.store(true, Ordering::SeqCst);
        // The requests of this notification reach the kernel together, in
        // one io_uring_enter per ring, when the plug is dropped.
        let plug = self.io.cq.host.enter();
        let (table, size) = (GuestAddress(aq.queue.desc_table()), aq.queue.size());
        let event_idx = aq.queue.event_idx_enabled();
        let mut empty_rounds = 0;
        loop {
            if event_idx {
                let _ = self.io.queues[qi].queue.disable_notification(&*self.io.mem);
            }
            let mut popped = 0usize;
            loop {
                match self.pop(qi) {
                    Ok(Some(head)) => {
                        popped += 1;
                        let at = ChainHead { table, size, head };
                        self.handler.start(&mut self.io, qi, at);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.stop(qi, &e);
                        break;
                    }
                }
            }
            // With EVENT_IDX, re-enabling tells us whether the driver added
            // more meanwhile (section 2.7.10); go round again if so.
            if !event_idx || self.stopped[qi] {
                break;
            }
            match self.io.queues[qi].queue.enable_notification(&*self.io.mem) {
                Ok(true) => {}
                _ => break,
            }
            // More is available, but this round found nothing: the driver
            // published between our two looks, and the next round finds
            // it. Twice in a row, the ring cannot be read: stop rather
            // than spin.
            empty_rounds = if popped == 0 { empty_rounds + 1 } else { 0 };
            if empty_rounds == 2 {
                self.stop(qi, &"the available ring does not advance");
                break;
            }
        }
        self.handler.end_pass(&mut self.io);
        drop(plug);
        self.publish(qi);
        self.process_completions();
    }

    /// Runs the completions io_uring has posted for this worker's
    /// requests (reads of tmpfs or the page cache complete inside the
    /// submission): they are finished in the same pass, with no wake-up.
    fn reap_rings(&mut self) {
        let host = &self.io.cq.host;
        if !host.has_rings() {
            return;
        }
        loop {
            host.clear();
            // Requests that the completions start go out together too.
            let n = {
                let _g = host.enter();
                host.reap()
            };
            if n == 0 {
                break;
            }
        }
    }

    /// The next available head of queue `qi`, with the queue's own errors
    /// (`pop_descriptor_chain` turns them into `None`, which looks like an
    /// empty ring while the available index says otherwise).
    ///
    /// The driver's available index is read again only once the heads it
    /// announced last time are all popped (virtio-queue's `iter` reads it
    /// for every head), with `iter`'s checks: the queue is ready, and the
    /// index is at most the queue size ahead. A head that cannot be read
    /// is `None`, as `iter` has it. Both loads are vm-memory's (atomic,
    /// Acquire) with one region lookup.
    fn pop(&mut self, qi: usize) -> Result<Option<u16>, virtio_queue::Error> {
        use virtio_queue::Error;
        let mem: &GuestMem = &self.io.mem;
        let q = &mut self.io.queues[qi].queue;
        let next = q.next_avail();
        if next == self.avail_seen[qi] {
            if !q.ready() || q.avail_ring() == 0 {
                return Err(Error::QueueNotReady);
            }
            let at = q
                .avail_ring()
                .checked_add(2)
                .ok_or(Error::AddressOverflow)?;
            let idx = crate::dma::load_ram_u16(mem, GuestAddress(at), Ordering::Acquire)
                .map(u16::from_le)
                .ok_or(Error::GuestMemory(
                    vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(at)),
                ))?;
            if idx.wrapping_sub(next) > q.size() {
                return Err(Error::InvalidAvailRingIndex);
            }
            self.avail_seen[qi] = idx;
            if idx == next {
                return Ok(None);
            }
        }
        // The entries up to the index were published before it (the
        // Acquire load above); loaded as virtio-queue does.
        let Some(at) = q
            .avail_ring()
            .checked_add(4 + 2 * u64::from(next % q.size()))
        else {
            return Ok(None);
        };
        let Some(head) = crate::dma::load_ram_u16(mem, GuestAddress(at), Ordering::Acquire) else {
            return Ok(None);
        };
        q.set_next_avail(next.wrapping_add(1));
        Ok(Some(u16::from_le(head)))
    }

    fn stop(&mut self, qi: usize, why: &dyn std::fmt::Display) {
        self.stopped[qi] = true;
        log::error!(
            "{}: queue {} stopped until the device is reset: {why}",
            H::NAME,
            self.io.queues[qi].index
        );
    }

    /// Completes every request whose work has finished, then signals the
    /// queues that got used entries.
    pub fn process_completions(&mut self) {
        self.io.cq.in_pass.store(true, Ordering::SeqCst);
        self.reap_rings();
        self.complete_taken();
        // From here on a completion kicks the eventfd; anything that
        // slipped in before is picked up by this last look.
        self.io.cq.in_pass.store(false, Ordering::SeqCst);
        self.complete_taken();
        self.io.signal();
    }

    fn complete_taken(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        self.io.cq.take(&mut done);
        for (slot, out) in done.drain(..) {
            let Some(req) = self.io.inflight.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.io.free.push(slot);
            self.io.busy -= 1;
            self.handler.complete(&mut self.io, req, out);
        }
        self.done = done;
    }

    /// Waits until every submitted request has completed (reset,
    /// teardown); they end with [`QueueHandler::abandon`], not in the
    /// used ring, unless [`Self::complete_on_drain`] was switched on.
    pub fn drain(&mut self) {
        for p in &self.polls {
            crate::bus::lock(&p.state).1 = false;
        }
        // The rings this worker reaped go back to their reaper threads,
        // which complete what is still in flight.
        self.io.cq.host.release();
        // Held requests count as in flight: send them, or this never ends.
        self.handler.end_pass(&mut self.io);
        let graceful = self.complete_on_drain.load(Ordering::SeqCst);
        let mut done = Vec::new();
        while self.io.busy > 0 {
            self.io.cq.take(&mut done);
            if done.is_empty() {
                // Only reached on reset or teardown: a short sleep between
                // looks keeps the fast path free of condition variables.
                std::thread::sleep(std::time::Duration::from_micros(200));
                continue;
            }
            for (slot, out) in done.drain(..) {
                if let Some(req) = self.io.inflight.get_mut(slot).and_then(Option::take) {
                    self.io.busy -= 1;
                    self.io.free.push(slot);
                    if graceful {
                        self.handler.complete(&mut self.io, req, out);
                    } else {
                        self.handler.abandon(&self.io.mem, req, out);
                    }
                }
            }
        }
        if graceful {
            self.io.signal();
        }
    }
}

impl<H: QueueHandler> Drop for QueueWorker<H> {
    fn drop(&mut self) {
        // Guest buffers are in use by asynchronous work until then.
        self.drain();
    }
}

impl<H: QueueHandler> MutEventSubscriber for QueueWorker<H> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let token = events.data();
        if token == COMPLETION_TOKEN {
            if !self.io.cq.host.has_rings() {
                // Otherwise the reaping consumes the wake-ups.
                self.io.cq.host.clear();
            }
            self.process_completions();
            return;
        }
        let qi = token as usize;
        if let Some(aq) = self.io.queues.get(qi) {
            // Read even for a stopped queue: the eventfd would stay ready.
            let _ = aq.notify.read();
            self.process_queue(qi);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // The loop may spin on the queues before it sleeps.
        for aq in &self.io.queues {
            let (avail, used) = (aq.queue.avail_ring(), aq.queue.used_ring());
            let p = Arc::new(QueuePoll {
                mem: self.io.mem.clone(),
                avail_idx: GuestAddress(avail.wrapping_add(2)),
                used_flags: GuestAddress(used),
                avail_event: aq
                    .queue
                    .event_idx_enabled()
                    .then(|| GuestAddress(used.wrapping_add(4 + 8 * u64::from(aq.queue.size())))),
                notify: aq.notify.clone(),
                host: self.io.cq.host.clone(),
                state: Mutex::new((aq.queue.next_avail(), true)),
            });
            let w: std::sync::Weak<dyn Poller> = Arc::downgrade(&p) as _;
            add_poller(w);
            self.polls.push(p);
        }
        for (i, q) in self.io.queues.iter().enumerate() {
            let ev = Events::with_data(q.notify.as_ref(), i as u32, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                log::error!("{}: cannot watch queue {i}: {e}", H::NAME);
            }
        }
        let ev = Events::with_data(self.io.cq.host.as_ref(), COMPLETION_TOKEN, EventSet::IN);
        if let Err(e) = ops.add(ev) {
            log::error!("{}: cannot watch completions: {e}", H::NAME);
        }
        // Notifications that arrived before the worker existed.
        for i in 0..self.io.queues.len() {
            if self.io.queues[i].notify.read().is_ok() {
                self.process_queue(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::Chain;
    use crate::virtio::testing::{chain, mem, TABLE};
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;
    use virtio_queue::Queue;
    use vm_memory::Bytes;

    const QSIZE: u16 = 16;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    #[derive(Default)]
    struct Count(AtomicU64);
    impl VirtioInterrupt for Count {
        fn signal_queue(&self, _: u16) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn signal_config(&self) {}
    }
    impl Count {
        fn get(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn activation(m: &GuestMem, event_idx: bool, avail: u64) -> (Activation, Arc<Count>) {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        let irq = Arc::new(Count::default());
        let a = Activation {
            mem: m.clone(),
            features: 0,
            queues: vec![ActiveQueue {
                index: 0,
                queue: q,
                notify: Arc::new(crate::virtio::Notifier::new().unwrap()),
            }],
            interrupt: irq.clone(),
        };
        (a, irq)
    }

    /// Chain `k` (descriptor 2k, 2k+1): 16 readable bytes, then `8 + k`
    /// writable ones; posts heads for chains `0..n`.
    fn post(m: &GuestMem, n: u16) {
        for k in 0..n {
            let base = 0x10000 + 0x1000 * k as u64;
            chain(
                m,
                TABLE,
                2 * k,
                &[(base, 16, false), (base + 0x100, 8 + k as u32, true)],
            );
            m.write_obj(2 * k, GuestAddress(AVAIL + 4 + 2 * k as u64))
                .unwrap();
        }
        m.write_obj(n, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_idx(m: &GuestMem) -> u16 {
        m.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used(m: &GuestMem, i: u16) -> (u32, u32) {
        let e = GuestAddress(USED + 4 + 8 * i as u64);
        (
            m.read_obj(e).unwrap(),
            m.read_obj(GuestAddress(e.0 + 4)).unwrap(),
        )
    }

    /// Answers every chain at once with its writable length.
    #[derive(Default)]
    struct Echo {
        chain: Chain,
        started: usize,
    }
    impl QueueHandler for Echo {
        type Output = ();
        type Token = ();
        const NAME: &'static str = "echo";
        fn start(&mut self, io: &mut QueueIo<(), ()>, queue: usize, at: ChainHead) {
            self.started += 1;
            let len = match self.chain.walk(io.mem(), at, false) {
                Ok(()) => self.chain.writable_len() as u32,
                Err(_) => 0,
            };
            io.finish(queue, at.head, len);
        }
        fn complete(&mut self, _: &mut QueueIo<(), ()>, _: InFlight<()>, _: ()) {}
    }

    #[test]
    fn pops_every_chain_and_signals_once_per_batch() {
        let m = mem();
        let (a, irq) = activation(&m, false, AVAIL);
        let mut w = QueueWorker::with_handler(a, Echo::default()).unwrap();
        post(&m, 3);
        w.process_queue(0);
        assert_eq!(w.handler().started, 3);
        assert_eq!(used_idx(&m), 3);
        assert_eq!(used(&m, 0), (0, 8));
        assert_eq!(used(&m, 2), (4, 10));
        assert_eq!(irq.get(), 1, "one interrupt for the batch");
        // Nothing new: no interrupt.
        w.process_queue(0);
        assert_eq!(irq.get(), 1);
    }

    #[test]
    fn event_idx_interrupts_only_when_the_driver_asks() {
        let m = mem();
        let (a, irq) = activation(&m, true, AVAIL);
        let mut w = QueueWorker::with_handler(a, Echo::default()).unwrap();
        // used_event (after the available ring): interrupt once the
        // used index passes 5.
        let used_event = GuestAddress(AVAIL + 4 + 2 * QSIZE as u64);
        m.write_obj(5u16, used_event).unwrap();
        post(&m, 3);
        w.process_queue(0);
        assert_eq!(used_idx(&m), 3);
        assert_eq!(irq.get(), 0, "used_event not reached");
        // The device published avail_event (after the used ring) so the
        // driver knows when to notify.
        let avail_event: u16 = m
            .read_obj(GuestAddress(USED + 4 + 8 * QSIZE as u64))
            .unwrap();
        assert_eq!(avail_event, 3);
        // "Interrupt me after used entry 3."
        m.write_obj(3u16, used_event).unwrap();
        post(&m, 4);
        w.process_queue(0);
        assert_eq!(used_idx(&m), 4);
        assert_eq!(irq.get(), 1);
    }

    /// Runs `f` on another thread and fails (instead of hanging) if it
    /// does not return within 10 s.
    fn within_10s<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the worker loops forever")
    }

    #[test]
    fn an_invalid_avail_index_stops_the_queue_instead_of_looping() {
        for event_idx in [true, false] {
            let m = mem();
            let (a, irq) = activation(&m, event_idx, AVAIL);
            let mut w = QueueWorker::with_handler(a, Echo::default()).unwrap();
            post(&m, 2);
            // More than the queue size ahead of what the device has seen.
            m.write_obj(QSIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
            let w = within_10s(move || {
                w.process_queue(0);
                w.process_queue(0);
                w
            });
            assert!(w.is_stopped(0), "event_idx {event_idx}");
            assert_eq!(w.handler().started, 0);
            assert_eq!((used_idx(&m), irq.get()), (0, 0));
        }
    }

    #[test]
    fn an_unreadable_avail_ring_stops_the_queue_instead_of_looping() {
        // virtio-queue refuses an available ring at address 0 (as "not
        // ready") while the index there still says chains are waiting.
        let m = mem();
        let (a, _irq) = activation(&m, true, 0);
        let mut w = QueueWorker::with_handler(a, Echo::default()).unwrap();
        m.write_obj(1u16, GuestAddress(2)).unwrap();
        let w = within_10s(move || {
            w.process_queue(0);
            w
        });
        assert!(w.is_stopped(0));
        assert_eq!(w.handler().started, 0);
    }

    /// Leaves every chain in flight; the test completes them.
    struct Async {
        completers: Arc<Mutex<Vec<Completer<u32>>>>,
        abandoned: Arc<AtomicU64>,
    }
    impl QueueHandler for Async {
        type Output = u32;
        type Token = u16;
        const NAME: &'static str = "async";
        fn start(&mut self, io: &mut QueueIo<u32, u16>, queue: usize, at: ChainHead) {
            let c = io.submit(queue, at.head, at.head);
            self.completers.lock().unwrap().push(c);
        }
        fn complete(&mut self, io: &mut QueueIo<u32, u16>, req: InFlight<u16>, out: u32) {
            assert_eq!(req.head, req.token);
            io.finish(req.queue, req.head, out);
        }
        fn abandon(&mut self, _: &GuestMem, _: InFlight<u16>, _: u32) {
            self.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn completions_come_back_from_other_threads_and_reset_waits_for_them() {
        let m = mem();
        let (a, irq) = activation(&m, false, AVAIL);
        let completers = Arc::new(Mutex::new(Vec::new()));
        let abandoned = Arc::new(AtomicU64::new(0));
        let h = Async {
            completers: completers.clone(),
            abandoned: abandoned.clone(),
        };
        let mut w = QueueWorker::with_handler(a, h).unwrap();
        post(&m, 3);
        w.process_queue(0);
        assert_eq!(w.in_flight(), 3);
        assert_eq!((used_idx(&m), irq.get()), (0, 0));
        let mut cs = std::mem::take(&mut *completers.lock().unwrap());
        let last = cs.pop().unwrap();
        let c1 = cs.pop().unwrap();
        let c0 = cs.pop().unwrap();
        std::thread::spawn(move || Completer::complete_all(vec![c0, c1], 77))
            .join()
            .unwrap();
        w.process_completions();
        assert_eq!(w.in_flight(), 1);
        assert_eq!(used_idx(&m), 2);
        assert_eq!(used(&m, 0), (0, 77));
        assert_eq!(used(&m, 1), (2, 77));
        assert_eq!(irq.get(), 1);
        // A reset with one request in flight waits for it; it gets no
        // used entry.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            last.complete(1);
        });
        drop(w);
        t.join().unwrap();
        assert_eq!(abandoned.load(Ordering::SeqCst), 1);
        assert_eq!(used_idx(&m), 2);
    }
}
