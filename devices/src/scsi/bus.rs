//! A parallel SCSI bus as an HBA sees it (SAM-5 4.6: a SCSI domain of
//! target ports, each with logical units): the targets by SCSI id, shared
//! between the HBA emulation (LSI 53C895A, virtio-scsi, later USB UAS)
//! and the VMM, which attaches `scsi-hd`/`scsi-cd` units to it at start
//! and on hotplug.
//!
//! An HBA addresses a command to (id, LUN) and gets the same answers
//! whatever its transport: the target's own commands (REPORT LUNS),
//! the unit's, the absent-LUN answers of a present target, and "no such
//! target" for an id nobody holds, which each transport reports in its
//! own way (a selection timeout on the LSI, BAD_TARGET on virtio-scsi).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::lun::{Lun, Plan};
use super::request::{DataPath, Outcome, Request};
use super::target::Target;

/// The targets of one bus.
pub struct ScsiBus {
    /// Ids the bus has: 0..=max_id.
    max_id: u32,
    targets: RwLock<BTreeMap<u32, Target>>,
}

impl ScsiBus {
    /// A bus with target ids 0..=`max_id`.
    pub fn new(max_id: u32) -> Self {
        ScsiBus {
            max_id,
            targets: RwLock::new(BTreeMap::new()),
        }
    }

    /// The largest target id.
    pub fn max_id(&self) -> u32 {
        self.max_id
    }

    /// Attaches `unit` as `lun` of target `id` (creating the target).
    pub fn attach(&self, id: u32, lun: u64, unit: Arc<dyn Lun>) -> Result<(), String> {
        if id > self.max_id {
            return Err(format!(
                "scsi-id={id} is above the bus's largest id ({})",
                self.max_id
            ));
        }
        let mut t = self.targets.write().unwrap_or_else(|e| e.into_inner());
        t.entry(id)
            .or_default()
            .attach(lun, unit)
            .map_err(|e| format!("scsi-id={id}: {e}"))
    }

    /// Detaches `lun` of target `id`; the target goes when its last unit
    /// does.
    pub fn detach(&self, id: u32, lun: u64) -> Option<Arc<dyn Lun>> {
        let mut t = self.targets.write().unwrap_or_else(|e| e.into_inner());
        let target = t.get_mut(&id)?;
        let unit = target.detach(lun);
        if target.luns().next().is_none() {
            t.remove(&id);
        }
        unit
    }

    /// Whether a target answers at `id`.
    pub fn has_target(&self, id: u32) -> bool {
        self.read().contains_key(&id)
    }

    /// The unit at (`id`, `lun`).
    pub fn lun(&self, id: u32, lun: u64) -> Option<Arc<dyn Lun>> {
        self.read().get(&id).and_then(|t| t.lun(lun).cloned())
    }

    /// Resets every unit of target `id` (a target reset, an I_T nexus
    /// loss); `false` if there is no such target.
    pub fn reset_target(&self, id: u32) -> bool {
        match self.read().get(&id) {
            Some(t) => {
                t.reset();
                true
            }
            None => false,
        }
    }

    /// Resets every unit on the bus (a SCSI bus reset, an HBA reset).
    pub fn reset(&self) {
        for t in self.read().values() {
            t.reset();
        }
    }

    /// Executes `cdb` for (`id`, `lun`) and carries it out over `path`;
    /// `done` may run before this returns, so the caller must not hold
    /// locks `done` takes. With no target at `id`, nothing runs and the
    /// path and `done` come back, for the transport's own answer.
    pub fn start<P, F>(
        &self,
        id: u32,
        lun: u64,
        cdb: &[u8],
        path: P,
        done: F,
    ) -> Result<Request, (P, F)>
    where
        P: DataPath,
        F: FnOnce(Outcome, P) + Send + 'static,
    {
        // Plan under the lock, run outside it: `done` may attach or detach
        // (a hotplug answered from a completion) without deadlocking.
        let (unit, plan) = {
            let t = self.read();
            let Some(target) = t.get(&id) else {
                return Err((path, done));
            };
            (target.lun(lun).cloned(), target.execute(lun, cdb))
        };
        Ok(super::request::start(unit, plan, path, done))
    }

    /// Executes `cdb` for (`id`, `lun`) without carrying the plan out: the
    /// unit (for [`super::request::run`]) and its [`Plan`], for transports
    /// whose data phases come piecewise (the LSI 53C895A's block moves);
    /// `None` with no target at `id`.
    pub fn plan(&self, id: u32, lun: u64, cdb: &[u8]) -> Option<(Option<Arc<dyn Lun>>, Plan)> {
        let t = self.read();
        let target = t.get(&id)?;
        Some((target.lun(lun).cloned(), target.execute(lun, cdb)))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Target>> {
        self.targets.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::request::{Status, VecPath};
    use std::sync::mpsc;

    fn disk() -> Arc<dyn Lun> {
        let d = crate::scsi::Disk::new(crate::scsi::testutil::null(1 << 20), Default::default());
        Arc::new(d.unwrap())
    }

    fn run(bus: &ScsiBus, id: u32, lun: u64, cdb: &[u8], len: usize) -> Option<(Outcome, Vec<u8>)> {
        let (tx, rx) = mpsc::channel();
        match bus.start(id, lun, cdb, VecPath::new(len), move |o, p| {
            let _ = tx.send((o, p.buf));
        }) {
            Err(_) => None,
            Ok(_) => Some(rx.recv().unwrap()),
        }
    }

    #[test]
    fn targets_come_and_go_with_their_units() {
        let bus = ScsiBus::new(7);
        assert!(bus.attach(8, 0, disk()).is_err(), "id above the bus");
        bus.attach(3, 0, disk()).unwrap();
        bus.attach(3, 2, disk()).unwrap();
        assert!(bus.attach(3, 2, disk()).is_err(), "LUN in use");
        assert!(bus.has_target(3) && !bus.has_target(2));
        assert!(run(&bus, 2, 0, &[0, 0, 0, 0, 0, 0], 0).is_none());
        // The power-on UNIT ATTENTION first, then GOOD.
        let (o, _) = run(&bus, 3, 0, &[0, 0, 0, 0, 0, 0], 0).unwrap();
        assert!(matches!(o.status, Status::CheckCondition(s) if s.key == 6));
        let (o, _) = run(&bus, 3, 0, &[0, 0, 0, 0, 0, 0], 0).unwrap();
        assert_eq!(o.status, Status::Good);
        // A present target answers for an absent LUN itself.
        let (o, _) = run(&bus, 3, 1, &[0, 0, 0, 0, 0, 0], 0).unwrap();
        assert!(matches!(o.status, Status::CheckCondition(_)));
        assert!(bus.detach(3, 0).is_some());
        assert!(bus.has_target(3));
        assert!(bus.detach(3, 2).is_some());
        assert!(!bus.has_target(3));
    }

    #[test]
    fn inquiry_through_the_bus() {
        let bus = ScsiBus::new(255);
        bus.attach(0, 0, disk()).unwrap();
        let (o, data) = run(&bus, 0, 0, &[0x12, 0, 0, 0, 36, 0], 36).unwrap();
        assert_eq!(o.status, Status::Good);
        assert_eq!(data[0] & 0x1f, 0, "direct-access device");
        assert_eq!(&data[8..12], b"QEMU");
    }
}
