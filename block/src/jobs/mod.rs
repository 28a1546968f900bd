//! Block jobs: long-running operations on the graph while the guest runs
//! (QEMU's job model, QAPI `JobStatus` and `JobVerb` in `qapi/job.json`,
//! and the `BLOCK_JOB_*` events of `qapi/block-core.json`).
//!
//! A job runs on its own thread. Its driver ([`JobDriver`]) does the
//! copying in [`JobDriver::run`], calling [`Ctl`] between chunks: that is
//! where pausing, cancelling, the speed limit and the error policies act.
//! When `run` succeeds the job waits, becomes pending and, once finalized
//! (at once with `auto-finalize`, else by `job-finalize`), makes its result
//! part of the graph in [`JobDriver::commit`] (a pivot, a new backing
//! link); on failure or cancel [`JobDriver::abort`] undoes what it set up.
//! It then concludes and, with `auto-dismiss`, disappears.
//!
//! Status changes follow QEMU's transition table: created → running ⇄
//! paused, running → ready ⇄ standby (mirror and active commit),
//! → waiting → pending → concluded → null, and aborting on failure or
//! cancel. Every change is a JOB_STATUS_CHANGE event.
//!
//! Jobs belong to the storage side of the VMM ([`Jobs`] lives beside the
//! block graph), so a guest reset does not touch them.

pub mod backup;
pub mod commit;
pub mod copy;
pub mod mirror;
pub mod stream;

use crate::backend::ErrorAction;
use crate::error::BlockError;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// QAPI `JobStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl Status {
    /// QAPI's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Ready => "ready",
            Status::Standby => "standby",
            Status::Waiting => "waiting",
            Status::Pending => "pending",
            Status::Aborting => "aborting",
            Status::Concluded => "concluded",
            Status::Null => "null",
        }
    }
}

/// QAPI `JobType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Commit,
    Stream,
    Mirror,
    Backup,
}

impl Kind {
    /// QAPI's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Commit => "commit",
            Kind::Stream => "stream",
            Kind::Mirror => "mirror",
            Kind::Backup => "backup",
        }
    }
}

/// A job as `query-block-jobs` and `query-jobs` show it.
#[derive(Clone, Debug)]
pub struct Info {
    pub id: String,
    pub kind: Kind,
    pub status: Status,
    /// `offset` and `len` of QMP: progress so far and the estimated total.
    pub offset: u64,
    pub len: u64,
    /// Bytes per second; 0 is unlimited.
    pub speed: u64,
    pub busy: bool,
    pub paused: bool,
    pub ready: bool,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// The job stopped on an I/O error (QMP's `io-status: failed`).
    pub io_failed: bool,
    pub error: Option<String>,
}

/// What a job tells the monitor.
#[derive(Clone, Debug)]
pub enum Event {
    /// JOB_STATUS_CHANGE.
    StatusChange { id: String, status: Status },
    /// BLOCK_JOB_READY.
    Ready(Info),
    /// BLOCK_JOB_COMPLETED (with `error` when it failed).
    Completed(Info),
    /// BLOCK_JOB_CANCELLED.
    Cancelled(Info),
    /// BLOCK_JOB_ERROR.
    Error {
        id: String,
        write: bool,
        action: ErrorAction,
    },
}

/// Where events go.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// Options every job takes.
#[derive(Clone, Debug)]
pub struct JobOptions {
    pub speed: u64,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub on_source_error: ErrorAction,
    pub on_target_error: ErrorAction,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            speed: 0,
            auto_finalize: true,
            auto_dismiss: true,
            on_source_error: ErrorAction::Report,
            on_target_error: ErrorAction::Report,
        }
    }
}

/// Why `run` stopped early.
#[derive(Debug)]
pub enum Failure {
    Cancelled,
    Error(String),
}

impl From<BlockError> for Failure {
    fn from(e: BlockError) -> Self {
        Failure::Error(e.to_string())
    }
}

