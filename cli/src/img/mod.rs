//! `strata-img`: create, inspect, compare, convert, copy and benchmark
//! images, with the command line, output and exit codes of `qemu-img`
//! (QEMU's `docs/tools/qemu-img.rst`).
//!
//! Errors are one line on stderr, `strata-img: <message>`, exit code 1
//! (`compare` uses 2 for errors, 1 for differences, as qemu-img does).
//!
//! Images are locked as qemu-img locks them: a command that writes takes
//! the write permission and refuses shared writers; one that reads takes
//! consistent read and, without `-U`, is refused while another process
//! (a VM, qemu-nbd, another strata-img) writes the image.
//!
//! No command knows a format: each opens images through the block graph
//! and asks the node's driver (info, check, amend, snapshots, backing
//! file changes, compressed writes) or the format's driver class
//! (create, `-o help`, measure) in `block::format`.

pub mod amend;
pub mod bench;
pub mod commit;
pub mod convert;
pub mod create;
pub mod info;
pub mod json;
pub mod measure;
pub mod rebase;
pub mod snapshot;

use block::backend::{BackendConfig, BlockBackend};
use block::driver::Perms;
use block::graph::{BlockGraph, OpenFlags};
use block::keyval::{self, Options};
use clap::{Parser, Subcommand};
use std::sync::Arc;

/// A user-facing failure: message and exit code.
#[derive(Debug)]
pub struct Fail(pub String, pub i32);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string(), 1)
    }
}

pub type R<T> = Result<T, Fail>;

pub fn fail<T>(msg: impl Into<String>) -> R<T> {
    Err(Fail(msg.into(), 1))
}

#[derive(Parser, Debug)]
#[command(
    name = "strata-img",
    version,
    about = "Strata disk image utility (qemu-img compatible)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// QEMU objects (secret, tls-creds-x509), before or after the command.
    #[arg(long = "object", global = true)]
    pub object: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create an image.
    Create {
        #[arg(short = 'f', default_value = "raw")]
        fmt: String,
        #[arg(short = 'o')]
        options: Vec<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'u')]
        no_backing_check: bool,
        #[arg(short = 'b')]
        backing: Option<String>,
        #[arg(short = 'F')]
        backing_fmt: Option<String>,
        filename: String,
        size: Option<String>,
    },
    /// Show information about an image.
    Info {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long = "output", default_value = "human")]
        output: String,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        filename: String,
    },
    /// Show the allocation map of an image.
    Map {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long = "output", default_value = "human")]
        output: String,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        #[arg(short = 's', long = "start-offset")]
        start_offset: Option<String>,
        #[arg(short = 'l', long = "max-length")]
        max_length: Option<String>,
        filename: String,
    },
    /// Compare two images.
    Compare {
        #[arg(short = 'f')]
        fmt1: Option<String>,
        #[arg(short = 'F')]
        fmt2: Option<String>,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 's')]
        strict: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(short = 'T')]
        src_cache: Option<String>,
        filename1: String,
        filename2: String,
    },
    /// Convert (copy) images.
    Convert(convert::ConvertArgs),
    /// Commit an image into its backing file.
    Commit(commit::CommitArgs),
    /// Change the backing file of an image.
    Rebase(rebase::RebaseArgs),
    /// Change format-specific options of an image.
    Amend(amend::AmendArgs),
    /// Measure the file size a new image needs.
    Measure(measure::MeasureArgs),
    /// List, apply, create or delete internal snapshots.
    Snapshot(snapshot::SnapshotArgs),
    /// Copy with dd-style operands.
    Dd {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(short = 'O', default_value = "raw")]
        out_fmt: String,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        operands: Vec<String>,
    },
    /// Run a simple I/O benchmark.
    Bench(bench::BenchArgs),
    /// Check an image for consistency.
    Check {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long = "output", default_value = "human")]
        output: String,
        #[arg(short = 'r')]
        repair: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        filename: String,
    },
    /// Change the virtual size of an image.
    Resize {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long = "shrink")]
        shrink: bool,
        #[arg(long = "preallocation")]
        preallocation: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        filename: String,
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
}

