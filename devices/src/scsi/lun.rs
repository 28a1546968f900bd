//! What a logical unit offers a transport (SAM-5 4.6 "logical unit"): the
//! [`Lun`] trait, the typed [`Plan`] a command turns into, and the sense
//! bookkeeping (SPC-4 5.12 autosense and REQUEST SENSE, 5.14 UNIT
//! ATTENTION) that every unit shares through [`SenseKeeper`].
//!
//! Executing a CDB never performs I/O: [`Lun::execute`] parses it
//! ([`Command::parse`]), checks it against the unit's state and answers
//! with a plan: data for the initiator, a byte range of the medium to read
//! or write, a flush, ranges to unmap, a parameter list to fetch first, or
//! CHECK CONDITION. The shared runner ([`super::request`]) or a transport of
//! its own (IDE's ATAPI DMA engine) carries the plan out and reports
//! failures back through [`Lun::io_failed`], so that REQUEST SENSE sees them.

use std::sync::Arc;

use block::backend::BlockBackend;

use super::cdb::Command;
use super::sense::Sense;

/// What a command turned into.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// GOOD status, no data.
    Good,
    /// GOOD status with data for the initiator (already cut to the
    /// allocation length).
    DataIn(Vec<u8>),
    /// GOOD status once `len` bytes at byte `offset` of the unit's
    /// [`Lun::backend`] have been read into the initiator's buffer.
    Read { offset: u64, len: u64 },
    /// GOOD status once `len` bytes of data-out from the initiator have been
    /// written at byte `offset` (durable before completion with `fua`).
    Write { offset: u64, len: u64, fua: bool },
    /// VERIFY with BYTCHK: `len` bytes of data-out must equal the medium at
    /// `offset` (MISCOMPARE otherwise).
    Compare { offset: u64, len: u64 },
    /// WRITE SAME: one block of `block` bytes of data-out, written over
    /// `len` bytes at `offset` (a multiple of `block`). A block of zeroes
    /// becomes a write-zeroes, which may deallocate when `unmap` is set.
    WriteSame {
        offset: u64,
        len: u64,
        block: u32,
        unmap: bool,
    },
    /// Make `len` bytes at `offset` read as zeroes, no data-out (WRITE SAME
    /// with NDOB).
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    /// Make completed writes durable.
    Flush,
    /// Discard the `(offset, len)` byte ranges (UNMAP).
    Discard(Vec<(u64, u64)>),
    /// Fetch `len` bytes of data-out (a parameter list), then continue with
    /// [`Lun::data_out`]`(cmd, data)`, whose plan needs no further data.
    DataOut { len: u32, cmd: Command },
    /// CHECK CONDITION; the unit has kept the sense for REQUEST SENSE.
    Check(Sense),
}

/// The direction of a plan's data phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    None,
    /// Device to initiator.
    In,
    /// Initiator to device.
    Out,
}

impl Plan {
    /// The direction of the data phase.
    pub fn direction(&self) -> Direction {
        match self {
            Plan::DataIn(v) if !v.is_empty() => Direction::In,
            Plan::Read { len, .. } if *len > 0 => Direction::In,
            Plan::Write { len, .. } | Plan::Compare { len, .. } if *len > 0 => Direction::Out,
            Plan::WriteSame { .. } => Direction::Out,
            Plan::DataOut { len, .. } if *len > 0 => Direction::Out,
            _ => Direction::None,
        }
    }

    /// The number of bytes the data phase moves (what SAM-5 calls the
    /// command's transfer length), to compare with the initiator's buffer.
    pub fn data_len(&self) -> u64 {
        match self {
            Plan::DataIn(v) => v.len() as u64,
            Plan::Read { len, .. } | Plan::Write { len, .. } | Plan::Compare { len, .. } => *len,
            Plan::WriteSame { block, .. } => *block as u64,
            Plan::DataOut { len, .. } => *len as u64,
            _ => 0,
        }
    }
}

/// Which part of a plan failed, for [`Lun::io_failed`]. `errno` is the
/// block layer's error number ([`block::error::BlockError::errno`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoFailure {
    Read {
        errno: i32,
    },
    Write {
        errno: i32,
    },
    Flush {
        errno: i32,
    },
    Unmap {
        errno: i32,
    },
    /// VERIFY with BYTCHK found different data.
    Miscompare,
    /// The initiator's buffer is smaller than the data-out the command
    /// needs: the command was not executed.
    Overrun,
}

