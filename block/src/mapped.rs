//! Asynchronous I/O for formats that map guest offsets to host extents
//! (qcow2, vpc, vdi; vmdk, vhdx, qed and parallels are shaped the same):
//! the format answers *where* under its metadata lock
//! ([`MappingFormat`]), and [`MappedIo`] does the rest without a thread
//! per request: it splits the request's buffers over the host extents
//! (`IoVecs::carve`, no copy), sends them to the data node, reads
//! unallocated runs from the backing child, completes the request when
//! every part is done (`Join`), zeroes fresh clusters before writing
//! into them, lets writes into a cluster being allocated join that
//! allocation, and parks writes that touch clusters being allocated until
//! the format says an allocation has finished ([`MappedIo::unpark`]).
//!
//! What needs reads before a write (copy-on-write from a backing file),
//! flushes, discards and write-zeroes stay synchronous and run on the
//! worker pool through the node's driver (`fallback`).

use crate::driver::{run_on_pool, BlockDriver, Completion, Extent, IoRequest};
use crate::error::{BlockError, BlockResult};
use crate::format::block_error;
use crate::iov::{Carved, IoVecs};
use crate::node::{Child, Node};
use formats::mapping::{self, GuestMap, Piece, Run};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Where a run of guest bytes is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind<E> {
    /// Stored at this host offset of the data node.
    Data {
        /// Host byte offset of the run's first byte.
        host: u64,
    },
    /// Reads as zeroes.
    Zero,
    /// Not in this layer: the backing file's bytes (zeroes past its end
    /// or without one).
    Unallocated,
    /// Stored encoded (compressed); the format decodes it
    /// ([`MappingFormat::read_encoded`]).
    Encoded(E),
}

/// One run of a read mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRun<E> {
    /// Guest byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Where they are.
    pub kind: RunKind<E>,
}

/// How a write can go ([`MappingFormat::map_write`]).
pub enum WriteMap<T> {
    /// Into clusters the image owns: (guest offset, host offset, length)
    /// runs, and the ticket to hold until the data is written.
    InPlace(Vec<(u64, u64, u64)>, T),
    /// Clusters it touches are being allocated: retry once an allocation
    /// has finished.
    Busy,
    /// It lies in one fresh cluster whose allocating write is in flight:
    /// it may go to `host` once that write has zeroed the host cluster
    /// `cluster`, and is complete once that write has linked it.
    Join {
        /// Host offset for the write.
        host: u64,
        /// Host offset of the cluster being allocated.
        cluster: u64,
        /// Held until the write is done.
        ticket: T,
    },
    /// Clusters must be allocated: [`MappingFormat::plan_alloc`].
    Allocate,
}

/// Where the bytes of a planned host write come from.
pub enum HostData {
    /// The request's data for guest bytes `[offset, offset+len)`.
    Guest {
        /// Guest byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// A buffer the plan built (guest data merged with old data).
    Owned(Vec<u8>),
}

/// What [`MappingFormat::plan_alloc`] decided.
pub enum AllocPlan<P> {
    /// Allocations are in flight on these clusters: park and retry.
    Busy,
    /// The write needs reads first: run it synchronously.
    Sync,
    /// Do this I/O, then [`MappingFormat::finish_alloc`] with `plan`.
    Ready {
        /// Host ranges to make read as zeroes before any write.
        zero_first: Vec<(u64, u64)>,
        /// Host writes: (host offset, data).
        writes: Vec<(u64, HostData)>,
        /// The format's record of the allocation.
        plan: P,
    },
}

/// A read mapping: its runs and the ticket that keeps them valid.
pub type ReadMap<F> = (
    Vec<MapRun<<F as MappingFormat>::Encoded>>,
    <F as MappingFormat>::Ticket,
);

/// What a format that maps guest ranges to host extents implements to
/// get asynchronous I/O from [`MappedIo`]. Every method runs under the
/// format's own metadata lock and does no data I/O except
/// [`MappingFormat::read_encoded`] (run on the worker pool).
pub trait MappingFormat: Send + Sync + 'static {
    /// Keeps the host clusters of a mapping from being freed and reused
    /// while I/O to them is in flight (dropped when it completes).
    type Ticket: Send + 'static;
    /// An allocation planned by [`MappingFormat::plan_alloc`].
    type Plan: Send + 'static;
    /// Where an encoded run's stored bytes are.
    type Encoded: Copy + Send + 'static;

