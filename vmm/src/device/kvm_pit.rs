//! `kvm-pit`: the in-kernel i8254 timer (KVM_CREATE_PIT2). The board
//! builds it; `-global kvm-pit.lost_tick_policy=discard|delay` chooses what
//! KVM does with ticks the guest could not take in time, as on QEMU.

use super::bus::{BusKind, Placement};
use super::props::{PropDef, PropType};
use super::{AttachCtx, Category, Device, DeviceType};

const POLICIES: PropType = PropType::Enum {
    name: "LostTickPolicy",
    values: &["discard", "delay"],
};

pub static KVM_PIT: DeviceType = DeviceType {
    name: "kvm-pit",
    aliases: &[],
    category: Category::Misc,
    bus: BusKind::Isa,
    desc: "",
    user_creatable: false,
    props: &[
        PropDef::new("iobase", PropType::U32, "")
            .default("0x40")
            .ignored(),
        // delay (QEMU's default): KVM injects every missed tick, back to
        // back, so a guest that counts ticks keeps its time. discard drops
        // them: a guest too slow for the tick rate (ring 0 emulated
        // instruction by instruction on a loaded host) then still takes
        // its lower-priority interrupts, which a permanent backlog of
        // timer ticks would starve.
        PropDef::new("lost_tick_policy", POLICIES, "").default("delay"),
    ],
    create,
};

fn create(_: &mut AttachCtx, _: &Device, _: Placement) -> Result<(), String> {
    Err("kvm-pit is part of the board".into())
}

/// Whether KVM reinjects lost ticks (`lost_tick_policy=delay`).
pub fn reinject(globals: &[super::Global]) -> bool {
    super::board_props(&KVM_PIT, globals).str("lost_tick_policy") != Some("discard")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_reinjected_unless_discarded() {
        assert!(reinject(&[]));
        let g = |v: &str| super::super::parse_global(&format!("kvm-pit.lost_tick_policy={v}"));
        assert!(reinject(&[g("delay").unwrap()]));
        assert!(!reinject(&[g("discard").unwrap()]));
        assert!(g("slew").is_err());
    }
}
