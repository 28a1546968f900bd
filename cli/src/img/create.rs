//! `create -f FMT [-o options] [-b backing [-F fmt] [-u]] file [size]`
//! for any format with a driver class that creates images: the options
//! are checked against the class's table (`-o help` lists it), the size
//! comes from the backing file when not given, and the class makes the
//! files (qemu-img's `bdrv_img_create`).

use super::{fail, parse_img_size, Fail, R};
use block::format::resolve_backing;
use block::format::{options_help, CreateOpts, DriverClass, OptValue};
use block::graph::BlockGraph;
use std::sync::Arc;

/// The class of format `fmt`, or qemu-img's message.
pub(crate) fn class_of(fmt: &str) -> R<Arc<dyn DriverClass>> {
    BlockGraph::new()
        .class(fmt)
        .filter(|c| c.kind() == block::format::DriverKind::Format)
        .ok_or_else(|| Fail(format!("Unknown file format '{fmt}'"), 1))
}

/// Whether `-o` asks for the option list.
pub(crate) fn wants_help(options: &[String]) -> bool {
    options.iter().any(|o| o == "help" || o == "?")
}

/// Parse `-o` for `class`, with `-b`/`-F` and the size argument (an
/// `-o size=` takes precedence over it).
pub(crate) fn parse_options(
    class: &dyn DriverClass,
    options: &[String],
    size: Option<&str>,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
) -> R<CreateOpts> {
    let table = class.create_options();
    let mut o = CreateOpts::parse(table, options).map_err(|e| Fail(e.to_string(), 1))?;
    if let Some(s) = size {
        let v = parse_img_size(s)?;
        if o.size().is_none() {
            o.set("size", OptValue::Num(v));
        }
    }
    if let Some(b) = backing {
        o.set("backing_file", OptValue::Str(b.to_string()));
    }
    if let Some(f) = backing_fmt {
        o.set("backing_fmt", OptValue::Str(f.to_string()));
    }
    if let Some(s) = o.size() {
        if s > i64::MAX as u64 {
            return fail("Image size must be less than 8 EiB!");
        }
    }
    Ok(o)
}

/// `create`.
#[allow(clippy::too_many_arguments)]
pub fn create(
    fmt: &str,
    options: &[String],
    quiet: bool,
    filename: &str,
    size: Option<&str>,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
    no_backing_check: bool,
) -> R<i32> {
    let class = class_of(fmt)?;
    if wants_help(options) {
        print!("{}", options_help(class.create_options()));
        return Ok(0);
    }
    if class.create_options().is_empty() {
        return fail(format!(
            "Format driver '{fmt}' does not support image creation"
        ));
    }
    let mut o = parse_options(&*class, options, size, backing, backing_fmt)?;
    if o.backing_file().is_some() && !class.supports_backing() {
        return fail(format!(
            "{filename}: Backing file not supported for file format '{fmt}'"
        ));
    }
    make(&*class, &mut o, quiet, filename, no_backing_check)
}

/// Check the backing file (and take the size from it when none is
/// given), print qemu-img's "Formatting" line and create the image.
pub(crate) fn make(
    class: &dyn DriverClass,
    o: &mut CreateOpts,
    quiet: bool,
    filename: &str,
    no_backing_check: bool,
) -> R<i32> {
    if let (Some(b), false) = (o.backing_file().map(str::to_string), no_backing_check) {
        let g = BlockGraph::new();
        let path = resolve_backing(filename, &b);
        let what = if o.size().is_none() {
            "backing image"
        } else {
            "backing file"
        };
        let n = g
            .open_image(&path, o.backing_fmt(), true, &[("force-share", "on")])
            .map_err(|e| Fail(format!("Could not open {what}: {e}"), 1))?;
        let _ = g.take_warnings();
        if o.size().is_none() {
            o.set("size", OptValue::Num(n.len()));
        }
    }
    if o.size().is_none() {
        return fail(format!("{filename}: Image creation needs a size parameter"));
    }
    let summary = class
        .create_summary(filename, o)
        .map_err(|e| Fail(e.to_string(), 1))?;
    if !quiet {
        println!("Formatting '{filename}', fmt={} {summary}", class.name());
    }
    class
        .create(filename, o)
        .map_err(|e| Fail(e.to_string(), 1))?;
    Ok(0)
}