/// How an image is to be opened.
pub struct OpenSpec<'a> {
    pub filename: &'a str,
    pub fmt: Option<&'a str>,
    pub image_opts: bool,
    pub read_only: bool,
    pub force_share: bool,
    pub cache: Option<&'a str>,
    pub aio: Option<&'a str>,
    pub resize: bool,
    /// An internal snapshot to read instead of the active state (qcow2).
    /// (Its node options: see `cli::snapshot_param`.)
    pub snapshot: &'a [(String, String)],
    /// How the image's node is opened (to check it, without its backing
    /// file).
    pub flags: OpenFlags,
    /// Write-zeroes may deallocate (`discard=unmap`): convert's targets.
    pub discard_unmap: bool,
    /// More node options (a new image's key secrets).
    pub extra: Vec<(String, String)>,
}

impl<'a> OpenSpec<'a> {
    pub fn new(filename: &'a str) -> Self {
        OpenSpec {
            filename,
            fmt: None,
            image_opts: false,
            read_only: true,
            force_share: false,
            cache: None,
            aio: None,
            resize: false,
            snapshot: &[],
            flags: OpenFlags::default(),
            discard_unmap: false,
            extra: Vec::new(),
        }
    }
}

/// The `...key-secret` options of a create, as node options: a new image
/// is opened with them, as qemu-img's convert and create do (an
/// encrypted target needs its secret to be written).
pub fn key_secrets(opts: &block::format::CreateOpts) -> Vec<(String, String)> {
    opts.names()
        .filter(|n| n.ends_with("key-secret"))
        .filter_map(|n| opts.str(n).map(|v| (n.to_string(), v.to_string())))
        .collect()
}

/// Map `-t`/`-T` cache modes to (cache.direct, cache.no-flush, write cache).
pub fn cache_mode(mode: &str) -> R<(bool, bool, bool)> {
    Ok(match mode {
        "writeback" => (false, false, true),
        "none" | "off" => (true, false, true),
        "writethrough" => (false, false, false),
        "directsync" => (true, false, false),
        "unsafe" => (false, true, true),
        _ => return fail(format!("Invalid cache option: {mode}")),
    })
}

/// Open an image and attach a tool backend (shares everything, like qemu-img).
pub fn open(graph: &BlockGraph, spec: &OpenSpec<'_>) -> R<Arc<BlockBackend>> {
    if spec.force_share && !spec.read_only {
        return fail("--force-share/-U can only be used with read-only images");
    }
    let mut extra: Vec<(String, String)> = Vec::new();
    let mut wce = true;
    if let Some(c) = spec.cache {
        let (direct, no_flush, w) = cache_mode(c)?;
        extra.push(("cache.direct".into(), on(direct)));
        extra.push(("cache.no-flush".into(), on(no_flush)));
        wce = w;
    }
    extra.extend(spec.snapshot.iter().cloned());
    extra.extend(spec.extra.iter().cloned());
    if spec.discard_unmap {
        extra.push(("discard".into(), "unmap".into()));
    }
    if let Some(a) = spec.aio {
        if !matches!(a, "threads" | "native" | "io_uring") {
            return fail(format!("Invalid aio option: {a}"));
        }
    }
    let node = if spec.image_opts {
        if spec.fmt.is_some() {
            return fail("--image-opts and --format are mutually exclusive");
        }
        let mut map = keyval::parse("image options", spec.filename, None)?;
        keyval::merge_pairs(&mut map, "image options", &extra)?;
        if spec.read_only {
            map.insert("read-only".into(), keyval::Value::Str("on".into()));
        }
        if spec.force_share {
            map.insert("force-share".into(), keyval::Value::Str("on".into()));
        }
        let probe = !map.contains_key("driver");
        graph
            .open_options_flags(Options::new("image options", map), None, probe, spec.flags)
            .map_err(|e| Fail(format!("Could not open '{}': {e}", spec.filename), 1))?
    } else {
        if let Some(a) = spec.aio {
            extra.push(("file.aio".into(), a.into()));
        }
        if spec.force_share {
            extra.push(("force-share".into(), "on".into()));
        }
        let refs: Vec<(&str, &str)> = extra
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        graph
            .open_image_flags(spec.filename, spec.fmt, spec.read_only, &refs, spec.flags)
            .map_err(|e| open_error(spec.filename, e))?
    };
    // qemu-img does not print the raw-probing warning; a driver's own
    // ("warning: ...", such as qcow's insecure AES) it does.
    for w in graph.take_warnings() {
        if let Some(m) = w.strip_prefix("warning: ") {
            eprintln!("strata-img: warning: {m}");
        }
    }
    let cfg = BackendConfig {
        read_only: spec.read_only,
        write_cache: wce,
        shared: Perms::ALL,
        resize: spec.resize,
        ..Default::default()
    };
    BlockBackend::new("", node, cfg).map_err(|e| open_error(spec.filename, e))
}