/// What a job does.
pub trait JobDriver: Send + Sync {
    /// The copy phase, on the job's thread. Returns `Ok` when the result
    /// is ready to be made part of the graph.
    fn run(&self, ctl: &Ctl) -> Result<(), Failure>;
    /// Make the result part of the graph (after `run` succeeded and the
    /// job was finalized). An error fails the job.
    fn commit(&self, _ctl: &Ctl) -> Result<(), Failure> {
        Ok(())
    }
    /// Undo what the job set up, after a failure or a cancel.
    fn abort(&self) {}
    /// Release what the job holds (both outcomes).
    fn clean(&self) {}
}

/// A refused job command, with QMP's error class.
#[derive(Debug, PartialEq, Eq)]
pub enum JobError {
    /// `DeviceNotActive` (block-job-* on a missing job).
    NotFound(String),
    /// `GenericError`.
    Generic(String),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::NotFound(m) | JobError::Generic(m) => f.write_str(m),
        }
    }
}

struct State {
    status: Status,
    /// Pauses asked by the user (block-job-pause nests).
    user_pauses: u32,
    /// Paused by the `stop` error policy until resumed.
    error_paused: bool,
    cancelled: bool,
    force: bool,
    complete: bool,
    finalize: bool,
    ready: bool,
    speed: u64,
    offset: u64,
    len: u64,
    error: Option<String>,
    io_failed: bool,
    /// Rate limiting: bytes since `since`.
    since: Instant,
    sent: u64,
}

/// One job.
pub struct Job {
    id: String,
    kind: Kind,
    opts: JobOptions,
    state: Mutex<State>,
    cv: Condvar,
    jobs: Weak<Jobs>,
}

/// A job's handle for its driver: pause points, progress, rate limit and
/// the error policy.
pub struct Ctl {
    job: Arc<Job>,
}

