//! qcow2 in strata-img: `create -f qcow2` with qemu-img's `-o` options and
//! `-b/-F/-u`, `check` with `-r leaks|all` (exit codes 0, 2, 3, 1), and the
//! format-specific part of `info`. The format logic is `formats::qcow2`;
//! this file only parses arguments and prints what qemu-img prints.

use super::json::{pretty, J};
use super::{fail, parse_img_size, Fail, R};
use block::graph::BlockGraph;
use block::keyval::{Map, Options, Value};
use block::qcow2::{resolve_backing, NodeStorage};
use formats::qcow2::bitmap::{read_bitmaps, Bitmap};
use formats::qcow2::check::{CheckResult, Repair};
use formats::qcow2::create::{create as q2create, CreateOptions, Prealloc};
use formats::qcow2::header::Header;
use formats::qcow2::{OpenOptions, Qcow2};
use formats::storage::Storage;
use std::sync::Arc;

fn on_off(s: &str, key: &str) -> R<bool> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => fail(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Open the protocol node of `filename` (`file`, read-only or not).
fn file_node(g: &BlockGraph, filename: &str, read_only: bool) -> R<Arc<block::node::Node>> {
    let mut m = Map::new();
    m.insert("driver".into(), Value::Str("file".into()));
    m.insert("filename".into(), Value::Str(filename.into()));
    if read_only {
        m.insert("read-only".into(), Value::Str("on".into()));
    }
    g.open_options(Options::new("file", m), None, false)
        .map_err(|e| Fail(format!("Could not open '{filename}': {e}"), 1))
}

/// `create -f qcow2`.
#[allow(clippy::too_many_arguments)]
pub fn create(
    options: &[String],
    quiet: bool,
    filename: &str,
    size: Option<&str>,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
    no_backing_check: bool,
) -> R<i32> {
    let mut o = CreateOptions::default();
    let mut size_v = match size {
        Some(s) => Some(parse_img_size(s)?),
        None => None,
    };
    let mut compat_given = None;
    o.backing_file = backing.map(str::to_string);
    o.backing_format = backing_fmt.map(str::to_string);
    for opt in options {
        if opt == "help" || opt == "?" {
            println!("Supported options:\n  backing_file=<str>     - File name of a base image\n  backing_fmt=<str>      - Image format of the base image\n  cluster_size=<size>    - qcow2 cluster size\n  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])\n  compression_type=<str> - Compression method used for image cluster compression\n  data_file=<str>        - File name of an external data file\n  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image\n  extended_l2=<bool (on/off)> - Extended L2 tables\n  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)\n  refcount_bits=<num>    - Width of a reference count entry in bits\n  size=<size>            - Virtual disk size");
            return Ok(0);
        }
        let m = block::keyval::parse("-o", opt, None)?;
        for (k, v) in m {
            let Value::Str(v) = v else {
                return fail(format!("Invalid parameter '{k}'"));
            };
            match k.as_str() {
                "size" => size_v = Some(parse_img_size(&v)?),
                "compat" => {
                    o.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return fail(format!("Invalid parameter '{v}'")),
                    };
                    compat_given = Some(v);
                }
                "backing_file" => o.backing_file = Some(v),
                "backing_fmt" => o.backing_format = Some(v),
                "cluster_size" => {
                    o.cluster_size = block::keyval::parse_size_str(&v, 1)
                        .map_err(|_| Fail(format!("Invalid cluster size '{v}'"), 1))?
                }
                "preallocation" => {
                    o.prealloc = Prealloc::parse(&v)
                        .ok_or_else(|| Fail(format!("Invalid parameter '{v}'"), 1))?
                }
                "lazy_refcounts" => o.lazy_refcounts = on_off(&v, &k)?,
                "extended_l2" => o.extended_l2 = on_off(&v, &k)?,
                "refcount_bits" => {
                    o.refcount_bits = v
                        .parse()
                        .map_err(|_| Fail(format!("Invalid parameter '{v}'"), 1))?
                }
                "compression_type" => {
                    o.compression_type = match v.as_str() {
                        "zlib" => 0,
                        "zstd" => 1,
                        _ => return fail(format!("Invalid parameter '{v}'")),
                    }
                }
                "data_file" => o.data_file = Some(v),
                "data_file_raw" => o.data_file_raw = on_off(&v, &k)?,
                "nocow" => {}
                "encryption" | "encrypt.format" => {
                    return fail("Encrypted qcow2 images are not supported")
                }
                _ => return fail(format!("Invalid parameter '{k}'")),
            }
        }
    }
    // Size from the backing file when not given.
    if size_v.is_none() {
        if let (Some(b), false) = (&o.backing_file, no_backing_check) {
            let g = BlockGraph::new();
            let path = resolve_backing(filename, b);
            let n = g
                .open_image(
                    &path,
                    o.backing_format.as_deref(),
                    true,
                    &[("force-share", "on")],
                )
                .map_err(|e| Fail(format!("Could not open backing image: {e}"), 1))?;
            let _ = g.take_warnings();
            size_v = Some(n.len());
        }
    } else if let (Some(b), false) = (&o.backing_file, no_backing_check) {
        let g = BlockGraph::new();
        let path = resolve_backing(filename, b);
        g.open_image(
            &path,
            o.backing_format.as_deref(),
            true,
            &[("force-share", "on")],
        )
        .map_err(|e| Fail(format!("Could not open backing file: {e}"), 1))?;
        let _ = g.take_warnings();
    }
    let Some(size_v) = size_v else {
        return fail(format!("{filename}: Image creation needs a size parameter"));
    };
    o.size = size_v.div_ceil(512) * 512;
    formats::qcow2::create::validate(&o).map_err(|e| Fail(format!("{filename}: {e}"), 1))?;
    if !quiet {
        let mut line = format!(
            "Formatting '{filename}', fmt=qcow2 cluster_size={}",
            o.cluster_size
        );
        if let Some(c) = &compat_given {
            line.push_str(&format!(" compat={c}"));
        }
        line.push_str(&format!(
            " extended_l2={} compression_type={} size={}",
            if o.extended_l2 { "on" } else { "off" },
            if o.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            },
            size_v
        ));
        if let Some(b) = &o.backing_file {
            line.push_str(&format!(" backing_file={b}"));
        }
        if let Some(b) = &o.backing_format {
            line.push_str(&format!(" backing_fmt={b}"));
        }
        if let Some(d) = &o.data_file {
            line.push_str(&format!(" data_file={d}"));
        }
        if o.data_file_raw {
            line.push_str(" data_file_raw=on");
        }
        if o.prealloc != Prealloc::Off {
            line.push_str(&format!(" preallocation={}", o.prealloc.name()));
        }
        line.push_str(&format!(
            " lazy_refcounts={} refcount_bits={}",
            if o.lazy_refcounts { "on" } else { "off" },
            o.refcount_bits
        ));
        println!("{line}");
    }
    let mkfile = |p: &str| -> R<()> {
        #[allow(clippy::suspicious_open_options)] // emptied under a lock below
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .open(p)
            .map_err(|e| Fail(format!("{filename}: Could not create '{p}': {e}"), 1))?;
        super::truncate_for_create(filename, p)
    };
    mkfile(filename)?;
    let g = BlockGraph::new();
    // Formatted under the locks of a read-write qcow2 node, as qemu-img
    // opens the new image.
    let f = super::locked_storage(file_node(&g, filename, false)?, filename, true, false)?;
    let data: Option<Arc<dyn Storage>> = match &o.data_file {
        Some(d) => {
            let p = resolve_backing(filename, d);
            mkfile(&p)?;
            Some(super::locked_storage(
                file_node(&g, &p, false)?,
                &p,
                true,
                false,
            )?)
        }
        None => None,
    };
    q2create(filename, f, data, &o).map_err(|e| Fail(format!("{filename}: {e}"), 1))?;
    Ok(0)
}