/// A logical unit, as a transport sees it. Units are shared between the
/// transport's threads and the I/O completions (`Arc<dyn Lun>`), so every
/// method takes `&self`; units keep their state behind a lock that is
/// never held while calling out.
pub trait Lun: Send + Sync {
    /// Parses and executes one CDB. Never performs I/O and never blocks on
    /// it; a CHECK CONDITION plan's sense is kept for REQUEST SENSE.
    fn execute(&self, cdb: &[u8]) -> Plan;

    /// Continues a [`Plan::DataOut`] with the parameter list the initiator
    /// sent (`data` is exactly the `len` bytes asked for). The plan
    /// returned needs no more data-out: GOOD, CHECK CONDITION, a flush or
    /// a discard.
    fn data_out(&self, cmd: &Command, data: &[u8]) -> Plan;

    /// Part of a plan failed; returns the sense to report, and keeps it for
    /// REQUEST SENSE.
    fn io_failed(&self, failure: IoFailure) -> Sense;

    /// A logical unit reset or bus reset (SAM-5 6.3.x): the unit forgets
    /// its sense; what else it does (a UNIT ATTENTION) is its own choice.
    fn reset(&self);

    /// The medium that [`Plan`] offsets refer to, if one is loaded.
    fn backend(&self) -> Option<Arc<BlockBackend>>;
}

/// Sense bookkeeping shared by logical units: the sense of the last
/// command (for REQUEST SENSE) and a pending UNIT ATTENTION.
#[derive(Debug)]
pub struct SenseKeeper {
    sense: Sense,
    unit_attention: Option<Sense>,
}

impl Default for SenseKeeper {
    fn default() -> Self {
        SenseKeeper {
            sense: Sense::NONE,
            unit_attention: None,
        }
    }
}

impl SenseKeeper {
    /// Raises a UNIT ATTENTION, reported by the next command that is not
    /// exempt (or by REQUEST SENSE).
    pub fn set_unit_attention(&mut self, s: Sense) {
        self.unit_attention = Some(s);
    }

    /// Applies UNIT ATTENTION precedence to a parsed command: a pending
    /// condition is reported (and consumed) instead of the command, even an
    /// invalid one, unless the command is exempt (SPC-4 5.14).
    pub fn admit(&mut self, parsed: Result<Command, Sense>) -> Result<Command, Sense> {
        let exempt = parsed
            .as_ref()
            .is_ok_and(|c| c.allowed_with_unit_attention());
        if !exempt {
            if let Some(ua) = self.unit_attention.take() {
                return Err(ua);
            }
        }
        parsed
    }

    /// Records the outcome of a command: a CHECK CONDITION keeps its sense,
    /// anything else clears it (REQUEST SENSE has already consumed it).
    /// This is the one place where execution sets sense.
    pub fn conclude(&mut self, plan: Plan) -> Plan {
        if let Plan::Check(s) = plan {
            self.sense = s;
        } else {
            self.sense = Sense::NONE;
        }
        plan
    }

    /// A failure after execution (I/O, miscompare, overrun): kept for
    /// REQUEST SENSE.
    pub fn failed(&mut self, s: Sense) -> Sense {
        self.sense = s;
        s
    }

    /// Forgets the kept sense (reset).
    pub fn clear(&mut self) {
        self.sense = Sense::NONE;
    }

    /// REQUEST SENSE: a pending UNIT ATTENTION, else the kept sense, else
    /// `idle` (NOT READY without a medium, or NO SENSE); consumes what it
    /// reports.
    pub fn request_sense(&mut self, idle: Option<Sense>) -> Sense {
        let s = self
            .unit_attention
            .take()
            .or_else(|| (self.sense != Sense::NONE).then_some(self.sense))
            .or(idle)
            .unwrap_or(Sense::NONE);
        self.sense = Sense::NONE;
        s
    }
}

/// Data for the initiator, cut to the allocation length.
pub fn data_in(mut v: Vec<u8>, alloc: u32) -> Plan {
    v.truncate(alloc as usize);
    Plan::DataIn(v)
}

/// Copies `s` into `dst`, padded with spaces (SPC-4 4.4.1 ASCII fields).
pub fn pad(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, b) in dst.iter_mut().zip(s.bytes()) {
        *d = b;
    }
}

/// READ CAPACITY(10) parameter data (SBC-3 5.15.2, MMC-5 6.23): the last
/// block's address and the block length. A capacity beyond 32 bits reports
/// FFFFFFFFh, which tells the initiator to use READ CAPACITY(16).
pub fn read_capacity_10(blocks: u64, block_len: u32) -> Plan {
    let last = blocks.saturating_sub(1).min(u32::MAX as u64) as u32;
    let mut v = last.to_be_bytes().to_vec();
    v.extend_from_slice(&block_len.to_be_bytes());
    Plan::DataIn(v)
}