    /// Map `[offset, offset+len)` for reading: runs in order, covering it.
    fn map_read(&self, offset: u64, len: u64) -> BlockResult<ReadMap<Self>>;
    /// Decode guest bytes `[offset, offset+buf.len())` of an encoded run.
    fn read_encoded(&self, at: Self::Encoded, offset: u64, buf: &mut [u8]) -> BlockResult<()>;
    /// Map a write of `[offset, offset+len)` that allocates nothing, if
    /// it can be one.
    fn map_write(&self, offset: u64, len: u64) -> BlockResult<WriteMap<Self::Ticket>>;
    /// Plan a write of `data` at `offset` that allocates clusters.
    fn plan_alloc(&self, offset: u64, data: &[u8]) -> BlockResult<AllocPlan<Self::Plan>>;
    /// Link what `plan` allocated once its I/O is done (`result`), or
    /// give it back on failure.
    fn finish_alloc(&self, plan: Self::Plan, result: BlockResult<()>) -> BlockResult<()>;
}

/// Any format that answers in [`formats::mapping`]'s vocabulary (vpc,
/// vdi, vmdk, vhdx) as a [`MappingFormat`]: one adapter for all of them.
/// It tells its [`MappedIo`] when an allocation has finished, so that
/// parked writes go again. Its tickets are empty: these formats never
/// free a block while the image is open.
pub struct Mapped<T: GuestMap> {
    img: Arc<T>,
    io: OnceLock<Weak<MappedIo<Mapped<T>>>>,
}

impl<T: GuestMap> Mapped<T> {
    /// The asynchronous data path of `img`, with data on `store` and the
    /// parent in `backing` (an empty slot without one).
    pub fn data_path(img: Arc<T>, store: Arc<Node>, backing: Arc<Child>) -> Arc<MappedIo<Self>> {
        let map = Arc::new(Mapped {
            img,
            io: OnceLock::new(),
        });
        let io = MappedIo::new(map.clone(), store, backing);
        let _ = map.io.set(Arc::downgrade(&io));
        io
    }
}

impl<T: GuestMap> MappingFormat for Mapped<T> {
    type Ticket = ();
    type Plan = T::Alloc;
    type Encoded = u64;

    fn map_read(&self, offset: u64, len: u64) -> BlockResult<ReadMap<Self>> {
        let runs = self
            .img
            .map_read(offset, len)
            .map_err(block_error)?
            .into_iter()
            .map(|p| MapRun {
                offset: p.offset,
                len: p.len,
                kind: match p.run {
                    Run::Data(host) => RunKind::Data { host },
                    Run::Zero => RunKind::Zero,
                    Run::Backing => RunKind::Unallocated,
                    Run::Encoded(at) => RunKind::Encoded(at),
                },
            })
            .collect();
        Ok((runs, ()))
    }
    fn read_encoded(&self, at: u64, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.img.read_encoded(at, offset, buf).map_err(block_error)
    }
    fn map_write(&self, offset: u64, len: u64) -> BlockResult<WriteMap<()>> {
        Ok(
            match self.img.map_write(offset, len).map_err(block_error)? {
                mapping::WriteMap::InPlace(runs) => WriteMap::InPlace(runs, ()),
                mapping::WriteMap::Busy => WriteMap::Busy,
                mapping::WriteMap::Allocate => WriteMap::Allocate,
            },
        )
    }
    fn plan_alloc(&self, offset: u64, data: &[u8]) -> BlockResult<AllocPlan<T::Alloc>> {
        let plan = self
            .img
            .plan_alloc(offset, data.len() as u64)
            .map_err(block_error)?;
        Ok(match plan {
            mapping::Plan::Busy => AllocPlan::Busy,
            mapping::Plan::Sync => AllocPlan::Sync,
            mapping::Plan::Ready {
                zero_first,
                writes,
                alloc,
            } => AllocPlan::Ready {
                zero_first,
                writes: writes
                    .into_iter()
                    .map(|(g, h, l)| (h, HostData::Guest { offset: g, len: l }))
                    .collect(),
                plan: alloc,
            },
        })
    }
    fn finish_alloc(&self, plan: T::Alloc, result: BlockResult<()>) -> BlockResult<()> {
        let r = self
            .img
            .finish_alloc(plan, result.is_ok())
            .map_err(block_error);
        if let Some(io) = self.io.get().and_then(Weak::upgrade) {
            io.unpark();
        }
        result.and(r)
    }
}

