//! `measure [-O fmt] [-o options] [--size N | image]`: the file size a new
//! image needs, with qemu-img's numbers. For qcow2 the fully allocated size
//! is one header cluster, the L2 and L1 tables for the whole disk, the
//! refcount table and blocks that cover all of it, and the data; the
//! required size replaces the data by the clusters the source really
//! allocates (anything not reading as zeroes, across its backing chain).

use super::json::{pretty, J};
use super::{fail, open, parse_img_size, Fail, OpenSpec, R};
use block::graph::BlockGraph;
use formats::qcow2::create::{validate, CreateOptions, Prealloc};

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

/// Refcount table and block bytes covering `clusters` clusters and themselves.
fn refcount_meta(clusters: u64, cs: u64, order: u32) -> u64 {
    let per_block = (cs * 8) >> order;
    let per_table_cluster = cs / 8;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let nb = (clusters + blocks + table).div_ceil(per_block);
        let nt = nb.div_ceil(per_table_cluster);
        if (nb, nt) == (blocks, table) {
            return (blocks + table) * cs;
        }
        (blocks, table) = (nb, nt);
    }
}

/// File size of a fully allocated qcow2 of `size` bytes.
pub fn qcow2_full_size(size: u64, cs: u64, order: u32, extended_l2: bool) -> u64 {
    let data = size.div_ceil(cs) * cs;
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cs; // header
    let l2_entries = (data / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += l2_entries * l2e;
    let l1_entries = (l2_entries * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += l1_entries * 8;
    meta += refcount_meta((meta + data) / cs, cs, order);
    meta + data
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
    let mut o = CreateOptions::default();
    for opt in &a.options {
        let m = block::keyval::parse("-o", opt, None)?;
        for (k, v) in m {
            let block::keyval::Value::Str(v) = v else {
                return fail(format!("Invalid parameter '{k}'"));
            };
            let onoff = |v: &str| match v {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => fail(format!("Parameter '{k}' expects 'on' or 'off'")),
            };
            match k.as_str() {
                "cluster_size" => {
                    o.cluster_size = block::keyval::parse_size_str(&v, 1)
                        .map_err(|_| Fail(format!("Invalid cluster size '{v}'"), 1))?
                }
                "refcount_bits" => {
                    o.refcount_bits = v
                        .parse()
                        .map_err(|_| Fail(format!("Invalid parameter '{v}'"), 1))?
                }
                "extended_l2" => o.extended_l2 = onoff(&v)?,
                "lazy_refcounts" => o.lazy_refcounts = onoff(&v)?,
                "preallocation" => {
                    o.prealloc = Prealloc::parse(&v)
                        .ok_or_else(|| Fail(format!("Invalid parameter '{v}'"), 1))?
                }
                "compat" => {
                    o.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return fail(format!("Invalid parameter '{v}'")),
                    }
                }
                "compression_type" => {
                    o.compression_type = match v.as_str() {
                        "zlib" => 0,
                        "zstd" => 1,
                        _ => return fail(format!("Invalid parameter '{v}'")),
                    }
                }
                "size" | "data_file_raw" | "backing_fmt" | "nocow" => {}
                "backing_file" | "data_file" if a.out_fmt == "qcow2" => {
                    return fail(format!("Parameter '{k}' is not supported by measure"))
                }
                _ => return fail(format!("Invalid parameter '{k}'")),
            }
        }
    }
    if a.out_fmt != "qcow2" && a.out_fmt != "raw" {
        return fail(format!(
            "Block driver '{}' does not support size measurement",
            a.out_fmt
        ));
    }
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
    if a.out_fmt == "raw" {
        let s = size.div_ceil(512) * 512;
        return print(json, s, s, None);
    }
    o.size = size;
    validate(&o).map_err(|e| Fail(e.to_string(), 1))?;
    let cs = o.cluster_size;
    let vsize = size.div_ceil(cs) * cs;
    let mut used = 0u64;
    let mut bitmaps = None;
    if let Some((_g, b)) = &src {
        let Some(root) = b.root() else {
            return fail("no medium");
        };
        if root.driver_name() == "qcow2" {
            let v3 = super::qcow2::header_of(&root).is_some_and(|h| h.version >= 3);
            if v3 && o.version >= 3 {
                bitmaps = Some(0);
            }
        }
        let mut off = 0u64;
        while off < size {
            let e = super::info::chain_status(&root, off, size - off, 0)?;
            let len = e.length.clamp(1, size - off);
            if e.present && e.data && !e.zero {
                // Whole clusters of the target that hold any of it.
                let a0 = off / cs * cs;
                let end = (off + len).div_ceil(cs) * cs;
                used += end - a0;
                off = end;
                continue;
            }
            off += len;
        }
        // Runs may share their first cluster with the previous run.
        used = used.min(vsize);
    }
    if matches!(o.prealloc, Prealloc::Full | Prealloc::Falloc) {
        used = vsize;
    }
    let full = qcow2_full_size(size, cs, o.refcount_bits.trailing_zeros(), o.extended_l2);
    print(json, full - vsize + used, full, bitmaps)
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
