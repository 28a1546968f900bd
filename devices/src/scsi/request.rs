//! The request runner: carries out a [`Plan`] for a transport.
//!
//! A transport hands over the plan ([`Lun::execute`] or
//! [`super::target::Target::execute`]) and a [`DataPath`] onto the
//! initiator's buffer (guest memory behind a virtio descriptor chain, an
//! LSI scatter list, USB packets). The runner moves the data, performs the
//! block I/O through [`BlockBackend::submit`] and calls `done` once with
//! the [`Outcome`]: the status (decided in [`Runner::finish`], the one
//! place), the bytes moved and the residual.
//!
//! - No disk I/O blocks the caller: each step submits one request and the
//!   completion (on an I/O thread) continues. `done` may run before
//!   [`start`] returns (no I/O needed, or a backend that completes inline),
//!   so call it without holding locks that `done` takes.
//! - Host memory is bounded whatever the guest asks: medium data moves in
//!   chunks of at most [`MAX_CHUNK`] bytes, one chunk in flight per
//!   request, and only as much as the initiator's buffer holds.
//! - Data-in larger than the initiator's buffer fills the buffer and sets
//!   [`Outcome::overrun`]; data-out larger than the buffer is not executed
//!   at all (the unit reports ILLEGAL REQUEST, as Linux's LIO target
//!   does), and sets it too. A buffer larger than the transfer leaves a
//!   residual (SAM-5 5.4.3: buffer size minus bytes moved).
//! - [`Request::abort`] stops a request between chunks; it completes with
//!   [`Status::Aborted`] once the chunk in flight is done.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use block::backend::BlockBackend;
use block::driver::IoRequest;
use block::error::BlockResult;
use block::iov::IoVecs;

use super::lun::{IoFailure, Lun, Plan};
use super::sense::Sense;

/// The most host memory one request holds for medium data.
pub const MAX_CHUNK: usize = 1 << 20;

/// The initiator's buffer could not be read or written (a bad guest
/// address, say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataPathError;

/// The initiator's buffer for one command, as the transport exposes it.
/// Offsets are relative to the start of the buffer; the runner never asks
/// for bytes at or beyond [`DataPath::len`].
pub trait DataPath: Send + 'static {
    /// The size of the initiator's buffer in bytes (the expected data
    /// transfer length of the transport).
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Data-in: stores `data` at `offset` of the initiator's buffer.
    fn copy_to_initiator(&mut self, offset: u64, data: &[u8]) -> Result<(), DataPathError>;
    /// Data-out: fills `buf` from `offset` of the initiator's buffer.
    fn copy_from_initiator(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DataPathError>;
}

/// A data path over a host buffer (tests, fuzzing, and transports that
/// stage data themselves).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VecPath {
    pub buf: Vec<u8>,
}

impl VecPath {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        VecPath { buf: vec![0; len] }
    }
}

