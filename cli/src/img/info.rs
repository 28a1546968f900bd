//! `info`, `map`, `check` and `resize`, with qemu-img's output (human
//! and JSON), for any format: what a format adds to `info` and what
//! `check` finds come from its node's driver.

use super::json::{compact, pretty, J};
use super::{fail, open, size_to_str, OpenSpec, R};
use block::format::{CheckResult, ImageInfo, InfoValue, Repair};
use block::graph::{BlockGraph, OpenFlags};
use block::node::Node;
use std::io::{IsTerminal, Write};

fn is_protocol(n: &Node) -> bool {
    n.children().is_empty()
}

fn node_info(n: &Node, filename: &str) -> J {
    let children: Vec<J> = n
        .children()
        .iter()
        .filter(|(role, _)| role != "backing")
        .map(|(role, c)| {
            let f = c.filename().unwrap_or_else(|| filename.to_string());
            J::obj(vec![("name", J::s(role)), ("info", node_info(c, &f))])
        })
        .collect();
    let mut items = vec![
        ("children", J::Arr(children)),
        ("virtual-size", J::u(n.len())),
        ("filename", J::s(filename)),
        ("format", J::s(n.driver_name())),
    ];
    if let Some(a) = actual_size(n) {
        items.push(("actual-size", J::u(a)));
    }
    let info = n.driver().info().unwrap_or_default();
    // qemu-img's key order: children, backing-filename-format, snapshots,
    // virtual-size, filename, cluster-size, format, actual-size,
    // format-specific, the backing names, dirty-flag.
    let mut at = 1;
    if let (Some(_), Some(f)) = (&info.backing_file, &info.backing_format) {
        items.insert(at, ("backing-filename-format", J::s(f)));
        at += 1;
    }
    if !info.snapshots.is_empty() {
        items.insert(
            at,
            ("snapshots", super::snapshot::table_json(&info.snapshots)),
        );
    }
    if let Some(cs) = info.cluster_size {
        let fmt = items
            .iter()
            .position(|(k, _)| *k == "format")
            .unwrap_or(items.len());
        items.insert(fmt, ("cluster-size", J::u(cs)));
    }
    if let Some((ty, data)) = &info.specific {
        items.push((
            "format-specific",
            J::obj(vec![("type", J::s(ty)), ("data", obj_json(data))]),
        ));
    }
    if let Some(b) = &info.backing_file {
        items.push((
            "full-backing-filename",
            J::s(&block::format::resolve_backing(filename, b)),
        ));
        items.push(("backing-filename", J::s(b)));
    }
    if info.encrypted {
        items.push(("encrypted", J::Bool(true)));
    }
    items.push(("dirty-flag", J::Bool(info.dirty)));
    J::obj(items)
}

fn value_json(v: &InfoValue) -> J {
    match v {
        InfoValue::Str(s) => J::s(s),
        InfoValue::Num(n) => J::u(*n),
        InfoValue::Bool(b) => J::Bool(*b),
        InfoValue::List(l) => J::Arr(l.iter().map(value_json).collect()),
        InfoValue::Obj(o) => obj_json(o),
    }
}

