//! The floppy disk controller (an i82078, as QEMU's `isa-fdc`):
//! [`i82078`] the controller, [`command`] its command phase (lengths and
//! typed commands), [`drive`] the drives and their diskettes,
//! [`geometry`] the diskette formats and drive types. Its DMA goes
//! through `legacy::isa_dma`.

pub mod command;
pub mod drive;
pub mod geometry;
pub mod i82078;
