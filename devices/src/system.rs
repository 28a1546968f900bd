//! Requests a device makes of the machine as a whole (reset, power-off).

/// Implemented by the VMM. Devices such as the reset control register, port
/// 0x92 and the keyboard controller call it when the guest asks for a reset.
pub trait SystemControl: Send + Sync {
    fn request_reset(&self);
    fn request_shutdown(&self);
    /// The guest ejected PCI `slot` (ACPI `_EJ0`): the machine removes the
    /// devices there.
    fn request_pci_eject(&self, _slot: u8) {}
}

/// For tests and tools that run devices without a machine around them.
pub struct NoSystem;
impl SystemControl for NoSystem {
    fn request_reset(&self) {}
    fn request_shutdown(&self) {}
}