/// `BlockDriver::submit` of a mapped format's node: reads and plain
/// writes through its asynchronous data path `io` (none: a layout the
/// path does not serve, such as several extent files), everything else
/// (flushes, FUA, zeroes, discards, compressed writes) synchronously on
/// the worker pool through `node`'s driver.
pub fn submit_mapped<F: MappingFormat>(
    io: Option<&Arc<MappedIo<F>>>,
    node: Arc<dyn BlockDriver>,
    req: IoRequest,
    done: Completion,
) {
    match (io, req.op) {
        (Some(io), crate::driver::IoOp::Read) => io.clone().submit_read(req, done),
        (Some(io), crate::driver::IoOp::Write)
            if !req.fua && req.flags == crate::driver::IoFlags::NONE =>
        {
            io.clone().submit_write(req, done)
        }
        _ => run_on_pool(node, req, done),
    }
}

/// `BlockDriver::read_vectored` of an image read synchronously by
/// `read(offset, buf)` (the worker pool's path of a mapped format).
pub fn read_vectored_by(
    offset: u64,
    iov: &mut [std::io::IoSliceMut<'_>],
    read: impl Fn(u64, &mut [u8]) -> Result<(), formats::error::FormatError>,
) -> BlockResult<()> {
    let mut off = offset;
    for s in iov.iter_mut() {
        read(off, s).map_err(block_error)?;
        off += s.len() as u64;
    }
    Ok(())
}

/// `BlockDriver::write_vectored` of an image written synchronously by
/// `write(offset, data)`, with `flush` for FUA.
pub fn write_vectored_by(
    offset: u64,
    iov: &[std::io::IoSlice<'_>],
    fua: bool,
    write: impl Fn(u64, &[u8]) -> Result<(), formats::error::FormatError>,
    flush: impl Fn() -> Result<(), formats::error::FormatError>,
) -> BlockResult<()> {
    let mut flat = vec![0u8; crate::iov::total_len(iov)];
    crate::iov::gather(iov, &mut flat);
    write(offset, &flat).map_err(block_error)?;
    if fua {
        flush().map_err(block_error)?;
    }
    Ok(())
}

/// The block status of a mapped image of `size` bytes at `offset`: its
/// first run, as `map` (the format's `map_read`) places it, answered by
/// [`piece_extent`]; zeroes past the end. `name` is the driver's, for the
/// error of a mapping with no run (a format bug).
pub fn first_run_status(
    name: &str,
    size: u64,
    offset: u64,
    len: u64,
    map: impl FnOnce(u64, u64) -> Result<Vec<formats::mapping::Piece>, formats::error::FormatError>,
    file: &Node,
    backing: &Child,
) -> BlockResult<Extent> {
    if let Some(e) = past_end(size, offset, len) {
        return Ok(e);
    }
    let p = map(offset, len.min(size - offset))
        .map_err(block_error)?
        .into_iter()
        .next()
        .ok_or_else(|| BlockError::Corrupt(format!("{name}: empty mapping")))?;
    piece_extent(p, p.len, file, false, backing)
}

/// The block status past the end of an image of `size` bytes: zeroes,
/// as QEMU answers for a query there; `None` inside the image.
pub fn past_end(size: u64, offset: u64, len: u64) -> Option<Extent> {
    (offset >= size).then(|| Extent {
        len: len.max(1),
        data: false,
        zero: true,
        offset: None,
        allocated: true,
        compressed: false,
    })
}

/// The block status of piece `p` of a mapping, `len` bytes of it asked
/// for. `file` holds the data; when `file_backed` (a fixed or static
/// image, whose blocks are whatever the file has there), the file's own
/// holes read as zeroes (QEMU's BDRV_BLOCK_RECURSE). Backing runs take
/// the parent's status, not allocated in this layer.
pub fn piece_extent(
    p: Piece,
    len: u64,
    file: &Node,
    file_backed: bool,
    backing: &Child,
) -> BlockResult<Extent> {
    let ext = |data, zero, offset, allocated| Extent {
        len: p.len,
        data,
        zero,
        offset,
        allocated,
        compressed: false,
    };
    Ok(match p.run {
        Run::Data(host) if file_backed => {
            let fe = file.block_status(host, len)?;
            Extent {
                len: fe.len.clamp(1, len),
                zero: fe.zero && !fe.data,
                ..ext(true, false, Some(host), true)
            }
        }
        Run::Data(host) => ext(true, false, Some(host), true),
        Run::Zero => ext(false, true, None, true),
        Run::Encoded(_) => Extent {
            compressed: true,
            ..ext(true, false, None, true)
        },
        Run::Backing => match backing.get() {
            Some(b) if p.offset < b.len() => {
                let e = b.block_status(p.offset, p.len.min(b.len() - p.offset))?;
                Extent {
                    len: e.len.clamp(1, p.len),
                    allocated: false,
                    compressed: false,
                    ..e
                }
            }
            _ => ext(false, true, None, false),
        },
    })
}

/// The asynchronous data path of one open image of a mapping format.
pub struct MappedIo<F: MappingFormat> {
    fmt: Arc<F>,
    /// Where data lives: the data file, or the image file.
    store: Arc<Node>,
    /// The `backing` slot (empty without a backing file).
    backing: Arc<Child>,
    /// Writes waiting for an allocation in flight on their clusters.
    parked: Mutex<Vec<(IoRequest, Completion)>>,
    /// Fresh clusters of asynchronous allocating writes in flight, by host
    /// offset: writes to the same cluster join them.
    joinable: Mutex<HashMap<u64, Arc<AllocWait<F>>>>,
    /// The node's driver, for what runs synchronously on the pool.
    fallback: OnceLock<Weak<dyn BlockDriver>>,
}

impl<F: MappingFormat> MappedIo<F> {
    /// The data path of `fmt`, with data on `store` and the backing file
    /// in `backing`. Call [`MappedIo::set_fallback`] with the node's
    /// driver, and [`MappedIo::unpark`] whenever an allocation finishes.
    pub fn new(fmt: Arc<F>, store: Arc<Node>, backing: Arc<Child>) -> Arc<Self> {
        Arc::new(MappedIo {
            fmt,
            store,
            backing,
            parked: Mutex::new(Vec::new()),
            joinable: Mutex::new(HashMap::new()),
            fallback: OnceLock::new(),
        })
    }

    /// The driver that runs synchronous requests (the format's node).
    pub fn set_fallback(&self, drv: Weak<dyn BlockDriver>) {
        let _ = self.fallback.set(drv);
    }

    /// The format.
    pub fn format(&self) -> &Arc<F> {
        &self.fmt
    }

    /// Run `req` synchronously on the worker pool through the node's
    /// driver.
    pub fn run_sync(&self, req: IoRequest, done: Completion) {
        match self.fallback.get().and_then(Weak::upgrade) {
            Some(d) => run_on_pool(d, req, done),
            None => done(req, Err(internal("the node is gone"))),
        }
    }

    /// Submit the parked writes again (an allocation has finished).
    pub fn unpark(self: &Arc<Self>) {
        let list = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()));
        for (req, done) in list {
            self.clone().submit_write(req, done);
        }
    }

    /// Read asynchronously: map under the metadata lock, then send each
    /// run where it lives (data to the data node, unallocated runs to the
    /// backing node, encoded runs to the worker pool) and complete when
    /// all are done.
    pub fn submit_read(self: Arc<Self>, mut req: IoRequest, done: Completion) {
        let len = req.iov.len() as u64;
        let (pieces, ticket) = match self.fmt.map_read(req.offset, len) {
            Ok(x) => x,
            Err(e) => return done(req, Err(e)),
        };
        if let [MapRun {
            kind: RunKind::Data { host },
            ..
        }] = pieces[..]
        {
            // One host extent: the request itself goes down.
            return self.forward(req, host, ticket, done);
        }
        let backing = self.backing.get();
        let blen = backing.as_ref().map_or(0, |b| b.len());
        if pieces.iter().all(|p| match p.kind {
            RunKind::Zero => true,
            RunKind::Unallocated => p.offset >= blen,
            _ => false,
        }) {
            // Zeroes only (a fresh disk): no I/O, so no parts to join.
            drop(ticket);
            crate::iov::zero_fill(&mut req.iov.slices_mut());
            return done(req, Ok(()));
        }
        // Split unallocated runs at the end of the backing file: what lies
        // past it reads as zeroes.
        let mut runs: Vec<(MapRun<F::Encoded>, bool)> = Vec::new(); // run, zero
        for p in pieces {
            match p.kind {
                RunKind::Zero => runs.push((p, true)),
                RunKind::Unallocated if p.offset >= blen => runs.push((p, true)),
                RunKind::Unallocated if p.offset + p.len > blen => {
                    let n = blen - p.offset;
                    runs.push((MapRun { len: n, ..p }, false));
                    runs.push((
                        MapRun {
                            offset: blen,
                            len: p.len - n,
                            ..p
                        },
                        true,
                    ));
                }
                _ => runs.push((p, false)),
            }
        }
        let base = req.offset;
        let ranges: Vec<(usize, usize)> = runs
            .iter()
            .map(|(p, _)| ((p.offset - base) as usize, p.len as usize))
            .collect();
        let Some((whole, parts)) = carve(&mut req, &ranges) else {
            return done(req, Err(internal("bad read mapping")));
        };
        let join = Join::new(complete(req, whole, Some(ticket), done));
        for ((p, zero), mut part) in runs.into_iter().zip(parts) {
            if zero {
                crate::iov::zero_fill(&mut part.slices_mut());
                continue;
            }
            let cb = join.part();
            match p.kind {
                RunKind::Data { host } => self
                    .store
                    .driver()
                    .clone()
                    .submit(IoRequest::read(host, part), cb),
                RunKind::Encoded(at) => {
                    let me = self.clone();
                    crate::aio::pool().spawn(Box::new(move || {
                        let mut tmp = vec![0u8; p.len as usize];
                        let res = me.fmt.read_encoded(at, p.offset, &mut tmp);
                        if res.is_ok() {
                            crate::iov::scatter(&tmp, &mut part.slices_mut());
                        }
                        drop(me);
                        cb(IoRequest::read(p.offset, part), res)
                    }));
                }
                // Unallocated, inside the backing file (others are zero).
                _ => match &backing {
                    Some(b) => b.submit(IoRequest::read(p.offset, part), cb),
                    None => cb(IoRequest::read(p.offset, part), Ok(())),
                },
            }
        }
        join.release();
    }

    /// Send `req` to the data node at host offset `host` (one extent),
    /// keeping `ticket` until it completes.
    fn forward(&self, mut req: IoRequest, host: u64, ticket: F::Ticket, done: Completion) {
        let guest = req.offset;
        req.offset = host;
        self.store.driver().clone().submit(
            req,
            Box::new(move |mut r, res| {
                drop(ticket);
                r.offset = guest;
                done(r, res)
            }),
        )
    }

    /// Write asynchronously. Overwrites of clusters the image owns go
    /// straight to the data node; a write that allocates is planned under
    /// the metadata lock and its data I/O (zeroing new clusters first when
    /// the plan says so) sent asynchronously, the allocation linked on
    /// completion. One that touches clusters being allocated waits, parked
    /// without a thread, and is submitted again when an allocation
    /// finishes; one that must read old data first runs on the worker
    /// pool.
    pub fn submit_write(self: Arc<Self>, req: IoRequest, done: Completion) {
        let len = req.iov.len() as u64;
        // Mapping under the parking lock: an allocation that finishes
        // after we saw it busy resubmits the parked requests only after
        // this one is parked.
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let plan = match self.fmt.map_write(req.offset, len) {
            Ok(WriteMap::InPlace(runs, t)) => {
                drop(parked);
                if let [(_, host, _)] = runs[..] {
                    return self.forward(req, host, t, done);
                }
                let writes = runs
                    .into_iter()
                    .map(|(g, h, l)| (h, HostData::Guest { offset: g, len: l }))
                    .collect();
                return self.write_extents(req, Vec::new(), writes, t, done);
            }
            Ok(WriteMap::Busy) => return parked.push((req, done)),
            Ok(WriteMap::Join {
                host,
                cluster,
                ticket,
            }) => {
                let w = self
                    .joinable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&cluster)
                    .cloned();
                match w {
                    Some(w) => {
                        drop(parked);
                        w.join(
                            &self,
                            Joined {
                                req,
                                host,
                                ticket,
                                done,
                            },
                        );
                    }
                    // Allocated by the synchronous path: wait for it.
                    None => parked.push((req, done)),
                }
                return;
            }
            Ok(WriteMap::Allocate) => {
                let mut src = vec![0u8; len as usize];
                crate::iov::gather(&req.iov.slices(), &mut src);
                self.fmt.plan_alloc(req.offset, &src)
            }
            Err(e) => Err(e),
        };
        match plan {
            Ok(AllocPlan::Ready {
                zero_first: zero,
                writes,
                plan,
            }) => {
                // Fresh clusters other writes may join: registered before
                // the parking lock goes, so a writer that is told to join
                // finds them.
                let waits: Vec<(u64, Arc<AllocWait<F>>)> = {
                    let mut jobs = self.joinable.lock().unwrap_or_else(|e| e.into_inner());
                    zero.iter()
                        .map(|&(h, _)| {
                            let w = Arc::new(AllocWait::default());
                            jobs.insert(h, w.clone());
                            (h, w)
                        })
                        .collect()
                };
                drop(parked);
                let zw: Vec<Arc<AllocWait<F>>> = waits.iter().map(|(_, w)| w.clone()).collect();
                let zme = self.clone();
                let on_zeroed: Box<dyn FnOnce() + Send> = Box::new(move || {
                    for w in zw {
                        w.zeroed(&zme);
                    }
                });
                let me = self.clone();
                let fin: Completion = Box::new(move |r, res| {
                    let res = me.fmt.finish_alloc(plan, res);
                    {
                        let mut jobs = me.joinable.lock().unwrap_or_else(|e| e.into_inner());
                        for (h, _) in &waits {
                            jobs.remove(h);
                        }
                    }
                    for (_, w) in waits {
                        w.linked(&me, res.clone());
                    }
                    // The image goes before the caller hears of the write:
                    // a caller that then drops the node must really close
                    // it.
                    drop(me);
                    done(r, res)
                });
                self.write_extents_then(req, zero, writes, fin, Some(on_zeroed));
            }
            Ok(AllocPlan::Busy) => parked.push((req, done)),
            Ok(AllocPlan::Sync) => {
                drop(parked);
                self.run_sync(req, done)
            }
            Err(e) => {
                drop(parked);
                done(req, Err(e))
            }
        }
    }

    /// [`MappedIo::write_extents_then`] for in-place runs, holding the
    /// mapping's ticket until the writes are done.
    fn write_extents(
        &self,
        req: IoRequest,
        zero: Vec<(u64, u64)>,
        writes: Vec<(u64, HostData)>,
        ticket: F::Ticket,
        done: Completion,
    ) {
        self.write_extents_then(
            req,
            zero,
            writes,
            Box::new(move |r, res| {
                drop(ticket);
                done(r, res)
            }),
            None,
        )
    }

    /// Zero the host ranges `zero`, then write `writes` (guest data from
    /// `req`'s buffers, or owned buffers), all asynchronously; `done` gets
    /// `req` back with the first error.
    fn write_extents_then(
        &self,
        req: IoRequest,
        zero: Vec<(u64, u64)>,
        writes: Vec<(u64, HostData)>,
        done: Completion,
        on_zeroed: Option<Box<dyn FnOnce() + Send>>,
    ) {
        let store = self.store.clone();
        if !zero.is_empty() {
            // Zeroing first, or it could land on top of the data.
            let st = store.clone();
            let join = Join::new(Box::new(move |err| match err {
                Some(e) => done(req, Err(e)),
                None => {
                    if let Some(f) = on_zeroed {
                        f();
                    }
                    send_writes(&st, req, writes, done)
                }
            }));
            for (h, l) in zero {
                store
                    .driver()
                    .clone()
                    .submit(IoRequest::write_zeroes(h, l, false), join.part());
            }
            join.release();
            return;
        }
        send_writes(&store, req, writes, done)
    }
}

