//! The `blkdebug` filter: error injection (QEMU's `block/blkdebug.c`,
//! `BlockdevOptionsBlkdebug` in the QAPI schema).
//!
//! Supported: the `image` child, `inject-error` rules with `event`,
//! `iotype`, `errno` (default EIO), `sector` (-1: any), `once` and `state`,
//! `set-state` rules (`event`, `state`, `new_state`: the node's state starts
//! at 1, a rule with a `state` applies only in that state), and qemu-io's
//! breakpoints (`break EVENT TAG` holds the next matching request until
//! `resume TAG` or `remove_break TAG`). The data path raises the events
//! `read_aio` (reads), `write_aio` and `pwritev` (writes and write-zeroes),
//! `flush_to_disk` / `flush_to_os` (flushes) and `pwritev_zero`/`discard`
//! for discards. Strata adds `x-skip=N`: the rule lets its first N matching
//! requests through, so "fail the Nth write" is `x-skip=N-1`.
//!
//! For one request, held breakpoints come first, then error rules, then
//! state changes, all judged in the state the request found (as QEMU
//! judges one event's rules in the state before it).

use crate::driver::{BlockDriver, DebugCommand, Extent, IoOp, Limits};
use crate::error::{BlockError, BlockResult};
use crate::graph::OpenCtx;
use crate::keyval::{Options, Value};
use crate::node::Node;
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Clone, Debug)]
struct Rule {
    ops: Vec<IoOp>,
    errno: i32,
    sector: i64,
    once: bool,
    skip: u64,
    /// The state the rule applies in; 0: any.
    state: u64,
}

#[derive(Clone, Debug)]
struct SetState {
    ops: Vec<IoOp>,
    state: u64,
    new_state: u64,
}

#[derive(Clone, Debug)]
struct Breakpoint {
    ops: Vec<IoOp>,
    tag: String,
    state: u64,
}

#[derive(Default)]
struct Inner {
    rules: Vec<Rule>,
    set_states: Vec<SetState>,
    state: u64,
    breakpoints: Vec<Breakpoint>,
    /// Tags of the requests being held, one entry per request.
    suspended: Vec<String>,
}

/// A blkdebug node.
pub struct BlkdebugNode {
    image: Arc<Node>,
    inner: Mutex<Inner>,
    /// Signalled when held requests are released.
    resumed: Condvar,
}

fn applies(rule_state: u64, state: u64) -> bool {
    rule_state == 0 || rule_state == state
}

fn event_ops(event: &str) -> Option<Vec<IoOp>> {
    let wz = IoOp::WriteZeroes { may_unmap: false };
    Some(match event {
        "read_aio" => vec![IoOp::Read],
        "write_aio" | "pwritev" => vec![IoOp::Write, wz],
        "flush_to_disk" | "flush_to_os" => vec![IoOp::Flush],
        "pwritev_zero" => vec![wz],
        "discard" => vec![IoOp::Discard],
        _ if event
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') =>
        {
            vec![]
        }
        _ => return None,
    })
}

fn iotype_op(s: &str) -> Option<IoOp> {
    Some(match s {
        "read" => IoOp::Read,
        "write" => IoOp::Write,
        "write-zeroes" => IoOp::WriteZeroes { may_unmap: false },
        "discard" => IoOp::Discard,
        "flush" => IoOp::Flush,
        _ => return None,
    })
}

fn same_kind(a: IoOp, b: IoOp) -> bool {
    std::mem::discriminant(&a) == std::mem::discriminant(&b)
}

