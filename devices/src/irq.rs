//! Interrupt lines as devices see them.
//!
//! A device holds an [`IrqLine`] per pin and drives its level. The `vmm`
//! crate implements it with KVM_IRQ_LINE on the in-kernel irqchip, and the
//! qtest accelerator implements it by recording levels and reporting changes.

use std::sync::Arc;

pub trait IrqLine: Send + Sync {
    fn set_level(&self, level: bool);

    /// An edge on an edge-triggered ISA line: raise, then lower.
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// A line that goes nowhere, for devices whose interrupt is not wired.
pub struct NoIrq;
impl IrqLine for NoIrq {
    fn set_level(&self, _: bool) {}
}

/// Hands out interrupt lines by GSI number.
pub trait IrqChip: Send + Sync {
    fn line(&self, gsi: u32) -> Arc<dyn IrqLine>;
}
