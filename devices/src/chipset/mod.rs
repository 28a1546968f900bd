//! PC chipsets: the i440FX host bridge with PIIX3/PIIX4 functions (`pc`).
//! Q35/ICH9 will join them here.

pub mod i440fx;
pub mod pcihp;
pub mod piix3;
pub mod piix4_pm;