fn obj_json(fields: &[(String, InfoValue)]) -> J {
    J::Obj(
        fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

/// QEMU's dump of a QAPI object (`dump_qobject`): one `key: value` line
/// per field (dashes read as spaces), nested objects and lists indented
/// by four under a `key:` line, list items as `[i]:`.
fn dump_fields(fields: &[(String, InfoValue)], indent: usize, out: &mut String) {
    for (k, v) in fields {
        let k = k.replace('-', " ");
        dump_value(&k, v, indent, out);
    }
}

fn dump_value(label: &str, v: &InfoValue, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        InfoValue::Str(s) => out.push_str(&format!("{pad}{label}: {s}\n")),
        InfoValue::Num(n) => out.push_str(&format!("{pad}{label}: {n}\n")),
        InfoValue::Bool(b) => out.push_str(&format!("{pad}{label}: {b}\n")),
        InfoValue::List(l) => {
            out.push_str(&format!("{pad}{label}:\n"));
            for (i, item) in l.iter().enumerate() {
                dump_value(&format!("[{i}]"), item, indent + 4, out);
            }
        }
        InfoValue::Obj(o) => {
            out.push_str(&format!("{pad}{label}:\n"));
            dump_fields(o, indent + 4, out);
        }
    }
}

fn actual_size(n: &Node) -> Option<u64> {
    n.driver()
        .allocated_size()
        .or_else(|| n.children().first().and_then(|(_, c)| actual_size(c)))
}

fn human(n: &Node, filename: &str, out: &mut String) {
    out.push_str(&format!("image: {filename}\n"));
    out.push_str(&format!("file format: {}\n", n.driver_name()));
    out.push_str(&format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(n.len()),
        n.len()
    ));
    match actual_size(n) {
        Some(a) => out.push_str(&format!("disk size: {}\n", size_to_str(a))),
        None => out.push_str("disk size: unavailable\n"),
    }
    if let Some(info) = n.driver().info() {
        info_human(&info, filename, out);
    }
    children_human(n, "", out);
}

/// What a format adds to human `info`, in qemu-img's order.
fn info_human(info: &ImageInfo, filename: &str, out: &mut String) {
    if info.encrypted {
        out.push_str("encrypted: yes\n");
    }
    if let Some(cs) = info.cluster_size {
        out.push_str(&format!("cluster_size: {cs}\n"));
    }
    if let Some(b) = &info.backing_file {
        let full = block::format::resolve_backing(filename, b);
        if &full != b {
            out.push_str(&format!("backing file: {b} (actual path: {full})\n"));
        } else {
            out.push_str(&format!("backing file: {b}\n"));
        }
        if let Some(f) = &info.backing_format {
            out.push_str(&format!("backing file format: {f}\n"));
        }
    }
    if !info.snapshots.is_empty() {
        out.push_str("Snapshot list:\n");
        out.push_str(&super::snapshot::table_human(&info.snapshots));
    }
    if let Some((_, data)) = &info.specific {
        if !data.is_empty() {
            out.push_str("Format specific information:\n");
            dump_fields(data, 4, out);
        }
    }
}

fn children_human(n: &Node, path: &str, out: &mut String) {
    for (role, c) in n.children() {
        // qemu-img shows backing images with --backing-chain only.
        if role == "backing" {
            continue;
        }
        let p = format!("{path}/{role}");
        out.push_str(&format!("Child node '{p}':\n"));
        let f = c.filename().unwrap_or_default();
        out.push_str(&format!("    filename: {f}\n"));
        if is_protocol(&c) {
            out.push_str(&format!("    protocol type: {}\n", c.driver_name()));
            out.push_str(&format!(
                "    file length: {} ({} bytes)\n",
                size_to_str(c.len()),
                c.len()
            ));
        } else {
            out.push_str(&format!("    file format: {}\n", c.driver_name()));
            out.push_str(&format!(
                "    virtual size: {} ({} bytes)\n",
                size_to_str(c.len()),
                c.len()
            ));
        }
        match actual_size(&c) {
            Some(a) => out.push_str(&format!("    disk size: {}\n", size_to_str(a))),
            None => out.push_str("    disk size: unavailable\n"),
        }
        children_human(&c, &p, out);
    }
}

fn check_output(output: &str) -> R<bool> {
    match output {
        "human" => Ok(false),
        "json" => Ok(true),
        other => fail(format!("--output expects 'human' or 'json' not '{other}'")),
    }
}