/// Whether the file `node` of the image `filename` could be locked for
/// reading or writing as a format node locks it (see
/// `block::format::locked_storage`): qemu-img's refusal otherwise.
pub(crate) fn try_lock(
    node: Arc<block::node::Node>,
    filename: &str,
    write: bool,
    force_share: bool,
) -> R<()> {
    block::format::locked_storage(node, filename, write, force_share)
        .map(drop)
        .map_err(|e| Fail(e.to_string(), 1))
}

fn open_error(filename: &str, e: block::error::BlockError) -> Fail {
    Fail(format!("Could not open '{filename}': {e}"), 1)
}

fn on(b: bool) -> String {
    if b { "on" } else { "off" }.to_string()
}

/// Parse an image size as qemu-img does (bytes by default, k/M/G/T/P/E).
pub fn parse_img_size(s: &str) -> R<u64> {
    match keyval::parse_size_str(s, 1) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) => fail("Image size must be less than 8 EiB!"),
        Err(_) => fail(format!("Invalid image size specified: '{s}'.")),
    }
}

/// QEMU's `size_to_str`: three significant digits, binary prefixes, and a
/// switch to the next unit from 1000 (not 1024) of the previous one.
pub fn size_to_str(val: u64) -> String {
    const SUF: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut i = 0usize;
    let scaled = val as f64 / (1000.0 / 1024.0);
    while i < 6 && scaled >= (1u128 << (10 * (i + 1))) as f64 {
        i += 1;
    }
    let v = val as f64 / (1u128 << (10 * i)) as f64;
    format!("{} {}B", g3(v), SUF[i])
}

/// `%0.3g` for values below 1000.
fn g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let exp = v.abs().log10().floor() as i32;
    let decimals = (2 - exp).max(0) as usize;
    let mut s = format!("{v:.decimals$}");
    // Rounding may carry into a new digit (9.996 -> 10.00): one decimal less.
    if let Ok(r) = s.parse::<f64>() {
        if r != 0.0 && (r.abs().log10().floor() as i32) > exp {
            let d = (1 - exp).max(0) as usize;
            s = format!("{v:.d$}");
        }
    }
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    s
}