/// Open the image for checking (no backing file needed).
/// Opened with the locks of qemu-img's qcow2 node: read (refused while
/// another process writes the image, unless `force_share`), or write for
/// a repair.
fn open_for_check(g: &BlockGraph, filename: &str, repair: bool, force_share: bool) -> R<Qcow2> {
    let f = file_node(g, filename, !repair)?;
    let fs = super::locked_storage(f, filename, repair, force_share)?;
    let h = formats::qcow2::preview(&*fs, filename)
        .map_err(|e| Fail(format!("Could not open '{filename}': {e}"), 1))?
        .header;
    let data: Option<Arc<dyn Storage>> = match &h.data_file {
        Some(d) if h.incompatible & formats::qcow2::header::INCOMPAT_DATA_FILE != 0 => {
            let p = resolve_backing(filename, d);
            Some(super::locked_storage(
                file_node(g, &p, !repair)?,
                &p,
                repair,
                force_share,
            )?)
        }
        _ => None,
    };
    let o = OpenOptions {
        read_only: !repair,
        allow_corrupt: repair,
        ..Default::default()
    };
    Qcow2::open(filename, fs, data, None, &o)
        .map_err(|e| Fail(format!("Could not open '{filename}': {e}"), 1))
}

fn print_result(r: &CheckResult, filename: &str, json: bool, quiet: bool) {
    if json {
        let mut v = vec![
            ("image-end-offset", J::u(r.image_end_offset)),
            ("total-clusters", J::u(r.total_clusters)),
            ("check-errors", J::u(r.check_errors)),
        ];
        if r.corruptions_after() > 0 {
            v.push(("corruptions", J::u(r.corruptions_after())));
        }
        if r.leaks_after() > 0 {
            v.push(("leaks", J::u(r.leaks_after())));
        }
        if r.corruptions_fixed > 0 {
            v.push(("corruptions-fixed", J::u(r.corruptions_fixed)));
        }
        if r.leaks_fixed > 0 {
            v.push(("leaks-fixed", J::u(r.leaks_fixed)));
        }
        if r.allocated_clusters > 0 {
            v.push(("allocated-clusters", J::u(r.allocated_clusters)));
            v.push(("fragmented-clusters", J::u(r.fragmented_clusters)));
            v.push(("compressed-clusters", J::u(r.compressed_clusters)));
        }
        v.push(("filename", J::s(filename)));
        v.push(("format", J::s("qcow2")));
        println!("{}", pretty(&J::obj(v)));
        return;
    }
    if quiet {
        return;
    }
    let (c, l) = (r.corruptions_after(), r.leaks_after());
    if c == 0 && l == 0 && r.check_errors == 0 {
        println!("No errors were found on the image.");
    } else {
        if c > 0 {
            println!("\n{c} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.");
        }
        if l > 0 {
            println!("\n{l} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.");
        }
        if r.check_errors > 0 {
            println!(
                "\n{} internal errors have occurred during the check.",
                r.check_errors
            );
        }
    }
    if r.total_clusters > 0 && r.allocated_clusters > 0 {
        let t = r.total_clusters as f64;
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / t,
            r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64,
            r.compressed_clusters as f64 * 100.0 / r.allocated_clusters as f64
        );
    }
    if r.image_end_offset > 0 {
        println!("Image end offset: {}", r.image_end_offset);
    }
}

