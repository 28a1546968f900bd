//! `create`, `info` and `map`, with qemu-img's output (human and JSON).

use super::json::{compact, pretty, J};
use super::{fail, open, parse_img_size, size_to_str, OpenSpec, R};
use block::graph::BlockGraph;
use block::node::Node;
use std::io::{IsTerminal, Write};

/// `create -f raw [-o size=..,preallocation=..] file [size]`.
pub fn create(
    fmt: &str,
    options: &[String],
    quiet: bool,
    filename: &str,
    size: Option<&str>,
) -> R<i32> {
    if fmt != "raw" {
        return fail(format!("Unknown file format '{fmt}'"));
    }
    let mut size_v = match size {
        Some(s) => Some(parse_img_size(s)?),
        None => None,
    };
    let mut prealloc = None;
    for o in options {
        let m = block::keyval::parse("-o", o, None)?;
        let mut opts = block::keyval::Options::new("-o", m);
        if let Some(s) = opts.take_str("size")? {
            size_v = Some(parse_img_size(&s)?);
        }
        if let Some(p) = opts.take_str("preallocation")? {
            if !matches!(p.as_str(), "off" | "falloc" | "full") {
                return fail(format!("Invalid parameter '{p}'"));
            }
            prealloc = Some(p);
        }
        if let Err(e) = opts.finish() {
            let key = match e {
                block::keyval::KeyvalError::Unknown { key, .. } => key,
                other => other.to_string(),
            };
            return fail(format!("Invalid parameter '{key}'"));
        }
    }
    let Some(size_v) = size_v else {
        return fail(format!("{filename}: Image creation needs a size parameter"));
    };
    if !quiet {
        match &prealloc {
            Some(p) => println!("Formatting '{filename}', fmt=raw size={size_v} preallocation={p}"),
            None => println!("Formatting '{filename}', fmt=raw size={size_v}"),
        }
    }
    #[allow(clippy::suspicious_open_options)] // emptied under a lock below
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .open(filename)
        .map_err(|e| {
            super::Fail(
                format!(
                    "{filename}: Could not create '{filename}': {}",
                    block::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
                ),
                1,
            )
        })?;
    super::truncate_for_create(filename, filename)?;
    f.set_len(size_v)
        .map_err(|e| super::Fail(format!("{filename}: Could not resize file: {e}"), 1))?;
    match prealloc.as_deref() {
        Some("falloc") => {
            use std::os::fd::AsRawFd;
            // SAFETY: plain fallocate on a descriptor we own.
            if size_v > 0 && unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size_v as i64) } < 0 {
                return fail(format!(
                    "{filename}: Could not preallocate data for the new file: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Some("full") => {
            let mut w = std::io::BufWriter::new(&f);
            let zero = vec![0u8; 1 << 20];
            let mut left = size_v;
            while left > 0 {
                let n = left.min(zero.len() as u64) as usize;
                w.write_all(&zero[..n])?;
                left -= n as u64;
            }
            w.flush()?;
        }
        _ => {}
    }
    Ok(0)
}

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
    let q2 = (n.driver_name() == "qcow2")
        .then(|| super::qcow2::header_of(n))
        .flatten();
    if let Some(h) = &q2 {
        // qemu-img's key order: children, backing-filename-format,
        // snapshots, virtual-size, filename, cluster-size, format,
        // actual-size, format-specific, the backing names, dirty-flag.
        let mut at = 1;
        if let (Some(_), Some(f)) = (&h.backing_file, &h.backing_format) {
            items.insert(at, ("backing-filename-format", J::s(f)));
            at += 1;
        }
        let snaps = super::snapshot::of_node(n);
        if !snaps.is_empty() {
            items.insert(at, ("snapshots", super::snapshot::table_json(&snaps)));
        }
        let fmt = items
            .iter()
            .position(|(k, _)| *k == "format")
            .unwrap_or(items.len());
        items.insert(fmt, ("cluster-size", J::u(h.cluster_size())));
        let bitmaps = super::qcow2::bitmaps_of(n, h);
        items.push((
            "format-specific",
            super::qcow2::format_specific_json(h, &bitmaps),
        ));
        if let Some(b) = &h.backing_file {
            items.push((
                "full-backing-filename",
                J::s(&block::qcow2::resolve_backing(filename, b)),
            ));
            items.push(("backing-filename", J::s(b)));
        }
        items.push(("dirty-flag", J::Bool(h.incompatible & 1 != 0)));
        return J::obj(items);
    }
    if is_protocol(n) && matches!(n.driver_name(), "file" | "host_device") {
        items.push((
            "format-specific",
            J::obj(vec![
                ("type", J::s(n.driver_name())),
                ("data", J::obj(vec![])),
            ]),
        ));
    }
    items.push(("dirty-flag", J::Bool(false)));
    J::obj(items)
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
    if n.driver_name() == "qcow2" {
        if let Some(h) = super::qcow2::header_of(n) {
            out.push_str(&format!("cluster_size: {}\n", h.cluster_size()));
            if let Some(b) = &h.backing_file {
                let full = block::qcow2::resolve_backing(filename, b);
                if &full != b {
                    out.push_str(&format!("backing file: {b} (actual path: {full})\n"));
                } else {
                    out.push_str(&format!("backing file: {b}\n"));
                }
                if let Some(f) = &h.backing_format {
                    out.push_str(&format!("backing file format: {f}\n"));
                }
            }
            let snaps = super::snapshot::of_node(n);
            if !snaps.is_empty() {
                out.push_str("Snapshot list:\n");
                out.push_str(&super::snapshot::table_human(&snaps));
            }
            let bitmaps = super::qcow2::bitmaps_of(n, &h);
            super::qcow2::format_specific_human(&h, &bitmaps, out);
        }
    }
    children_human(n, "", out);
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
            let bname = (n.driver_name() == "qcow2")
                .then(|| super::qcow2::header_of(n))
                .flatten()
                .and_then(|h| h.backing_file)
                .map(|bf| block::qcow2::resolve_backing(name, &bf))
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

/// Block status of `[off, off+max)` down the backing chain from `n` (at
/// `depth`): the first image that allocates the run answers, as in
/// qemu-img map; a run no image allocates reads as zeroes and is not
/// present, with the depth of the last image that has a backing image
/// under it there (an image's own depth past the end of its backing
/// image). Unallocated and zero runs keep the host offset the driver
/// reports for clusters that have host space (qemu-img prints it).
pub(crate) fn chain_status(n: &Node, off: u64, max: u64, depth: u64) -> R<MapEntry> {
    let e = n.block_status(off, max)?;
    let len = e.len.clamp(1, max);
    let q2 = n.driver_name() == "qcow2";
    let zero = e.zero;
    if q2 && !e.allocated {
        // Down the chain while a backing image covers the run; past its
        // end the run reads as zeroes and, as in qemu-img, belongs to this
        // layer (the driver answered zero and no data here).
        if let Some(b) = n.child("backing") {
            if off < b.len() {
                return chain_status(&b, off, len.min(b.len() - off), depth + 1);
            }
        }
    }
    let present = !q2 || e.allocated;
    // qcow2 data without a host offset is a compressed cluster.
    let compressed = q2 && e.data && e.offset.is_none() && present;
    Ok(MapEntry {
        start: off,
        length: len,
        depth,
        present,
        data: e.data,
        zero: zero || !present,
        compressed,
        offset: e.offset,
        file: n.filename().unwrap_or_default(),
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

/// `check`: raw has nothing to check; qemu-img exits with 63 for that.
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
    if let Some(r) = repair {
        if r != "leaks" && r != "all" {
            return fail(format!(
                "Unknown option value for -r (expecting 'leaks' or 'all'): {r}"
            ));
        }
    }
    let graph = BlockGraph::new();
    let mut spec = OpenSpec::new(filename);
    spec.fmt = fmt;
    spec.image_opts = image_opts;
    if force_share && repair.is_some() {
        return fail(format!(
            "Could not open '{filename}': force-share=on can only be used with read-only images"
        ));
    }
    // Only to learn the format: read-only, so that an image marked
    // corrupt can be opened (qcow2 below opens it again, and locks it for
    // reading, or for writing to repair it, as qemu-img does). A repair
    // shares writes here so that its refusal names the write lock.
    spec.force_share = force_share || repair.is_some();
    spec.read_only = true;
    let blk = open(&graph, &spec)?;
    if blk.root().is_some_and(|r| r.driver_name() == "qcow2") && !image_opts {
        drop(blk);
        drop(graph);
        return super::qcow2::check(filename, json, repair, quiet, force_share);
    }
    let _ = blk;
    Err(super::Fail(
        "This image format does not support checks".into(),
        63,
    ))
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
