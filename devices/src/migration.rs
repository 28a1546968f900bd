//! Device state for live migration (Strata to Strata; QEMU's "vmstate"
//! in spirit, not its wire format). A device that can migrate says what
//! its guest-visible state is as a serde value ([`DeviceState`]); the
//! machine registers it under a stable id and the `vmm` crate's migration
//! stream carries it, versioned, to the destination, where a device built
//! from the same command line takes it over. Devices that cannot migrate
//! are never silently left out: the machine turns them into migration
//! blockers that name them.
//!
//! Order on the destination: every section is loaded ([`DeviceState::load_state`]),
//! then every device's [`DeviceState::post_load`] runs (re-derive what is
//! computed from the state: interrupt lines, decoded windows, routes),
//! and when the VM runs, [`DeviceState::resume`] (re-issue I/O that was
//! halted or in flight on the source, as QEMU's IDE/AHCI retry on VM
//! start).

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Mutex;

/// A device whose state can move to another process.
pub trait DeviceState {
    /// The version of [`DeviceState::State`]'s layout; a destination
    /// refuses versions it does not know.
    const VERSION: u32;
    /// The state, as a plain serde value (`#[serde(deny_unknown_fields)]`
    /// on structs, so that a stream from another layout is refused, not
    /// half read).
    type State: Serialize + DeserializeOwned;
    /// The state now (the VM is stopped and its block I/O drained).
    fn save_state(&self) -> Self::State;
    /// Take over `s` (written by `VERSION` `version`). Everything that
    /// comes from the stream is untrusted: bad values are refused with a
    /// message, never a panic.
    fn load_state(&mut self, s: Self::State, version: u32) -> Result<(), String>;
    /// After every device has loaded: re-derive what follows from the
    /// state (interrupt line levels, decode windows, routes).
    fn post_load(&mut self) {}
    /// The VM runs again on this side after a load: re-issue the I/O the
    /// source had halted or in flight.
    fn resume(&mut self) {}
}

/// The object-safe face of a [`DeviceState`] device, as the machine's
/// registry holds it (`Arc<Mutex<T>>` coerces to `Arc<dyn Migratable>`).
pub trait Migratable: Send + Sync {
    /// [`DeviceState::VERSION`].
    fn version(&self) -> u32;
    /// The state, encoded (JSON).
    fn save(&self) -> Result<Vec<u8>, String>;
    /// Decode and load a state of `version`.
    fn load(&self, version: u32, bytes: &[u8]) -> Result<(), String>;
    /// [`DeviceState::post_load`].
    fn post_load(&self);
    /// [`DeviceState::resume`].
    fn resume(&self);
}

impl<T: DeviceState + Send> Migratable for Mutex<T> {
    fn version(&self) -> u32 {
        T::VERSION
    }
    fn save(&self) -> Result<Vec<u8>, String> {
        let g = self.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::to_vec(&g.save_state()).map_err(|e| e.to_string())
    }
    fn load(&self, version: u32, bytes: &[u8]) -> Result<(), String> {
        if version > T::VERSION {
            return Err(format!(
                "version {version} is newer than this Strata's {}",
                T::VERSION
            ));
        }
        let s: T::State = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .load_state(s, version)
    }
    fn post_load(&self) {
        self.lock().unwrap_or_else(|e| e.into_inner()).post_load()
    }
    fn resume(&self) {
        self.lock().unwrap_or_else(|e| e.into_inner()).resume()
    }
}

/// A device with no state of its own (a port that forwards to another
/// device): registered so that the machine knows it was not forgotten.
pub struct Stateless;

impl Migratable for Stateless {
    fn version(&self) -> u32 {
        1
    }
    fn save(&self) -> Result<Vec<u8>, String> {
        Ok(b"null".to_vec())
    }
    fn load(&self, _version: u32, bytes: &[u8]) -> Result<(), String> {
        match bytes {
            b"null" => Ok(()),
            _ => Err("a stateless device got state".into()),
        }
    }
    fn post_load(&self) {}
    fn resume(&self) {}
}

/// For device tests: moves `a`'s state into `b` as the stream would (JSON,
/// load, post-load) and checks that `b` now saves the same state.
#[cfg(test)]
pub(crate) fn round_trip<T: DeviceState>(a: &T, b: &mut T) {
    let bytes = serde_json::to_vec(&a.save_state()).unwrap();
    let s: T::State = serde_json::from_slice(&bytes).unwrap();
    b.load_state(s, T::VERSION).unwrap();
    b.post_load();
    let again = serde_json::to_vec(&b.save_state()).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&again),
        String::from_utf8_lossy(&bytes),
        "the destination saves what the source did"
    );
}

/// For device tests: `a`'s state as JSON, changed by `edit`, loaded into
/// `b`; the error (the test fails if the load succeeds).
#[cfg(test)]
pub(crate) fn load_edited<T: DeviceState>(
    a: &T,
    b: &mut T,
    edit: impl FnOnce(&mut serde_json::Value),
) -> String {
    let mut v = serde_json::to_value(a.save_state()).unwrap();
    edit(&mut v);
    match serde_json::from_value::<T::State>(v) {
        Err(e) => e.to_string(),
        Ok(s) => match b.load_state(s, T::VERSION) {
            Err(e) => e,
            Ok(()) => panic!("a hostile state was accepted"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        v: u8,
        derived: u8,
    }

    impl DeviceState for Reg {
        const VERSION: u32 = 1;
        type State = u8;
        fn save_state(&self) -> u8 {
            self.v
        }
        fn load_state(&mut self, s: u8, _version: u32) -> Result<(), String> {
            self.v = s;
            Ok(())
        }
        fn post_load(&mut self) {
            self.derived = self.v * 2;
        }
    }

    #[test]
    fn a_state_moves_through_the_object_safe_face() {
        let a = Mutex::new(Reg { v: 7, derived: 0 });
        let b = Mutex::new(Reg::default());
        let (src, dst): (&dyn Migratable, &dyn Migratable) = (&a, &b);
        let bytes = src.save().unwrap();
        dst.load(src.version(), &bytes).unwrap();
        dst.post_load();
        assert_eq!(b.lock().unwrap().derived, 14);
        assert!(dst.load(2, &bytes).is_err(), "a newer version is refused");
        assert!(dst.load(1, b"{").is_err());
    }
}