/// Write `writes` to `store` in parallel; `done` gets `req` back.
fn send_writes(
    store: &Arc<Node>,
    mut req: IoRequest,
    writes: Vec<(u64, HostData)>,
    done: Completion,
) {
    let base = req.offset;
    let ranges: Vec<(usize, usize)> = writes
        .iter()
        .filter_map(|(_, w)| match w {
            HostData::Guest { offset, len } => Some(((offset - base) as usize, *len as usize)),
            HostData::Owned(_) => None,
        })
        .collect();
    let Some((whole, parts)) = carve(&mut req, &ranges) else {
        return done(req, Err(internal("bad write mapping")));
    };
    let join = Join::new(complete::<()>(req, whole, None, done));
    let mut parts = parts.into_iter();
    let align = store.limits().mem_alignment.max(1);
    for (host, w) in writes {
        let iov = match w {
            HostData::Guest { .. } => match parts.next() {
                Some(p) => p,
                None => continue,
            },
            HostData::Owned(d) => {
                // Aligned, so that O_DIRECT needs no bounce buffer below.
                let mut b = crate::iov::AlignedBuf::new(d.len(), align.max(4096));
                b.copy_from_slice(&d);
                IoVecs::from_aligned(b)
            }
        };
        store
            .driver()
            .clone()
            .submit(IoRequest::write(host, iov, false), join.part());
    }
    join.release();
}

