//! Legacy ISA devices of the PC: RTC/CMOS, fw_cfg, the i8042 keyboard
//! controller, the 16550 UART, isa-debugcon and port 0x92. ISA DMA joins
//! them with the floppy controller.

pub mod cmos;
pub mod debugcon;
pub mod fw_cfg;
pub mod i8042;
pub mod port92;
pub mod serial;