fn code(r: &CheckResult) -> i32 {
    if r.check_errors > 0 {
        1
    } else if r.corruptions_after() > 0 {
        2
    } else if r.leaks_after() > 0 {
        3
    } else {
        0
    }
}

/// `check [-r leaks|all] [--output] [-q]` on a qcow2 image.
pub fn check(
    filename: &str,
    json: bool,
    repair: Option<&str>,
    quiet: bool,
    force_share: bool,
) -> R<i32> {
    let rep = match repair {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(r) => {
            return fail(format!(
                "Unknown option value for -r (expecting 'leaks' or 'all'): {r}"
            ))
        }
    };
    let g = BlockGraph::new();
    let img = open_for_check(&g, filename, rep != Repair::None, force_share)?;
    let r = img
        .check(rep)
        .map_err(|e| Fail(format!("Check failed: {e}"), 1))?;
    for m in &r.messages {
        if !quiet {
            eprintln!("{m}");
        }
    }
    if rep != Repair::None && (r.corruptions_fixed > 0 || r.leaks_fixed > 0) {
        if !json && !quiet {
            println!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                r.leaks_fixed, r.corruptions_fixed
            );
        }
        let mut r2 = img
            .check(Repair::None)
            .map_err(|e| Fail(format!("Check failed: {e}"), 1))?;
        r2.leaks_fixed = r.leaks_fixed;
        r2.corruptions_fixed = r.corruptions_fixed;
        r2.leaks += r.leaks_fixed;
        r2.corruptions += r.corruptions_fixed;
        img.close().map_err(|e| Fail(e.to_string(), 1))?;
        print_result(&r2, filename, json, quiet);
        return Ok(code(&r2));
    }
    img.close().map_err(|e| Fail(e.to_string(), 1))?;
    print_result(&r, filename, json, quiet);
    Ok(code(&r))
}