/// Take `req`'s buffers apart into `ranges` (relative to `req.offset`).
fn carve(req: &mut IoRequest, ranges: &[(usize, usize)]) -> Option<(Carved, Vec<IoVecs>)> {
    std::mem::replace(&mut req.iov, IoVecs::empty()).carve(ranges)
}

/// The continuation that puts `req`'s buffers back together (all parts
/// are gone by then), drops `ticket` and completes.
fn complete<T: Send + 'static>(
    mut req: IoRequest,
    whole: Carved,
    ticket: Option<T>,
    done: Completion,
) -> Then {
    Box::new(move |err| {
        drop(ticket);
        req.iov = whole.into_inner().unwrap_or_else(|_| IoVecs::empty());
        done(req, err.map_or(Ok(()), Err))
    })
}

fn internal(what: &str) -> BlockError {
    BlockError::Io {
        errno: libc::EIO,
        context: format!("mapped I/O: internal error: {what}"),
    }
}

/// A write joining a fresh cluster being allocated (QEMU makes such writes
/// wait for the allocation; here they are written as soon as the cluster
/// is zeroed, in parallel with the allocating write, and complete when it
/// has linked the cluster).
struct Joined<T> {
    req: IoRequest,
    /// Host offset to write at.
    host: u64,
    ticket: T,
    done: Completion,
}