impl DataPath for VecPath {
    fn len(&self) -> u64 {
        self.buf.len() as u64
    }
    fn copy_to_initiator(&mut self, offset: u64, data: &[u8]) -> Result<(), DataPathError> {
        let at = usize::try_from(offset).map_err(|_| DataPathError)?;
        let end = at.checked_add(data.len()).ok_or(DataPathError)?;
        self.buf
            .get_mut(at..end)
            .ok_or(DataPathError)?
            .copy_from_slice(data);
        Ok(())
    }
    fn copy_from_initiator(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DataPathError> {
        let at = usize::try_from(offset).map_err(|_| DataPathError)?;
        let end = at.checked_add(buf.len()).ok_or(DataPathError)?;
        buf.copy_from_slice(self.buf.get(at..end).ok_or(DataPathError)?);
        Ok(())
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// GOOD.
    Good,
    /// CHECK CONDITION with this sense (also kept by the unit for REQUEST
    /// SENSE).
    CheckCondition(Sense),
    /// The [`DataPath`] failed: no SCSI status; the transport reports its
    /// own error.
    DataPathFailed,
    /// Stopped by [`Request::abort`].
    Aborted,
}

impl Status {
    /// The SAM-5 status byte: GOOD 00h, CHECK CONDITION 02h, TASK ABORTED
    /// 40h; `None` for a data path failure.
    pub fn byte(&self) -> Option<u8> {
        match self {
            Status::Good => Some(0x00),
            Status::CheckCondition(_) => Some(0x02),
            Status::Aborted => Some(0x40),
            Status::DataPathFailed => None,
        }
    }
}

/// What the transport reports for a finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    /// Bytes moved between the initiator's buffer and the unit.
    pub transferred: u64,
    /// The initiator's buffer size minus `transferred`.
    pub residual: u64,
    /// The command had more data than the initiator's buffer holds.
    pub overrun: bool,
}

/// A handle on a running request.
#[derive(Clone, Debug, Default)]
pub struct Request {
    aborted: Arc<AtomicBool>,
}

impl Request {
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the request to stop before its next chunk.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

/// Carries out `plan` for `lun` (which [`Lun::io_failed`] and
/// [`Lun::data_out`] go to; `None` for an absent LUN, whose plans move no
/// medium data). Returns a handle for [`Request::abort`].
pub fn start<P, F>(lun: Option<Arc<dyn Lun>>, plan: Plan, path: P, done: F) -> Request
where
    P: DataPath,
    F: FnOnce(Outcome, P) + Send + 'static,
{
    let req = Request::new();
    run(&req, lun, plan, path, done);
    req
}

/// [`start`] with a handle made beforehand (so that the transport can file
/// it before `done` may run).
pub fn run<P, F>(req: &Request, lun: Option<Arc<dyn Lun>>, plan: Plan, path: P, done: F)
where
    P: DataPath,
    F: FnOnce(Outcome, P) + Send + 'static,
{
    let backend = lun.as_ref().and_then(|l| l.backend());
    let mut r = Box::new(Runner {
        lun,
        backend,
        buffer: path.len(),
        path,
        done,
        aborted: req.aborted.clone(),
        job: Job::Done(Status::Good),
        transferred: 0,
        overrun: false,
        buf: Vec::new(),
        other: Vec::new(),
    });
    r.job = r.begin(plan, true);
    r.drive();
}

/// What is left to do.
enum Job {
    Done(Status),
    Read {
        offset: u64,
        len: u64,
        pos: u64,
    },
    Write {
        offset: u64,
        len: u64,
        pos: u64,
        fua: bool,
    },
    Compare {
        offset: u64,
        len: u64,
        pos: u64,
    },
    /// The runner's `buf` holds the block repeated over one chunk.
    WriteSame {
        offset: u64,
        len: u64,
        pos: u64,
    },
    Zeroes {
        offset: u64,
        len: u64,
        unmap: bool,
        sent: bool,
    },
    Discard {
        ranges: Vec<(u64, u64)>,
        next: usize,
    },
    Flush {
        sent: bool,
    },
}

enum Step {
    Finish(Status),
    Submit(IoRequest),
}

struct Runner<P, F> {
    lun: Option<Arc<dyn Lun>>,
    backend: Option<Arc<BlockBackend>>,
    /// The initiator's buffer size.
    buffer: u64,
    path: P,
    done: F,
    aborted: Arc<AtomicBool>,
    job: Job,
    transferred: u64,
    overrun: bool,
    /// The chunk buffer, reused from one chunk to the next (the WRITE SAME
    /// pattern for WRITE SAME).
    buf: Vec<u8>,
    /// VERIFY's data-out chunk.
    other: Vec<u8>,
}

/// Where a submitted request's completion meets the runner: whichever of
/// `submit` returning and the completion comes second continues, so that
/// completions delivered inside `submit` do not recurse.
enum Slot<R> {
    Submitting,
    /// Boxed: a request with its buffers is large, the other states small.
    Completed(Box<(IoRequest, BlockResult<()>)>),
    Parked(Box<R>),
}

fn chunk(left: u64, max: usize) -> usize {
    left.min(max as u64) as usize
}

impl<P, F> Runner<P, F>
where
    P: DataPath,
    F: FnOnce(Outcome, P) + Send + 'static,
{
    /// The sense of a failure, kept by the unit.
    fn fail(&self, f: IoFailure) -> Job {
        let s = match &self.lun {
            Some(l) => l.io_failed(f),
            None => Sense::IO_ERROR,
        };
        Job::Done(Status::CheckCondition(s))
    }

    /// Data-out the initiator's buffer cannot hold: not executed.
    fn out_fits(&mut self, len: u64) -> Result<(), Job> {
        if len > self.buffer {
            self.overrun = true;
            return Err(self.fail(IoFailure::Overrun));
        }
        Ok(())
    }

    /// Turns a plan into the first job. `first`: not the continuation of
    /// a parameter list (which may not ask for more data).
    fn begin(&mut self, plan: Plan, first: bool) -> Job {
        let needs_medium = !matches!(
            plan,
            Plan::Good | Plan::Check(_) | Plan::DataIn(_) | Plan::DataOut { .. }
        );
        if needs_medium && self.backend.is_none() {
            let f = match plan {
                Plan::Read { .. } | Plan::Compare { .. } => IoFailure::Read {
                    errno: libc::ENOMEDIUM,
                },
                _ => IoFailure::Write {
                    errno: libc::ENOMEDIUM,
                },
            };
            return self.fail(f);
        }
        let moves_data = matches!(
            plan,
            Plan::DataIn(_)
                | Plan::Read { .. }
                | Plan::Write { .. }
                | Plan::Compare { .. }
                | Plan::WriteSame { .. }
                | Plan::DataOut { .. }
        );
        if !first && moves_data {
            log::error!("scsi: a parameter list led to a plan with more data: {plan:?}");
            return Job::Done(Status::CheckCondition(Sense::INVALID_FIELD));
        }
        match plan {
            Plan::Good => Job::Done(Status::Good),
            Plan::Check(s) => Job::Done(Status::CheckCondition(s)),
            Plan::DataIn(v) => {
                let n = chunk(self.buffer, v.len());
                self.overrun = v.len() as u64 > self.buffer;
                if self.path.copy_to_initiator(0, &v[..n]).is_err() {
                    return Job::Done(Status::DataPathFailed);
                }
                self.transferred = n as u64;
                Job::Done(Status::Good)
            }
            Plan::Read { offset, len } => {
                self.overrun = len > self.buffer;
                Job::Read {
                    offset,
                    len: len.min(self.buffer),
                    pos: 0,
                }
            }
            Plan::Write { offset, len, fua } => match self.out_fits(len) {
                Err(j) => j,
                Ok(()) => Job::Write {
                    offset,
                    len,
                    pos: 0,
                    fua,
                },
            },
            Plan::Compare { offset, len } => match self.out_fits(len) {
                Err(j) => j,
                Ok(()) => Job::Compare {
                    offset,
                    len,
                    pos: 0,
                },
            },
            Plan::WriteSame {
                offset,
                len,
                block,
                unmap,
            } => {
                if let Err(j) = self.out_fits(block as u64) {
                    return j;
                }
                let mut one = vec![0u8; block as usize];
                if self.path.copy_from_initiator(0, &mut one).is_err() {
                    return Job::Done(Status::DataPathFailed);
                }
                self.transferred = block as u64;
                if one.iter().all(|&b| b == 0) {
                    return Job::Zeroes {
                        offset,
                        len,
                        unmap,
                        sent: false,
                    };
                }
                if block == 0 || len % block as u64 != 0 {
                    return Job::Done(Status::CheckCondition(Sense::INVALID_FIELD));
                }
                let per_chunk = (MAX_CHUNK / block as usize).max(1);
                let blocks = (len / block as u64).min(per_chunk as u64) as usize;
                self.buf = one.repeat(blocks);
                Job::WriteSame {
                    offset,
                    len,
                    pos: 0,
                }
            }
            Plan::WriteZeroes { offset, len, unmap } => Job::Zeroes {
                offset,
                len,
                unmap,
                sent: false,
            },
            Plan::Flush => Job::Flush { sent: false },
            Plan::Discard(ranges) => Job::Discard { ranges, next: 0 },
            Plan::DataOut { len, cmd } => {
                if let Err(j) = self.out_fits(len as u64) {
                    return j;
                }
                let Some(lun) = self.lun.clone() else {
                    return Job::Done(Status::CheckCondition(Sense::INVALID_FIELD));
                };
                if len as usize > MAX_CHUNK {
                    return Job::Done(Status::CheckCondition(Sense::PARAM_LIST_LENGTH));
                }
                let mut data = vec![0u8; len as usize];
                if self.path.copy_from_initiator(0, &mut data).is_err() {
                    return Job::Done(Status::DataPathFailed);
                }
                self.transferred = len as u64;
                let next = lun.data_out(&cmd, &data);
                self.begin(next, false)
            }
        }
    }

    /// The next request to submit, or the end.
    fn step(&mut self) -> Step {
        if let Job::Done(s) = self.job {
            return Step::Finish(s);
        }
        if self.aborted.load(Ordering::SeqCst) {
            return Step::Finish(Status::Aborted);
        }
        let max = match self.job {
            Job::Compare { .. } => MAX_CHUNK / 2,
            _ => MAX_CHUNK,
        };
        let mut buf = std::mem::take(&mut self.buf);
        let req = match &mut self.job {
            Job::Done(_) => unreachable!("handled above"),
            Job::Read { offset, len, pos } | Job::Compare { offset, len, pos } => {
                if pos == len {
                    return Step::Finish(Status::Good);
                }
                buf.resize(chunk(*len - *pos, max), 0);
                IoRequest::read(*offset + *pos, IoVecs::from_vec(buf))
            }
            Job::Write {
                offset,
                len,
                pos,
                fua,
            } => {
                if pos == len {
                    return Step::Finish(Status::Good);
                }
                buf.resize(chunk(*len - *pos, MAX_CHUNK), 0);
                if self.path.copy_from_initiator(*pos, &mut buf).is_err() {
                    return Step::Finish(Status::DataPathFailed);
                }
                IoRequest::write(*offset + *pos, IoVecs::from_vec(buf), *fua)
            }
            Job::WriteSame { offset, len, pos } => {
                if pos == len {
                    return Step::Finish(Status::Good);
                }
                // The pattern covers whole blocks, and so does what is left.
                buf.truncate(chunk(*len - *pos, buf.len()));
                IoRequest::write(*offset + *pos, IoVecs::from_vec(buf), false)
            }
            Job::Zeroes {
                offset,
                len,
                unmap,
                sent,
            } => {
                if *sent {
                    return Step::Finish(Status::Good);
                }
                *sent = true;
                IoRequest::write_zeroes(*offset, *len, *unmap)
            }
            Job::Discard { ranges, next } => match ranges.get(*next) {
                None => return Step::Finish(Status::Good),
                Some(&(offset, len)) => IoRequest::discard(offset, len),
            },
            Job::Flush { sent } => {
                if *sent {
                    return Step::Finish(Status::Good);
                }
                *sent = true;
                IoRequest::flush()
            }
        };
        Step::Submit(req)
    }

    /// A submitted request completed.
    fn completed(&mut self, req: IoRequest, res: BlockResult<()>) {
        let errno = res.as_ref().err().map(|e| e.errno());
        let n = req.iov.len() as u64;
        let data = req.iov.into_vec().unwrap_or_default();
        let failed = match &mut self.job {
            Job::Done(_) => None,
            Job::Read { pos, .. } => match errno {
                Some(errno) => Some(IoFailure::Read { errno }),
                None => {
                    if self.path.copy_to_initiator(*pos, &data).is_err() {
                        self.job = Job::Done(Status::DataPathFailed);
                        return;
                    }
                    *pos += n;
                    self.transferred += n;
                    None
                }
            },
            Job::Compare { pos, .. } => match errno {
                Some(errno) => Some(IoFailure::Read { errno }),
                None => {
                    let mut other = std::mem::take(&mut self.other);
                    other.resize(data.len(), 0);
                    if self.path.copy_from_initiator(*pos, &mut other).is_err() {
                        self.job = Job::Done(Status::DataPathFailed);
                        return;
                    }
                    self.transferred += n;
                    *pos += n;
                    let same = other == data;
                    self.other = other;
                    (!same).then_some(IoFailure::Miscompare)
                }
            },
            Job::Write { pos, .. } | Job::WriteSame { pos, .. } => match errno {
                Some(errno) => Some(IoFailure::Write { errno }),
                None => {
                    *pos += n;
                    if matches!(self.job, Job::Write { .. }) {
                        self.transferred += n;
                    }
                    None
                }
            },
            Job::Zeroes { .. } => errno.map(|errno| IoFailure::Write { errno }),
            Job::Discard { next, .. } => {
                *next += 1;
                // Discard is advisory: a node that cannot is no error.
                errno
                    .filter(|&e| e != libc::ENOTSUP)
                    .map(|errno| IoFailure::Unmap { errno })
            }
            Job::Flush { .. } => errno.map(|errno| IoFailure::Flush { errno }),
        };
        self.buf = data;
        if let Some(f) = failed {
            self.job = self.fail(f);
        }
    }

    /// Runs steps until the request is finished or waits for a completion.
    fn drive(mut self: Box<Self>) {
        loop {
            let req = match self.step() {
                Step::Finish(status) => return (*self).finish(status),
                Step::Submit(req) => req,
            };
            let Some(backend) = self.backend.clone() else {
                return (*self).finish(Status::CheckCondition(Sense::IO_ERROR));
            };
            let slot: Arc<Mutex<Slot<Self>>> = Arc::new(Mutex::new(Slot::Submitting));
            let theirs = slot.clone();
            backend.submit(
                req,
                Box::new(move |req, res| {
                    let mut g = theirs.lock().unwrap_or_else(|e| e.into_inner());
                    match std::mem::replace(&mut *g, Slot::Submitting) {
                        Slot::Submitting => *g = Slot::Completed(Box::new((req, res))),
                        Slot::Parked(mut r) => {
                            drop(g);
                            r.completed(req, res);
                            r.drive();
                        }
                        Slot::Completed(..) => {
                            log::error!("scsi: a block request completed twice");
                        }
                    }
                }),
            );
            let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
            match std::mem::replace(&mut *g, Slot::Submitting) {
                Slot::Completed(done) => {
                    drop(g);
                    let (req, res) = *done;
                    self.completed(req, res);
                }
                Slot::Submitting => {
                    *g = Slot::Parked(self);
                    return;
                }
                Slot::Parked(_) => unreachable!("only this thread parks"),
            }
        }
    }

    /// The one place where a request's status is decided and reported.
    fn finish(self, status: Status) {
        let Runner {
            buffer,
            path,
            done,
            transferred,
            overrun,
            ..
        } = self;
        done(
            Outcome {
                status,
                transferred,
                residual: buffer.saturating_sub(transferred),
                overrun,
            },
            path,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::cdb::op;
    use super::super::sbc::{Disk, DiskOptions};
    use super::super::testutil::*;
    use super::*;
    use block::backend::BackendConfig;

    const MIB: u64 = 1 << 20;

    fn disk_on(b: Arc<BlockBackend>) -> Arc<dyn Lun> {
        let d: Arc<dyn Lun> = Arc::new(Disk::new(b, DiskOptions::default()).unwrap());
        d.reset();
        d.execute(&cdb(&[op::TEST_UNIT_READY]));
        d
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| {
                (i as u8)
                    .wrapping_mul(31)
                    .wrapping_add(seed ^ (i >> 9) as u8)
            })
            .collect()
    }

    /// A data path that records how it is used, fails on request, and can
    /// abort its own request after some chunks.
    struct Probe {
        len: u64,
        calls: usize,
        biggest: usize,
        fail: bool,
        abort_after: Option<(usize, Request)>,
    }

    impl Probe {
        fn new(len: u64) -> Probe {
            Probe {
                len,
                calls: 0,
                biggest: 0,
                fail: false,
                abort_after: None,
            }
        }
        fn seen(&mut self, n: usize) -> Result<(), DataPathError> {
            self.calls += 1;
            self.biggest = self.biggest.max(n);
            if let Some((after, req)) = &self.abort_after {
                if self.calls >= *after {
                    req.abort();
                }
            }
            if self.fail {
                Err(DataPathError)
            } else {
                Ok(())
            }
        }
    }

    impl DataPath for Probe {
        fn len(&self) -> u64 {
            self.len
        }
        fn copy_to_initiator(&mut self, _: u64, data: &[u8]) -> Result<(), DataPathError> {
            self.seen(data.len())
        }
        fn copy_from_initiator(&mut self, _: u64, buf: &mut [u8]) -> Result<(), DataPathError> {
            buf.fill(0x5a);
            self.seen(buf.len())
        }
    }

    #[test]
    fn write_then_read_round_trip() {
        let img = TempImage::new(8 * MIB);
        let b = img.backend(BackendConfig::default());
        let d = disk_on(b.clone());
        // 2.5 MiB: three chunks each way.
        let blocks = 5 * 1024;
        let data = pattern(blocks * 512, 7);
        let (o, _) = exec(
            &d,
            &cdb16(op::WRITE_16, 0x08, 100, blocks as u32),
            VecPath { buf: data.clone() },
        );
        assert_eq!(
            o,
            Outcome {
                status: Status::Good,
                transferred: data.len() as u64,
                residual: 0,
                overrun: false
            }
        );
        let mut on_disk = vec![0u8; data.len()];
        b.read_at(100 * 512, &mut on_disk).unwrap();
        assert!(on_disk == data, "the medium holds what was written");
        let (o, back) = exec_in(&d, &cdb10(op::READ_10, 0, 100, blocks as u16), data.len());
        assert_eq!(o.status, Status::Good);
        assert!(back == data, "read back what was written");
        assert_eq!(b.stats().write.ops, 3);
    }

    #[test]
    fn residual_when_the_buffer_is_larger() {
        let d = disk_on(null(MIB));
        let (o, _) = exec(&d, &cdb10(op::READ_10, 0, 0, 1), VecPath::new(4096));
        assert_eq!((o.transferred, o.residual, o.overrun), (512, 3584, false));
        let (o, _) = exec(&d, &cdb(&[op::INQUIRY, 0, 0, 0, 36]), VecPath::new(100));
        assert_eq!((o.transferred, o.residual), (36, 64));
        // CHECK CONDITION moves nothing.
        let (o, _) = exec(&d, &cdb10(op::READ_10, 0, 9999, 1), VecPath::new(512));
        assert_eq!(o.status, Status::CheckCondition(Sense::LBA_OUT_OF_RANGE));
        assert_eq!((o.transferred, o.residual), (0, 512));
        assert_eq!(o.status.byte(), Some(2));
    }

    #[test]
    fn read_overrun_fills_the_buffer() {
        let d = disk_on(null(MIB));
        let (o, _) = exec(&d, &cdb10(op::READ_10, 0, 0, 8), VecPath::new(1000));
        assert_eq!(
            o,
            Outcome {
                status: Status::Good,
                transferred: 1000,
                residual: 0,
                overrun: true
            }
        );
        let (o, p) = exec(&d, &cdb(&[op::INQUIRY, 0, 0, 0, 36]), VecPath::new(8));
        assert_eq!((o.transferred, o.overrun), (8, true));
        assert_eq!(p.buf[2], 5);
    }

    #[test]
    fn write_overrun_is_not_executed() {
        let img = TempImage::new(MIB);
        let b = img.backend(BackendConfig::default());
        let d = disk_on(b.clone());
        let (o, _) = exec(
            &d,
            &cdb10(op::WRITE_10, 0, 0, 8),
            VecPath { buf: vec![1; 1024] },
        );
        assert_eq!(
            o,
            Outcome {
                status: Status::CheckCondition(Sense::INVALID_FIELD),
                transferred: 0,
                residual: 1024,
                overrun: true
            }
        );
        assert_eq!(request_sense(&d), Sense::INVALID_FIELD);
        assert_eq!(b.stats().write.ops, 0);
    }

    #[test]
    fn huge_read_allocates_in_bounded_chunks() {
        // A 2 TiB disk and READ(16) of 2^32-1 blocks.
        let d = disk_on(null(2 << 40));
        let huge = cdb16(op::READ_16, 0, 0, u32::MAX);
        assert_eq!(
            d.execute(&huge),
            Plan::Read {
                offset: 0,
                len: u32::MAX as u64 * 512
            }
        );
        // The initiator's buffer bounds the transfer...
        let (o, p) = exec(&d, &huge, Probe::new(3 * MIB + 512));
        assert_eq!(o.status, Status::Good);
        assert_eq!((o.transferred, o.overrun), (3 * MIB + 512, true));
        assert_eq!((p.calls, p.biggest), (4, MAX_CHUNK));
        // ...and even an initiator claiming a huge buffer gets it in
        // bounded chunks (on I/O threads here); it can be aborted.
        let b = backend(
            &format!("driver=null-aio,size={}", 2u64 << 40),
            BackendConfig::default(),
        );
        let d = disk_on(b);
        let req = Request::new();
        let mut probe = Probe::new(u64::MAX);
        probe.abort_after = Some((5, req.clone()));
        let (tx, rx) = std::sync::mpsc::channel();
        let plan = d.execute(&huge);
        super::run(&req, Some(d.clone()), plan, probe, move |o, p| {
            tx.send((o, p)).unwrap()
        });
        let (o, p) = rx.recv().unwrap();
        assert_eq!(o.status, Status::Aborted);
        assert_eq!(o.status.byte(), Some(0x40));
        assert_eq!((p.calls, p.biggest), (5, MAX_CHUNK));
        assert_eq!(o.transferred, 5 * MIB);
    }

    #[test]
    fn verify_with_bytchk_compares() {
        let img = TempImage::new(4 * MIB);
        let b = img.backend(BackendConfig::default());
        let d = disk_on(b.clone());
        // 1.5 MiB: three compare chunks.
        let data = pattern(3 * 1024 * 512, 3);
        b.write_at(512, &data).unwrap();
        let verify = cdb10(op::VERIFY_10, 0x02, 1, 3 * 1024);
        let (o, _) = exec(&d, &verify, VecPath { buf: data.clone() });
        assert_eq!(o.status, Status::Good);
        assert_eq!(o.transferred, data.len() as u64);
        let mut wrong = data.clone();
        wrong[MIB as usize + 7] ^= 1;
        let (o, _) = exec(&d, &verify, VecPath { buf: wrong });
        assert_eq!(o.status, Status::CheckCondition(Sense::MISCOMPARE));
        assert_eq!(request_sense(&d), Sense::MISCOMPARE);
        // Without BYTCHK nothing moves.
        let (o, _) = exec(&d, &cdb10(op::VERIFY_10, 0, 1, 8), VecPath::new(4096));
        assert_eq!((o.status, o.transferred), (Status::Good, 0));
    }

    #[test]
    fn write_same_pattern_zeroes_and_unmap() {
        let img = TempImage::new(4 * MIB);
        let b = img.backend(BackendConfig::default());
        let d = disk_on(b.clone());
        // A non-zero block over 3000 blocks (1.5 MiB: two chunks).
        let block = pattern(512, 9);
        let (o, _) = exec(
            &d,
            &cdb16(op::WRITE_SAME_16, 0x08, 10, 3000),
            VecPath { buf: block.clone() },
        );
        assert_eq!((o.status, o.transferred), (Status::Good, 512));
        let mut back = vec![0u8; 3000 * 512];
        b.read_at(10 * 512, &mut back).unwrap();
        assert!(back.chunks(512).all(|c| c == block.as_slice()));
        assert_eq!(b.stats().write.ops, 2);
        // A zero block becomes a write-zeroes.
        let (o, _) = exec(
            &d,
            &cdb10(op::WRITE_SAME_10, 0x08, 10, 1000),
            VecPath::new(512),
        );
        assert_eq!(o.status, Status::Good);
        b.read_at(10 * 512, &mut back).unwrap();
        assert!(back[..1000 * 512].iter().all(|&x| x == 0));
        assert!(back[1000 * 512..]
            .chunks(512)
            .all(|c| c == block.as_slice()));
        assert_eq!(b.stats().write_zeroes.ops, 1);
        // NDOB: no data-out at all.
        let (o, _) = exec(
            &d,
            &cdb16(op::WRITE_SAME_16, 0x01, 1000, 2010),
            VecPath::new(0),
        );
        assert_eq!((o.status, o.transferred), (Status::Good, 0));
        b.read_at(10 * 512, &mut back).unwrap();
        assert!(back.iter().all(|&x| x == 0));
        // UNMAP through the runner: the parameter list is data-out.
        let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
        list.extend_from_slice(&20u64.to_be_bytes());
        list.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0]);
        let c = cdb(&[op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 24]);
        let (o, _) = exec(&d, &c, VecPath { buf: list });
        assert_eq!((o.status, o.transferred), (Status::Good, 24));
        assert_eq!(b.stats().discard.ops, 1);
        // A parameter list the initiator's buffer cannot hold.
        let (o, _) = exec(&d, &c, VecPath::new(16));
        assert_eq!(o.status, Status::CheckCondition(Sense::INVALID_FIELD));
        assert!(o.overrun);
    }

