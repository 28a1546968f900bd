//! `measure [-O fmt] [-o options] [--size N | image]`: the file size a new
//! image needs, with qemu-img's numbers, as the target format's driver
//! class computes it (`DriverClass::measure`) from the `-o` options, the
//! virtual size and what the source allocates.

use super::json::{pretty, J};
use super::{fail, open, parse_img_size, Fail, OpenSpec, R};
use block::format::CreateOpts;
use block::graph::BlockGraph;

/// `measure` options (qemu-img's letters).
#[derive(clap::Args, Debug)]
pub struct MeasureArgs {
    /// Output format (human or json).
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Target format.
    #[arg(short = 'O', default_value = "raw")]
    pub out_fmt: String,
    /// Target options.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Virtual size (instead of an image).
    #[arg(long = "size")]
    pub size: Option<String>,
    /// Source format.
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Share the source.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Source snapshot.
    #[arg(short = 'l')]
    pub snapshot: Option<String>,
    /// The source image.
    pub filename: Option<String>,
}

/// `measure`.
pub fn measure(a: MeasureArgs) -> R<i32> {
    let json = match a.output.as_str() {
        "human" => false,
        "json" => true,
        o => return fail(format!("--output expects 'human' or 'json' not '{o}'")),
    };
    if a.size.is_some() && a.filename.is_some() {
        return fail("--size N cannot be used together with a filename.");
    }
    if a.size.is_none() && a.filename.is_none() {
        return fail("Either --size N or one filename must be specified.");
    }
    let snap = super::convert::snapshot_param(a.snapshot.as_deref())?;
    let class = BlockGraph::new().class(&a.out_fmt).ok_or_else(|| {
        Fail(
            format!(
                "Block driver '{}' does not support size measurement",
                a.out_fmt
            ),
            1,
        )
    })?;
    let opts = CreateOpts::parse(class.create_options(), &a.options)
        .map_err(|e| Fail(e.to_string(), 1))?;
    // The source: virtual size and the clusters it allocates.
    let (size, src) = match (&a.size, &a.filename) {
        (Some(s), _) => (parse_img_size(s)?, None),
        (None, Some(f)) => {
            let g = BlockGraph::new();
            let mut spec = OpenSpec::new(f);
            spec.fmt = a.fmt.as_deref();
            spec.force_share = a.force_share;
            spec.snapshot = &snap;
            let b = open(&g, &spec)?;
            (b.len(), Some((g, b)))
        }
        _ => unreachable!("checked above"),
    };
    let root = match &src {
        Some((_, b)) => match b.root() {
            Some(r) => Some(r),
            None => return fail("no medium"),
        },
        None => None,
    };
    let m = class
        .measure(&opts, size, root.as_ref())
        .map_err(|e| Fail(e.to_string(), 1))?;
    print(json, m.required, m.fully_allocated, m.bitmaps)
}

fn print(json: bool, required: u64, full: u64, bitmaps: Option<u64>) -> R<i32> {
    if json {
        let mut v = vec![];
        if let Some(b) = bitmaps {
            v.push(("bitmaps", J::u(b)));
        }
        v.push(("required", J::u(required)));
        v.push(("fully-allocated", J::u(full)));
        println!("{}", pretty(&J::obj(v)));
    } else {
        println!("required size: {required}");
        println!("fully allocated size: {full}");
        if let Some(b) = bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(0)
}