/// `info [-f fmt] [--output=human|json] [-U] [--image-opts] [--backing-chain] file`.
pub fn info(
    fmt: Option<&str>,
    output: &str,
    force_share: bool,
    image_opts: bool,
    backing_chain: bool,
    filename: &str,
) -> R<i32> {
    let json = check_output(output)?;
    let graph = BlockGraph::new();
    let mut spec = OpenSpec::new(filename);
    spec.fmt = fmt;
    spec.image_opts = image_opts;
    spec.force_share = force_share;
    // Metadata only: an encrypted image needs no key, as in qemu-img.
    spec.flags = OpenFlags {
        no_io: true,
        ..Default::default()
    };
    let blk = open(&graph, &spec)?;
    let Some(root) = blk.root() else {
        return fail(format!("Could not open '{filename}': no medium"));
    };
    let root = &root;
    let shown = if image_opts {
        root.filename().unwrap_or_else(|| filename.to_string())
    } else {
        filename.to_string()
    };
    if backing_chain {
        // The image, then each backing image, named as the header names it
        // (resolved against the image that names it).
        let mut chain = vec![(root.clone(), shown.clone())];
        loop {
            let (n, name) = &chain[chain.len() - 1];
            let Some(b) = n.child("backing") else { break };
            let bname = n
                .driver()
                .info()
                .and_then(|i| i.backing_file)
                .map(|bf| block::format::resolve_backing(name, &bf))
                .or_else(|| b.filename())
                .unwrap_or_default();
            chain.push((b.clone(), bname));
        }
        if json {
            let items = chain.iter().map(|(n, f)| node_info(n, f)).collect();
            println!("{}", pretty(&J::Arr(items)));
        } else {
            let parts: Vec<String> = chain
                .iter()
                .map(|(n, f)| {
                    let mut s = String::new();
                    human(n, f, &mut s);
                    s
                })
                .collect();
            print!("{}", parts.join("\n"));
        }
        return Ok(0);
    }
    if json {
        println!("{}", pretty(&node_info(root, &shown)));
    } else {
        let mut s = String::new();
        human(root, &shown, &mut s);
        print!("{s}");
    }
    Ok(0)
}

/// One run of the map.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct MapEntry {
    pub(crate) start: u64,
    pub(crate) length: u64,
    pub(crate) depth: u64,
    pub(crate) present: bool,
    pub(crate) data: bool,
    pub(crate) zero: bool,
    pub(crate) compressed: bool,
    pub(crate) offset: Option<u64>,
    /// The image the run comes from (human output's "File").
    file: String,
}

/// One row of the map from `off` (see `block::format::chain_status`).
pub(crate) fn chain_status(n: &Node, off: u64, max: u64, depth: u64) -> R<MapEntry> {
    let e = block::format::chain_status(n, off, max, depth)?;
    Ok(MapEntry {
        start: off,
        length: e.len,
        depth: e.depth,
        present: e.present,
        data: e.data,
        zero: e.zero,
        compressed: e.compressed,
        offset: e.offset,
        file: e.file,
    })
}

