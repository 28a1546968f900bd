//! `isa-debugcon`: the debug console port (QEMU's, and Bochs's 0xe9 hack).
//! The board builds it from `-debugcon`; `-global isa-debugcon.iobase=`
//! moves it (0x402 is SeaBIOS's log port).

use super::bus::{BusKind, Placement};
use super::props::{PropDef, PropType};
use super::{AttachCtx, Category, Device, DeviceType};

pub static ISA_DEBUGCON: DeviceType = DeviceType {
    name: "isa-debugcon",
    aliases: &[],
    category: Category::Misc,
    bus: BusKind::Isa,
    desc: "",
    // Built from -debugcon; -device needs -chardev, which Strata lacks.
    user_creatable: false,
    props: &[
        PropDef::new("iobase", PropType::U32, "").default("0xe9"),
        PropDef::new(
            "chardev",
            PropType::Str,
            "ID of a chardev to use as a backend",
        ),
        PropDef::new("readback", PropType::U32, "")
            .default("0xe9")
            .ignored(),
    ],
    create,
};

fn create(_: &mut AttachCtx, _: &Device, _: Placement) -> Result<(), String> {
    Err("isa-debugcon is created by -debugcon".into())
}

/// The port `-debugcon` goes to, after `-global isa-debugcon.iobase=`.
pub fn iobase(globals: &[super::Global]) -> Result<u64, String> {
    let p = super::board_props(&ISA_DEBUGCON, globals);
    match p.uint("iobase").unwrap_or(0xe9) {
        port @ 0..=0xffff => Ok(port),
        port => Err(format!(
            "-global isa-debugcon.iobase={port:#x}: I/O port out of range"
        )),
    }
}