impl BlkdebugNode {
    /// Open from options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let image = ctx.open_child("image")?;
        let mut rules = Vec::new();
        match ctx.opts.take_value("inject-error") {
            None => {}
            Some(Value::List(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    let Value::Map(m) = item else {
                        return Err(ctx
                            .opts
                            .invalid("inject-error", "a list of objects", "a scalar")
                            .into());
                    };
                    let mut o = Options::new(ctx.opts.option(), m);
                    let key = |k: &str| format!("inject-error.{i}.{k}");
                    let event = o.require_str("event").map_err(|_| {
                        BlockError::Open(format!(
                            "blkdebug: parameter '{}' is missing",
                            key("event")
                        ))
                    })?;
                    let mut ops = event_ops(&event).ok_or_else(|| {
                        BlockError::Open(format!("blkdebug: invalid event '{event}'"))
                    })?;
                    if let Some(t) = o.take_str("iotype")? {
                        let op = iotype_op(&t).ok_or_else(|| {
                            BlockError::Open(format!("blkdebug: invalid iotype '{t}'"))
                        })?;
                        ops.retain(|x| same_kind(*x, op));
                    }
                    let errno = o.take_u64("errno")?.unwrap_or(libc::EIO as u64) as i32;
                    let sector = match o.take_str("sector")? {
                        None => -1,
                        Some(s) => s.parse::<i64>().map_err(|_| {
                            BlockError::Open(format!("blkdebug: invalid sector '{s}'"))
                        })?,
                    };
                    let once = o.take_bool("once")?.unwrap_or(false);
                    let _ = o.take_bool("immediately")?;
                    let state = o.take_u64("state")?.unwrap_or(0);
                    let skip = o.take_u64("x-skip")?.unwrap_or(0);
                    o.finish()
                        .map_err(|e| BlockError::Open(format!("blkdebug: {e}")))?;
                    rules.push(Rule {
                        ops,
                        errno,
                        sector,
                        once,
                        skip,
                        state,
                    });
                }
            }
            Some(_) => {
                return Err(ctx
                    .opts
                    .invalid("inject-error", "a list", "a scalar")
                    .into());
            }
        }
        let mut set_states = Vec::new();
        match ctx.opts.take_value("set-state") {
            None => {}
            Some(Value::List(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    let Value::Map(m) = item else {
                        return Err(ctx
                            .opts
                            .invalid("set-state", "a list of objects", "a scalar")
                            .into());
                    };
                    let mut o = Options::new(ctx.opts.option(), m);
                    let missing = |k: &str| {
                        BlockError::Open(format!(
                            "blkdebug: parameter 'set-state.{i}.{k}' is missing"
                        ))
                    };
                    let event = o.require_str("event").map_err(|_| missing("event"))?;
                    let ops = event_ops(&event).ok_or_else(|| {
                        BlockError::Open(format!("blkdebug: invalid event '{event}'"))
                    })?;
                    let state = o.take_u64("state")?.unwrap_or(0);
                    let new_state = o
                        .take_u64("new_state")?
                        .ok_or_else(|| missing("new_state"))?;
                    o.finish()
                        .map_err(|e| BlockError::Open(format!("blkdebug: {e}")))?;
                    set_states.push(SetState {
                        ops,
                        state,
                        new_state,
                    });
                }
            }
            Some(_) => {
                return Err(ctx.opts.invalid("set-state", "a list", "a scalar").into());
            }
        }
        // A size, as QEMU takes it (`align=4k`); requests need no
        // alignment here, so it only has to be valid.
        let _ = ctx.opts.take_size("align", 1)?;
        Ok(Arc::new(BlkdebugNode {
            image,
            inner: Mutex::new(Inner {
                rules,
                set_states,
                state: 1,
                ..Inner::default()
            }),
            resumed: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, op: IoOp, offset: u64, len: u64) -> BlockResult<()> {
        let mut inner = self.lock();
        // A breakpoint holds this request (on the pool thread running it)
        // until qemu-io releases its tag; it fires once.
        let state = inner.state;
        if let Some(i) = inner
            .breakpoints
            .iter()
            .position(|b| applies(b.state, state) && b.ops.iter().any(|o| same_kind(*o, op)))
        {
            let tag = inner.breakpoints.remove(i).tag;
            inner.suspended.push(tag.clone());
            while inner.suspended.contains(&tag) {
                inner = self.resumed.wait(inner).unwrap_or_else(|e| e.into_inner());
            }
        }
        let state = inner.state;
        // Every matching set-state is applied in order, so the last wins.
        if let Some(next) = inner
            .set_states
            .iter()
            .filter(|st| applies(st.state, state) && st.ops.iter().any(|o| same_kind(*o, op)))
            .map(|st| st.new_state)
            .next_back()
        {
            inner.state = next;
        }
        let rules = &mut inner.rules;
        let mut hit = None;
        for (i, r) in rules.iter_mut().enumerate() {
            if !applies(r.state, state) {
                continue;
            }
            if !r.ops.iter().any(|o| same_kind(*o, op)) {
                continue;
            }
            if r.sector >= 0 {
                let s = (r.sector as u64).saturating_mul(512);
                if !(s < offset.saturating_add(len.max(1)) && offset < s.saturating_add(512)) {
                    continue;
                }
            }
            if r.skip > 0 {
                r.skip -= 1;
                continue;
            }
            hit = Some((i, r.errno, r.once));
            break;
        }
        if let Some((i, errno, once)) = hit {
            if once {
                rules.remove(i);
            }
            return Err(BlockError::io(errno, "blkdebug: injected error"));
        }
        Ok(())
    }
}

impl BlockDriver for BlkdebugNode {
    /// A filter: it keeps no image metadata.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    /// Nothing of its own depends on the mode; the node reopens the child.
    fn reopen(&self, _read_only: bool) -> BlockResult<()> {
        Ok(())
    }
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }
    fn len(&self) -> u64 {
        self.image.len()
    }
    fn limits(&self) -> Limits {
        self.image.limits()
    }
    fn filename(&self) -> Option<String> {
        self.image.filename()
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        self.check(IoOp::Read, offset, crate::iov::total_len_mut(iov) as u64)?;
        self.image.read_vectored(offset, iov)
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        self.check(IoOp::Write, offset, crate::iov::total_len(iov) as u64)?;
        self.image.write_vectored(offset, iov, fua)
    }
    fn flush(&self) -> BlockResult<()> {
        self.check(IoOp::Flush, 0, 0)?;
        self.image.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check(IoOp::Discard, offset, len)?;
        self.image.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> BlockResult<()> {
        self.check(IoOp::WriteZeroes { may_unmap }, offset, len)?;
        self.image.write_zeroes(offset, len, may_unmap, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.image.block_status(offset, len)
    }
    fn truncate(&self, len: u64) -> BlockResult<()> {
        self.image.truncate(len)
    }
    fn debug_command(&self, cmd: &DebugCommand) -> Option<Result<(), i32>> {
        let mut inner = self.lock();
        Some(match cmd {
            DebugCommand::Break { event, tag } => match event_ops(event) {
                Some(ops) => {
                    let state = inner.state;
                    inner.breakpoints.push(Breakpoint {
                        ops,
                        tag: tag.clone(),
                        state,
                    });
                    Ok(())
                }
                None => Err(libc::ENOENT),
            },
            DebugCommand::Resume { tag } => {
                let before = inner.suspended.len();
                inner.suspended.retain(|t| t != tag);
                if inner.suspended.len() == before {
                    Err(libc::ENOENT)
                } else {
                    self.resumed.notify_all();
                    Ok(())
                }
            }
            DebugCommand::RemoveBreak { tag } => {
                let before = inner.suspended.len() + inner.breakpoints.len();
                inner.breakpoints.retain(|b| &b.tag != tag);
                inner.suspended.retain(|t| t != tag);
                self.resumed.notify_all();
                if inner.suspended.len() + inner.breakpoints.len() == before {
                    Err(libc::ENOENT)
                } else {
                    Ok(())
                }
            }
        })
    }
}