/// The header of a qcow2 node's image file.
pub fn header_of(n: &block::node::Node) -> Option<Header> {
    let f = n.child("file")?;
    let fs = NodeStorage(f.clone());
    formats::qcow2::preview(&fs, "").ok().map(|p| p.header)
}

/// The persistent bitmaps of a qcow2 node's image as QEMU lists them:
/// those of a version 3 image whose autoclear bit says they are valid (the
/// open checked the directory already).
pub fn bitmaps_of(n: &block::node::Node, h: &Header) -> Vec<Bitmap> {
    let (Some(raw), Some(f)) = (&h.bitmaps_ext, n.child("file")) else {
        return Vec::new();
    };
    if h.version < 3 || h.autoclear & formats::qcow2::header::AUTOCLEAR_BITMAPS == 0 {
        return Vec::new();
    }
    read_bitmaps(&NodeStorage(f.clone()), raw, h.cluster_size(), h.size, "")
        .map(|(_, l)| l)
        .unwrap_or_default()
}

/// `format-specific` data of `info` for qcow2.
pub fn format_specific_json(h: &Header, bitmaps: &[Bitmap]) -> J {
    let mut d = vec![("compat", J::s(if h.version == 2 { "0.10" } else { "1.1" }))];
    if h.version >= 3 {
        d.push((
            "compression-type",
            J::s(if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            }),
        ));
        d.push(("lazy-refcounts", J::Bool(h.compatible & 1 != 0)));
        if !bitmaps.is_empty() {
            let list = bitmaps
                .iter()
                .map(|b| {
                    J::obj(vec![
                        (
                            "flags",
                            J::Arr(b.flag_names().into_iter().map(J::s).collect()),
                        ),
                        ("name", J::s(&b.name)),
                        ("granularity", J::u(b.granularity())),
                    ])
                })
                .collect();
            d.push(("bitmaps", J::Arr(list)));
        }
        d.push(("refcount-bits", J::u(h.refcount_bits() as u64)));
        d.push(("corrupt", J::Bool(h.incompatible & 2 != 0)));
        d.push(("extended-l2", J::Bool(h.extended_l2())));
        if let Some(df) = &h.data_file {
            d.push(("data-file", J::s(df)));
            d.push(("data-file-raw", J::Bool(h.autoclear & 2 != 0)));
        }
    } else {
        // qemu-img 10 shows the (fixed) refcount width of version 2 too.
        d.push(("compression-type", J::s("zlib")));
        d.push(("refcount-bits", J::u(h.refcount_bits() as u64)));
    }
    J::obj(vec![("type", J::s("qcow2")), ("data", J::obj(d))])
}

/// Human `Format specific information:` lines.
pub fn format_specific_human(h: &Header, bitmaps: &[Bitmap], out: &mut String) {
    out.push_str("Format specific information:\n");
    out.push_str(&format!(
        "    compat: {}\n",
        if h.version == 2 { "0.10" } else { "1.1" }
    ));
    out.push_str(&format!(
        "    compression type: {}\n",
        if h.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        }
    ));
    if h.version >= 3 {
        out.push_str(&format!("    lazy refcounts: {}\n", h.compatible & 1 != 0));
        if !bitmaps.is_empty() {
            // QEMU's layout of a list of objects: an index line per item,
            // a bare `flags:` line when the list is empty.
            out.push_str("    bitmaps:\n");
            for (i, b) in bitmaps.iter().enumerate() {
                out.push_str(&format!("        [{i}]:\n            flags:\n"));
                for (j, f) in b.flag_names().iter().enumerate() {
                    out.push_str(&format!("                [{j}]: {f}\n"));
                }
                out.push_str(&format!("            name: {}\n", b.name));
                out.push_str(&format!("            granularity: {}\n", b.granularity()));
            }
        }
        out.push_str(&format!("    refcount bits: {}\n", h.refcount_bits()));
        out.push_str(&format!("    corrupt: {}\n", h.incompatible & 2 != 0));
        if let Some(df) = &h.data_file {
            out.push_str(&format!("    data file: {df}\n"));
            out.push_str(&format!("    data file raw: {}\n", h.autoclear & 2 != 0));
        }
        out.push_str(&format!("    extended l2: {}\n", h.extended_l2()));
    } else {
        out.push_str(&format!("    refcount bits: {}\n", h.refcount_bits()));
    }
}