/// `map [-f fmt] [--output=human|json] [-U] [--image-opts] [-s start] [-l len] file`.
pub fn map(
    fmt: Option<&str>,
    output: &str,
    force_share: bool,
    image_opts: bool,
    start: Option<&str>,
    max_len: Option<&str>,
    filename: &str,
) -> R<i32> {
    let json = check_output(output)?;
    let start = match start {
        Some(s) => block::keyval::parse_size_str(s, 1).map_err(|_| super::Fail("Invalid start offset specified! You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes or exabytes.".into(), 1))?,
        None => 0,
    };
    let max_len = match max_len {
        Some(s) => Some(block::keyval::parse_size_str(s, 1).map_err(|_| super::Fail("Invalid length specified! You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes or exabytes.".into(), 1))?),
        None => None,
    };
    let graph = BlockGraph::new();
    let mut spec = OpenSpec::new(filename);
    spec.fmt = fmt;
    spec.image_opts = image_opts;
    spec.force_share = force_share;
    let blk = open(&graph, &spec)?;
    let size = blk.len();
    let end = match max_len {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    let file = blk
        .root()
        .and_then(|r| r.filename())
        .unwrap_or_else(|| filename.to_string());
    let Some(root) = blk.root() else {
        return fail(format!("Could not open '{filename}': no medium"));
    };
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut off = start.min(end);
    while off < end {
        let ent = chain_status(&root, off, end - off, 0)?;
        let len = ent.length;
        match entries.last_mut() {
            Some(last)
                if last.data == ent.data
                    && last.zero == ent.zero
                    && last.depth == ent.depth
                    && last.present == ent.present
                    && last.compressed == ent.compressed
                    && last.start + last.length == ent.start
                    && match (last.offset, ent.offset) {
                        (Some(a), Some(b)) => a + last.length == b,
                        (None, None) => true,
                        _ => false,
                    } =>
            {
                last.length += len;
            }
            _ => entries.push(ent),
        }
        off += len;
    }
    let mut out = String::new();
    if json && entries.is_empty() {
        // What qemu-img prints for an empty range.
        out.push_str("[{ \"start\": 0, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}]\n");
    } else if json {
        let items: Vec<String> = entries
            .iter()
            .map(|e| {
                let mut v = vec![
                    ("start", J::u(e.start)),
                    ("length", J::u(e.length)),
                    ("depth", J::u(e.depth)),
                    ("present", J::Bool(e.present)),
                    ("zero", J::Bool(e.zero)),
                    ("data", J::Bool(e.data)),
                    ("compressed", J::Bool(e.compressed)),
                ];
                if let Some(o) = e.offset {
                    v.push(("offset", J::u(o)));
                }
                compact(&J::obj(v))
            })
            .collect();
        out.push('[');
        out.push_str(&items.join(",\n"));
        out.push_str("]\n");
    } else {
        out.push_str(&format!(
            "{:<16}{:<16}{:<16}{}\n",
            "Offset", "Length", "Mapped to", "File"
        ));
        for e in entries.iter().filter(|e| e.data && !e.zero) {
            if e.compressed {
                const MSG: &str = "File contains external, encrypted or compressed clusters.";
                // qemu-img's stdout is line-buffered on a terminal and
                // fully buffered otherwise, so its rows come before the
                // error on a terminal and after it in a file or pipe that
                // holds both: keep that order.
                if std::io::stdout().is_terminal() {
                    print!("{out}");
                    let _ = std::io::stdout().flush();
                    return fail(MSG);
                }
                eprintln!("strata-img: {MSG}");
                print!("{out}");
                return Ok(1);
            }
            if let Some(o) = e.offset {
                out.push_str(&format!(
                    "{:<16}{:<16}{:<16}{}\n",
                    hx(e.start),
                    hx(e.length),
                    hx(o),
                    if e.depth == 0 { &file } else { &e.file }
                ));
            }
        }
    }
    print!("{out}");
    Ok(0)
}

/// `%#x`: zero has no prefix.
fn hx(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

fn print_check(r: &CheckResult, filename: &str, format: &str, json: bool, quiet: bool) {
    if json {
        // As qemu-img: counters a format does not keep (zero) are left
        // out, which for vdi is all but the errors.
        let mut v = Vec::new();
        if r.image_end_offset > 0 {
            v.push(("image-end-offset", J::u(r.image_end_offset)));
        }
        if r.total_clusters > 0 {
            v.push(("total-clusters", J::u(r.total_clusters)));
        }
        v.push(("check-errors", J::u(r.check_errors)));
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
        v.push(("format", J::s(format)));
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

/// qemu-img's exit code of a check: 0 clean, 2 corruptions, 3 leaks, 1
/// when the check itself failed.
fn check_code(r: &CheckResult) -> i32 {
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

/// `check [-r leaks|all] [--output] [-q]`: any format whose driver checks;
/// qemu-img exits with 63 for the others.
pub fn check(
    fmt: Option<&str>,
    output: &str,
    repair: Option<&str>,
    quiet: bool,
    force_share: bool,
    image_opts: bool,
    filename: &str,
) -> R<i32> {
    let json = check_output(output)?;
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
    if force_share && repair.is_some() {
        return fail(format!(
            "Could not open '{filename}': force-share=on can only be used with read-only images"
        ));
    }
    let graph = BlockGraph::new();
    let mut spec = OpenSpec::new(filename);
    spec.fmt = fmt;
    spec.image_opts = image_opts;
    spec.force_share = force_share;
    // Read-only unless repairing (an image marked corrupt opens for
    // repair), without the backing file: a check reads metadata only.
    spec.read_only = rep == Repair::None;
    spec.flags = OpenFlags {
        check: true,
        no_backing: true,
        ..Default::default()
    };
    let blk = open(&graph, &spec)?;
    let Some(root) = blk.root() else {
        return fail(format!("Could not open '{filename}': no medium"));
    };
    let drv = root.driver().clone();
    let failed = |e: block::error::BlockError| match e {
        block::error::BlockError::Unsupported(m) => super::Fail(m, 63),
        e => super::Fail(format!("Check failed: {e}"), 1),
    };
    let r = drv.check(rep).map_err(failed)?;
    if !quiet {
        for m in &r.messages {
            eprintln!("{m}");
        }
    }
    let mut shown = r.clone();
    if rep != Repair::None && (r.corruptions_fixed > 0 || r.leaks_fixed > 0) {
        if !json && !quiet {
            println!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                r.leaks_fixed, r.corruptions_fixed
            );
        }
        shown = drv.check(Repair::None).map_err(failed)?;
        shown.leaks_fixed = r.leaks_fixed;
        shown.corruptions_fixed = r.corruptions_fixed;
        shown.leaks += r.leaks_fixed;
        shown.corruptions += r.corruptions_fixed;
    }
    drop(drv);
    // Written back (a repair's caches, the dirty flag) under the locks.
    root.close()?;
    drop(blk);
    print_check(&shown, filename, root.driver_name(), json, quiet);
    Ok(check_code(&shown))
}

/// `resize [-f fmt] [--shrink] [--preallocation=..] file [+|-]size`.
pub fn resize(
    fmt: Option<&str>,
    shrink: bool,
    prealloc: Option<&str>,
    quiet: bool,
    image_opts: bool,
    filename: &str,
    size: &str,
) -> R<i32> {
    let (rel, num) = match size.as_bytes().first() {
        Some(b'+') => (1i8, &size[1..]),
        Some(b'-') => (-1i8, &size[1..]),
        _ => (0i8, size),
    };
    let amount = block::keyval::parse_size_str(num, 1).map_err(|_| {
        super::Fail(
            "Parameter 'size' expects a non-negative number below 2^64".into(),
            1,
        )
    })?;
    if let Some(p) = prealloc {
        if !matches!(p, "off" | "falloc" | "full") {
            return fail(format!("Invalid preallocation mode: '{p}'"));
        }
    }
    let graph = BlockGraph::new();
    let mut spec = OpenSpec::new(filename);
    spec.fmt = fmt;
    spec.image_opts = image_opts;
    spec.read_only = false;
    spec.resize = true;
    let blk = open(&graph, &spec)?;
    let old = blk.len();
    let new = match rel {
        1 => old.checked_add(amount),
        -1 => old.checked_sub(amount),
        _ => Some(amount),
    }
    .filter(|n| *n <= i64::MAX as u64)
    .ok_or_else(|| super::Fail("New image size must be positive".into(), 1))?;
    if new < old && !shrink {
        return fail("Use the --shrink option to perform a shrink operation.");
    }
    if new < old {
        eprintln!("strata-img: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
    }
    blk.truncate(new)
        .map_err(|e| super::Fail(format!("Error resizing image: {e}"), 1))?;
    if new > old {
        match prealloc {
            Some("falloc") | Some("full") => {
                // Allocate the new area: write-zeroes without unmapping.
                blk.write_zeroes(old, new - old, false)
                    .map_err(|e| super::Fail(format!("Error resizing image: {e}"), 1))?;
            }
            _ => {}
        }
    }
    blk.flush()?;
    if !quiet {
        println!("Image resized.");
    }
    Ok(0)
}
