//! Legacy ISA devices of the PC: RTC/CMOS, fw_cfg, the i8042 keyboard
//! controller, the 16550 UART, isa-debugcon, port 0x92 and the ISA DMA
//! controllers (which the floppy controller will use).

pub mod cmos;
pub mod debugcon;
pub mod fw_cfg;
pub mod i8042;
pub mod isa_dma;
pub mod port92;
pub mod serial;