    #[test]
    fn synchronize_cache_flushes() {
        let img = TempImage::new(MIB);
        let b = img.backend(BackendConfig::default());
        let d = disk_on(b.clone());
        let (o, _) = exec(
            &d,
            &cdb10(op::SYNCHRONIZE_CACHE_10, 0, 0, 0),
            VecPath::new(0),
        );
        assert_eq!(o.status, Status::Good);
        assert_eq!(b.stats().flush.ops, 1);
    }

    #[test]
    fn io_errors_become_check_condition() {
        let img = TempImage::new(MIB);
        let b = img.blkdebug(
            ",inject-error.0.event=read_aio,inject-error.0.sector=8\
             ,inject-error.1.event=write_aio,inject-error.1.errno=5",
        );
        let d = disk_on(b);
        let (o, _) = exec(&d, &cdb10(op::READ_10, 0, 0, 1), VecPath::new(512));
        assert_eq!(o.status, Status::Good);
        let (o, _) = exec(&d, &cdb10(op::READ_10, 0, 8, 1), VecPath::new(512));
        assert_eq!(o.status, Status::CheckCondition(Sense::IO_ERROR));
        assert_eq!(request_sense(&d), Sense::IO_ERROR);
        let (o, _) = exec(&d, &cdb10(op::WRITE_10, 0, 0, 1), VecPath::new(512));
        assert_eq!(o.status, Status::CheckCondition(Sense::IO_ERROR));
        assert_eq!(o.transferred, 0);
    }

