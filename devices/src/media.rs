//! Removable media as the monitor sees them (QMP `eject`,
//! `blockdev-open-tray`, `blockdev-change-medium`, ...): a drive whose
//! backend can hold a medium or none, with or without a tray. CD-ROMs
//! have a tray the guest may lock; floppy drives have none, so their
//! medium can be taken out and put in at any time.

use std::sync::Arc;

use block::backend::BlockBackend;

/// Called with `true` when the tray opens, `false` when it closes.
pub type TrayListener = Box<dyn Fn(bool) + Send + Sync>;

pub trait Removable: Send + Sync {
    /// The drive's backend, which holds the medium (if any).
    fn backend(&self) -> Option<Arc<BlockBackend>>;
    /// Whether the drive has a tray (`tray_open` in `query-block`).
    fn has_tray(&self) -> bool;
    /// A trayless drive counts as always open: its medium may change.
    fn tray_open(&self) -> bool;
    fn locked(&self) -> bool;
    /// The host opens the tray; `false` when the guest's lock refused it
    /// (the guest was asked to eject instead). Trayless: always `true`.
    fn host_open_tray(&self, force: bool) -> bool;
    fn host_close_tray(&self);
    /// DEVICE_TRAY_MOVED; never called on a trayless drive.
    fn set_tray_listener(&self, l: TrayListener);
}
