//! PC chipsets: the i440FX host bridge with PIIX3/PIIX4 functions (`pc`)
//! and the Q35 MCH with the ICH9 LPC bridge (`q35`), and what they share:
//! ACPI PM registers and PIRQ routing.

pub mod acpi_pm;
pub mod i440fx;
pub mod ich9_lpc;
pub mod mch;
pub mod pcihp;
pub mod piix3;
pub mod piix4_pm;
pub mod pirq;