impl Ctl {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.job.lock()
    }

    /// A pause point: waits while the job is paused, and fails with
    /// [`Failure::Cancelled`] once it is cancelled (a ready mirror
    /// cancelled without `force` is not: it sees
    /// [`Ctl::should_finish`] instead).
    pub fn check(&self) -> Result<(), Failure> {
        let mut s = self.lock();
        loop {
            if s.cancelled && (s.force || !s.ready) {
                return Err(Failure::Cancelled);
            }
            if s.user_pauses == 0 && !s.error_paused {
                break;
            }
            let paused = if s.ready {
                Status::Standby
            } else {
                Status::Paused
            };
            if s.status != paused {
                s = self.job.set_status(s, paused);
            }
            s = self.job.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let running = if s.ready {
            Status::Ready
        } else {
            Status::Running
        };
        if s.status != running {
            drop(self.job.set_status(s, running));
        }
        Ok(())
    }

    /// Sleep up to `d`, waking early for any command.
    pub fn nap(&self, d: Duration) {
        let s = self.lock();
        let _ = self.job.cv.wait_timeout(s, d);
    }

    /// Progress: `n` more bytes done.
    pub fn advance(&self, n: u64) {
        let mut s = self.lock();
        s.offset += n;
        s.len = s.len.max(s.offset);
    }
    /// Progress: bytes done so far.
    pub fn offset(&self) -> u64 {
        self.lock().offset
    }
    /// Progress: the total is `len` (at least what is done).
    pub fn set_len(&self, len: u64) {
        let mut s = self.lock();
        s.len = len.max(s.offset);
    }

    /// Enforce `speed` after `n` bytes were copied: sleep (at pause points)
    /// until the average since the last speed change is within it.
    pub fn throttle(&self, n: u64) -> Result<(), Failure> {
        loop {
            let wait = {
                let mut s = self.lock();
                if s.speed == 0 {
                    return Ok(());
                }
                s.sent += n;
                let allowed = s.since.elapsed().as_secs_f64() * s.speed as f64;
                let over = s.sent as f64 - allowed;
                if over <= 0.0 {
                    return Ok(());
                }
                s.sent -= n; // counted again on the next round
                Duration::from_secs_f64((over / s.speed as f64).min(0.1))
            };
            self.nap(wait);
            self.check()?;
        }
    }

    /// Mirror and active commit: source and target are in sync
    /// (BLOCK_JOB_READY).
    pub fn set_ready(&self) {
        let mut s = self.lock();
        if s.ready {
            return;
        }
        s.ready = true;
        let s = self.job.set_status(s, Status::Ready);
        drop(s);
        self.job.emit(Event::Ready(self.job.info()));
    }

    /// A ready job should stop copying: `block-job-complete` (pivot) or
    /// a cancel without `force` (keep the target as a point-in-time copy).
    pub fn should_finish(&self) -> bool {
        let s = self.lock();
        s.ready && (s.complete || s.cancelled)
    }

    /// True if the job finishes by `block-job-complete`, false if by a
    /// cancel (no pivot).
    pub fn completing(&self) -> bool {
        let s = self.lock();
        s.complete && !s.cancelled
    }

    /// Apply the job's error policy to a failed read (of the source) or
    /// write (of the target): `Ok(true)` to try again (after a `stop`
    /// and a resume), `Ok(false)` to go on without it (`ignore`), or the
    /// failure (`report`).
    pub fn on_error(&self, write: bool, e: &BlockError) -> Result<bool, Failure> {
        let a = if write {
            self.job.opts.on_target_error
        } else {
            self.job.opts.on_source_error
        };
        let a = match a {
            ErrorAction::Enospc if e.errno() == libc::ENOSPC => ErrorAction::Stop,
            ErrorAction::Enospc => ErrorAction::Report,
            a => a,
        };
        if a == ErrorAction::Stop {
            // Stopped before anyone hears of it, so a query after the
            // event sees the job paused.
            let mut s = self.lock();
            s.error_paused = true;
            s.io_failed = true;
        }
        self.job.emit(Event::Error {
            id: self.job.id.clone(),
            write,
            action: a,
        });
        match a {
            ErrorAction::Ignore => Ok(false),
            ErrorAction::Stop => {
                self.check()?;
                Ok(true)
            }
            _ => Err(Failure::Error(e.to_string())),
        }
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.job.id
    }
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, e: Event) {
        if let Some(j) = self.jobs.upgrade() {
            j.emit(e);
        }
    }

    /// Change the status (and tell), keeping the lock.
    fn set_status<'a>(&'a self, mut s: MutexGuard<'a, State>, to: Status) -> MutexGuard<'a, State> {
        if s.status == to {
            return s;
        }
        s.status = to;
        drop(s);
        self.emit(Event::StatusChange {
            id: self.id.clone(),
            status: to,
        });
        self.cv.notify_all();
        self.lock()
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A snapshot for QMP.
    pub fn info(&self) -> Info {
        let s = self.lock();
        Info {
            id: self.id.clone(),
            kind: self.kind,
            status: s.status,
            offset: s.offset,
            len: s.len,
            speed: s.speed,
            busy: matches!(s.status, Status::Running | Status::Ready),
            paused: s.user_pauses > 0 || s.error_paused,
            ready: s.ready,
            auto_finalize: self.opts.auto_finalize,
            auto_dismiss: self.opts.auto_dismiss,
            io_failed: s.io_failed,
            error: s.error.clone(),
        }
    }

    fn refuse(&self, s: &State, verb: &str) -> JobError {
        JobError::Generic(format!(
            "Job '{}' in state '{}' cannot accept command verb '{verb}'",
            self.id,
            s.status.name()
        ))
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, speed: i64) -> Result<(), JobError> {
        if speed < 0 {
            return Err(JobError::Generic(
                "Parameter 'speed' expects a non-negative value".into(),
            ));
        }
        let mut s = self.lock();
        if matches!(s.status, Status::Concluded | Status::Null) {
            return Err(self.refuse(&s, "set-speed"));
        }
        s.speed = speed as u64;
        s.since = Instant::now();
        s.sent = 0;
        drop(s);
        self.cv.notify_all();
        Ok(())
    }

    /// `block-job-pause` / `job-pause`.
    pub fn pause(&self) -> Result<(), JobError> {
        let mut s = self.lock();
        if !matches!(
            s.status,
            Status::Created | Status::Running | Status::Paused | Status::Ready | Status::Standby
        ) {
            return Err(self.refuse(&s, "pause"));
        }
        s.user_pauses += 1;
        Ok(())
    }

    /// `block-job-resume` / `job-resume`: ends a user pause, or an error
    /// stop.
    pub fn resume(&self) -> Result<(), JobError> {
        let mut s = self.lock();
        if !matches!(
            s.status,
            Status::Created | Status::Running | Status::Paused | Status::Ready | Status::Standby
        ) {
            return Err(self.refuse(&s, "resume"));
        }
        if s.user_pauses == 0 && !s.error_paused {
            return Err(JobError::Generic(
                "Can't resume a job that was not paused".into(),
            ));
        }
        if s.error_paused {
            s.error_paused = false;
            s.io_failed = false;
        } else {
            s.user_pauses -= 1;
        }
        drop(s);
        self.cv.notify_all();
        Ok(())
    }

    /// `block-job-cancel` / `job-cancel`.
    pub fn cancel(&self, force: bool) -> Result<(), JobError> {
        let mut s = self.lock();
        if matches!(
            s.status,
            Status::Concluded | Status::Null | Status::Aborting
        ) {
            return Err(self.refuse(&s, "cancel"));
        }
        s.cancelled = true;
        s.force |= force;
        // A cancel also ends pauses, so the job can get out.
        s.user_pauses = 0;
        s.error_paused = false;
        drop(s);
        self.cv.notify_all();
        Ok(())
    }

    /// `block-job-complete` / `job-complete`.
    pub fn complete(&self) -> Result<(), JobError> {
        let mut s = self.lock();
        if !matches!(s.status, Status::Ready | Status::Standby) || s.cancelled {
            if !s.ready && matches!(s.status, Status::Running | Status::Paused | Status::Created) {
                return Err(JobError::Generic(format!(
                    "Job '{}' in state '{}' cannot accept command verb 'complete'",
                    self.id,
                    s.status.name()
                )));
            }
            return Err(self.refuse(&s, "complete"));
        }
        s.complete = true;
        drop(s);
        self.cv.notify_all();
        Ok(())
    }

    /// `job-finalize`.
    pub fn finalize(&self) -> Result<(), JobError> {
        let mut s = self.lock();
        if s.status != Status::Pending {
            return Err(self.refuse(&s, "finalize"));
        }
        s.finalize = true;
        drop(s);
        self.cv.notify_all();
        Ok(())
    }

    /// The job thread.
    fn main(self: Arc<Self>, driver: Box<dyn JobDriver>) {
        let ctl = Ctl { job: self.clone() };
        let s = self.lock();
        drop(self.set_status(s, Status::Running));
        let mut r = driver.run(&ctl);
        let soft_cancel = {
            let s = self.lock();
            s.cancelled && s.ready && !s.force
        };
        if r.is_ok() {
            let s = self.lock();
            let s = self.set_status(s, Status::Waiting);
            let mut s = self.set_status(s, Status::Pending);
            if !self.opts.auto_finalize {
                while !s.finalize && (!s.cancelled || soft_cancel) {
                    s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                if s.cancelled && !soft_cancel {
                    r = Err(Failure::Cancelled);
                }
            }
            drop(s);
            if r.is_ok() {
                r = driver.commit(&ctl);
            }
        }
        let cancelled = matches!(r, Err(Failure::Cancelled));
        if let Err(f) = &r {
            let s = self.lock();
            let mut s = self.set_status(s, Status::Aborting);
            if let Failure::Error(e) = f {
                s.error = Some(e.clone());
            }
            drop(s);
            driver.abort();
        }
        driver.clean();
        drop(driver);
        let info = self.info();
        if cancelled {
            self.emit(Event::Cancelled(info));
        } else {
            self.emit(Event::Completed(info));
        }
        let s = self.lock();
        let s = self.set_status(s, Status::Concluded);
        drop(s);
        if self.opts.auto_dismiss {
            self.dismiss_now();
        }
    }

    fn dismiss_now(&self) {
        // Gone from the table before anyone hears it is.
        if let Some(j) = self.jobs.upgrade() {
            j.map().remove(&self.id);
        }
        let s = self.lock();
        drop(self.set_status(s, Status::Null));
    }

    /// `job-dismiss`.
    pub fn dismiss(&self) -> Result<(), JobError> {
        let s = self.lock();
        if s.status != Status::Concluded {
            return Err(self.refuse(&s, "dismiss"));
        }
        drop(s);
        self.dismiss_now();
        Ok(())
    }

    /// Wait until the job has concluded (tests, shutdown).
    pub fn wait_concluded(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while !matches!(s.status, Status::Concluded | Status::Null) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// Every job of the process, by id.
#[derive(Default)]
pub struct Jobs {
    map: Mutex<BTreeMap<String, Arc<Job>>>,
    sink: Mutex<Option<EventSink>>,
}

impl Jobs {
    /// No jobs yet.
    pub fn new() -> Arc<Jobs> {
        Arc::new(Jobs::default())
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Job>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, e: Event) {
        let sink = self.sink.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(f) = sink {
            f(e);
        }
    }

    /// Send events to `f`.
    pub fn set_sink(&self, f: EventSink) {
        *self.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// True if `id` names a job.
    pub fn exists(&self, id: &str) -> bool {
        self.map().contains_key(id)
    }

    /// Start `driver` as job `id`.
    pub fn start(
        self: &Arc<Self>,
        id: &str,
        kind: Kind,
        opts: JobOptions,
        driver: Box<dyn JobDriver>,
    ) -> Result<Arc<Job>, JobError> {
        let mut map = self.map();
        if map.contains_key(id) {
            return Err(JobError::Generic(format!("Job ID '{id}' already in use")));
        }
        if !crate::graph::valid_id(id) {
            return Err(JobError::Generic(format!("Invalid job ID '{id}'")));
        }
        let job = Arc::new(Job {
            id: id.to_string(),
            kind,
            state: Mutex::new(State {
                status: Status::Created,
                user_pauses: 0,
                error_paused: false,
                cancelled: false,
                force: false,
                complete: false,
                finalize: false,
                ready: false,
                speed: opts.speed,
                offset: 0,
                len: 0,
                error: None,
                io_failed: false,
                since: Instant::now(),
                sent: 0,
            }),
            opts,
            cv: Condvar::new(),
            jobs: Arc::downgrade(self),
        });
        map.insert(id.to_string(), job.clone());
        drop(map);
        self.emit(Event::StatusChange {
            id: id.to_string(),
            status: Status::Created,
        });
        let j = job.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || j.main(driver));
        if let Err(e) = spawned {
            self.map().remove(id);
            return Err(JobError::Generic(format!(
                "Could not start job '{id}': {e}"
            )));
        }
        Ok(job)
    }

    /// The job `id`; block-job-* commands' error when there is none.
    pub fn block_job(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(format!("Block job '{id}' not found")))
    }

    /// The job `id`; job-* commands' error when there is none.
    pub fn job(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::Generic(format!("Job not found: '{id}'")))
    }

    /// Every job, by id.
    pub fn list(&self) -> Vec<Info> {
        let jobs: Vec<Arc<Job>> = self.map().values().cloned().collect();
        jobs.iter().map(|j| j.info()).collect()
    }

    /// One message per job still alive (neither concluded nor gone): a
    /// job writes into nodes that live migration would hand over to the
    /// destination, which does not get the job, so it blocks migration
    /// until it finishes or is cancelled.
    pub fn migration_blockers(&self) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|j| !matches!(j.status, Status::Concluded | Status::Null))
            .map(|j| {
                format!(
                    "Block job '{}' ({}) is {}: live migration needs it finished or cancelled",
                    j.id,
                    j.kind.name(),
                    j.status.name()
                )
            })
            .collect()
    }

    /// Cancel every job and wait for them (shutdown).
    pub fn cancel_all(&self, timeout: Duration) {
        let jobs: Vec<Arc<Job>> = self.map().values().cloned().collect();
        for j in &jobs {
            let _ = j.cancel(true);
        }
        for j in &jobs {
            j.wait_concluded(timeout);
        }
    }
}