/// The state of one joinable fresh cluster.
struct AllocWait<F: MappingFormat> {
    st: Mutex<AllocWaitState<F::Ticket>>,
}

impl<F: MappingFormat> Default for AllocWait<F> {
    fn default() -> Self {
        AllocWait {
            st: Mutex::new(AllocWaitState {
                zeroed: false,
                linked: None,
                queued: Vec::new(),
                written: Vec::new(),
            }),
        }
    }
}

/// A joined write done, waiting for the link: (request, done, result,
/// ticket).
type Written<T> = (IoRequest, Completion, BlockResult<()>, T);

struct AllocWaitState<T> {
    zeroed: bool,
    /// The allocating write's result, once it has finished.
    linked: Option<BlockResult<()>>,
    /// Joined writes waiting for the zeroing.
    queued: Vec<Joined<T>>,
    /// Joined writes done, waiting for the link.
    written: Vec<Written<T>>,
}

impl<F: MappingFormat> AllocWait<F> {
    fn state(&self) -> std::sync::MutexGuard<'_, AllocWaitState<F::Ticket>> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn join(self: &Arc<Self>, io: &Arc<MappedIo<F>>, j: Joined<F::Ticket>) {
        let mut s = self.state();
        if s.linked.is_some() {
            // Finished meanwhile: an ordinary write now.
            drop(s);
            drop(j.ticket);
            return io.clone().submit_write(j.req, j.done);
        }
        if !s.zeroed {
            s.queued.push(j);
            return;
        }
        drop(s);
        self.send(io, j);
    }

    fn send(self: &Arc<Self>, io: &Arc<MappedIo<F>>, j: Joined<F::Ticket>) {
        let Joined {
            mut req,
            host,
            ticket,
            done,
        } = j;
        let guest = req.offset;
        req.offset = host;
        let me = self.clone();
        io.store.driver().clone().submit(
            req,
            Box::new(move |mut r, res| {
                r.offset = guest;
                me.written(r, done, res, ticket)
            }),
        );
    }

    fn written(&self, r: IoRequest, done: Completion, res: BlockResult<()>, t: F::Ticket) {
        let mut s = self.state();
        match &s.linked {
            Some(l) => {
                let l = l.clone();
                drop(s);
                drop(t);
                done(r, res.and(l))
            }
            None => s.written.push((r, done, res, t)),
        }
    }

    fn zeroed(self: &Arc<Self>, io: &Arc<MappedIo<F>>) {
        let queued = {
            let mut s = self.state();
            s.zeroed = true;
            std::mem::take(&mut s.queued)
        };
        for j in queued {
            self.send(io, j);
        }
    }

    fn linked(&self, io: &Arc<MappedIo<F>>, res: BlockResult<()>) {
        let (queued, written) = {
            let mut s = self.state();
            s.linked = Some(res.clone());
            (
                std::mem::take(&mut s.queued),
                std::mem::take(&mut s.written),
            )
        };
        for (r, done, wres, t) in written {
            drop(t);
            done(r, wres.and(res.clone()));
        }
        // Never sent (the zeroing failed): ordinary writes now.
        for j in queued {
            drop(j.ticket);
            io.clone().submit_write(j.req, j.done);
        }
    }
}