    #[test]
    fn data_path_failures_are_the_transports() {
        let d = disk_on(null(MIB));
        for c in [
            cdb10(op::READ_10, 0, 0, 1),
            cdb10(op::WRITE_10, 0, 0, 1),
            cdb(&[op::INQUIRY, 0, 0, 0, 36]),
        ] {
            let mut p = Probe::new(512);
            p.fail = true;
            let (o, _) = exec(&d, &c, p);
            assert_eq!(o.status, Status::DataPathFailed);
            assert_eq!(o.status.byte(), None);
        }
    }

    #[test]
    fn no_medium_and_no_unit() {
        // A plan needing a medium, without a unit: IO_ERROR, no panic.
        let (tx, rx) = std::sync::mpsc::channel();
        start(
            None,
            Plan::Read {
                offset: 0,
                len: 512,
            },
            VecPath::new(512),
            move |o, _| tx.send(o).unwrap(),
        );
        assert_eq!(
            rx.recv().unwrap().status,
            Status::CheckCondition(Sense::IO_ERROR)
        );
        // A parameter list leading to a plan with more data is refused.
        struct Odd;
        impl Lun for Odd {
            fn execute(&self, _: &[u8]) -> Plan {
                Plan::Good
            }
            fn data_out(&self, _: &super::super::cdb::Command, _: &[u8]) -> Plan {
                Plan::Read { offset: 0, len: 1 }
            }
            fn io_failed(&self, _: IoFailure) -> Sense {
                Sense::IO_ERROR
            }
            fn reset(&self) {}
            fn backend(&self) -> Option<Arc<BlockBackend>> {
                Some(null(MIB))
            }
        }
        let odd: Arc<dyn Lun> = Arc::new(Odd);
        let plan = Plan::DataOut {
            len: 4,
            cmd: super::super::cdb::Command::Unmap { param_len: 4 },
        };
        let (o, _) = run_plan(&odd, plan, VecPath::new(4));
        assert_eq!(o.status, Status::CheckCondition(Sense::INVALID_FIELD));
    }
}
