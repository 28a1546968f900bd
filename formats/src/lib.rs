//! On-disk image formats, pure logic over an abstract child.
//!
//! Each format lives in its own module. Probing lives in [`probe`].

pub mod probe;