/// Parts of one request in flight: runs the continuation with the first
/// error once every part is done and the submitter has let go.
struct Join {
    st: Mutex<JoinState>,
}

type Then = Box<dyn FnOnce(Option<BlockError>) + Send>;

struct JoinState {
    /// Parts in flight, plus one for the submitter until it has sent all.
    left: usize,
    err: Option<BlockError>,
    then: Option<Then>,
}

impl Join {
    fn new(then: Then) -> Arc<Join> {
        Arc::new(Join {
            st: Mutex::new(JoinState {
                left: 1,
                err: None,
                then: Some(then),
            }),
        })
    }
    /// A completion for one more part.
    fn part(self: &Arc<Self>) -> Completion {
        self.st.lock().unwrap_or_else(|e| e.into_inner()).left += 1;
        let j = self.clone();
        Box::new(move |part, res| {
            // The part's buffers go first: the whole comes back only when
            // no part refers to it.
            drop(part);
            j.finish(res.err());
        })
    }
    /// The submitter has sent every part.
    fn release(&self) {
        self.finish(None);
    }
    fn finish(&self, err: Option<BlockError>) {
        let mut s = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if s.err.is_none() {
            s.err = err;
        }
        s.left -= 1;
        if s.left > 0 {
            return;
        }
        let (then, err) = (s.then.take(), s.err.take());
        drop(s);
        if let Some(f) = then {
            f(err);
        }
    }
}