/// Run the command line; returns the exit code.
pub fn main_with_args(args: Vec<String>) -> i32 {
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    print!("{e}");
                    return 0;
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                | ErrorKind::MissingSubcommand => {
                    eprintln!("strata-img: Not enough arguments");
                    return 1;
                }
                ErrorKind::InvalidSubcommand => {
                    let name = args.get(1).map(String::as_str).unwrap_or("");
                    eprintln!("strata-img: Command not found: {name}");
                    return 1;
                }
                ErrorKind::MissingRequiredArgument => {
                    // clap puts the missing names on the following lines.
                    let text = e.to_string();
                    let missing: Vec<&str> = text
                        .lines()
                        .skip(1)
                        .map(str::trim)
                        .take_while(|l| !l.is_empty())
                        .collect();
                    eprintln!("strata-img: missing argument: {}", missing.join(" "));
                    return 1;
                }
                _ => {
                    let first = e.to_string();
                    let line = first.lines().next().unwrap_or("invalid arguments");
                    let line = line.strip_prefix("error: ").unwrap_or(line);
                    eprintln!("strata-img: {line}");
                    return 1;
                }
            }
        }
    };
    // Created before any image is opened: an `nbd` node finds its
    // `tls-creds` by id.
    for o in &cli.object {
        if let Err(e) = block::objects::add_str("--object", o) {
            eprintln!("strata-img: {e}");
            return 1;
        }
    }
    let r = match cli.cmd {
        Cmd::Create {
            fmt,
            options,
            quiet,
            no_backing_check,
            backing,
            backing_fmt,
            filename,
            size,
        } => create::create(
            &fmt,
            &options,
            quiet,
            &filename,
            size.as_deref(),
            backing.as_deref(),
            backing_fmt.as_deref(),
            no_backing_check,
        ),
        Cmd::Info {
            fmt,
            output,
            force_share,
            image_opts,
            backing_chain,
            filename,
        } => info::info(
            fmt.as_deref(),
            &output,
            force_share,
            image_opts,
            backing_chain,
            &filename,
        ),
        Cmd::Map {
            fmt,
            output,
            force_share,
            image_opts,
            start_offset,
            max_length,
            filename,
        } => info::map(
            fmt.as_deref(),
            &output,
            force_share,
            image_opts,
            start_offset.as_deref(),
            max_length.as_deref(),
            &filename,
        ),
        Cmd::Compare {
            fmt1,
            fmt2,
            progress,
            quiet,
            strict,
            force_share,
            src_cache,
            filename1,
            filename2,
        } => convert::compare(
            fmt1.as_deref(),
            fmt2.as_deref(),
            progress,
            quiet,
            strict,
            force_share,
            src_cache.as_deref(),
            &filename1,
            &filename2,
        ),
        Cmd::Convert(a) => convert::convert(a),
        Cmd::Commit(a) => commit::commit(a),
        Cmd::Rebase(a) => rebase::rebase(a),
        Cmd::Amend(a) => amend::amend(a),
        Cmd::Measure(a) => measure::measure(a),
        Cmd::Snapshot(a) => snapshot::snapshot(a),
        Cmd::Dd {
            fmt,
            out_fmt,
            force_share,
            operands,
        } => convert::dd(fmt.as_deref(), &out_fmt, force_share, &operands),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Check {
            fmt,
            output,
            repair,
            quiet,
            force_share,
            image_opts,
            filename,
        } => info::check(
            fmt.as_deref(),
            &output,
            repair.as_deref(),
            quiet,
            force_share,
            image_opts,
            &filename,
        ),
        Cmd::Resize {
            fmt,
            shrink,
            preallocation,
            quiet,
            image_opts,
            filename,
            size,
        } => info::resize(
            fmt.as_deref(),
            shrink,
            preallocation.as_deref(),
            quiet,
            image_opts,
            &filename,
            &size,
        ),
    };
    match r {
        Ok(code) => code,
        Err(Fail(msg, code)) => {
            eprintln!("strata-img: {msg}");
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1245184), "1.19 MiB");
        assert_eq!(size_to_str(1000 * 1024), "0.977 MiB");
        assert_eq!(size_to_str(1536 * 1024), "1.5 MiB");
        assert_eq!(size_to_str(123 * 1024 * 1024), "123 MiB");
        assert_eq!(size_to_str(4096), "4 KiB");
    }
}
