//! The floppy disk controller (an i82078, as QEMU's `isa-fdc`), being
//! built for issue 19: so far its command phase ([`command`]: command
//! lengths and typed commands) and the diskette formats and drive types
//! ([`geometry`]). The controller's registers and phases, the drives and
//! their wiring into the machines come next; its DMA goes through
//! `legacy::isa_dma`.

pub mod command;
pub mod geometry;
