//! `amend -o compat=0.10|1.1,lazy_refcounts=on|off,refcount_bits=N` on a
//! qcow2 image (qemu-img's options and messages; the work is
//! `formats::qcow2::amend`). Also the shared opener of a qcow2 image with
//! its backing chain, read-write, for `amend`, `rebase` and `commit`.

use super::convert::{open_backing_node, open_qcow2_rw};
use super::{fail, Fail, R};
use block::graph::BlockGraph;
use block::qcow2::{resolve_backing, NodeStorage};
use formats::qcow2::amend::Amend;
use formats::qcow2::Qcow2;
use std::sync::Arc;

/// `amend` options (qemu-img's letters).
#[derive(clap::Args, Debug)]
pub struct AmendArgs {
    /// Image format.
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Options to change.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Cache mode.
    #[arg(short = 't')]
    pub cache: Option<String>,
    /// Progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Allow dangerous changes.
    #[arg(long = "force")]
    pub force: bool,
    /// The image.
    pub filename: String,
}

/// The format of `filename` as probed (only qcow2 matters here).
pub(crate) fn is_qcow2(filename: &str) -> R<bool> {
    let g = BlockGraph::new();
    let f = super::convert::file_node(&g, filename, true, None)?;
    let mut magic = [0u8; 4];
    let fs = NodeStorage(f);
    formats::storage::Storage::read_at(&fs, 0, &mut magic)
        .map_err(|e| Fail(format!("Could not open '{filename}': {e}"), 1))?;
    Ok(u32::from_be_bytes(magic) == formats::qcow2::header::MAGIC)
}

/// Open a qcow2 image read-write with its backing chain (read-only).
pub(crate) fn open_q2_chain(g: &BlockGraph, filename: &str, cache: Option<&str>) -> R<Arc<Qcow2>> {
    let f = super::convert::file_node(g, filename, true, None)?;
    let h = formats::qcow2::preview(&NodeStorage(f), filename)
        .map_err(|e| Fail(format!("Could not open '{filename}': {e}"), 1))?
        .header;
    let backing = match &h.backing_file {
        Some(b) => Some(open_backing_node(
            g,
            &resolve_backing(filename, b),
            h.backing_format.as_deref(),
        )?),
        None => None,
    };
    open_qcow2_rw(g, filename, cache, backing)
}

fn bool_opt(k: &str, v: &str) -> R<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => fail(format!("Parameter '{k}' expects 'on' or 'off'")),
    }
}

/// `amend`.
pub fn amend(a: AmendArgs) -> R<i32> {
    if a.options.is_empty() {
        return fail("Must specify options (-o)");
    }
    if let Some(c) = &a.cache {
        super::cache_mode(c)?;
    }
    let mut am = Amend::default();
    for o in &a.options {
        let m = block::keyval::parse("-o", o, None)?;
        for (k, v) in m {
            let block::keyval::Value::Str(v) = v else {
                return fail(format!("Invalid parameter '{k}'"));
            };
            match k.as_str() {
                "compat" => {
                    am.version = Some(match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return fail(format!("Unknown compatibility level {v}")),
                    })
                }
                "lazy_refcounts" => am.lazy_refcounts = Some(bool_opt(&k, &v)?),
                "refcount_bits" => {
                    am.refcount_bits = Some(v.parse().map_err(|_| {
                        Fail(
                            format!("Parameter 'refcount_bits' expects a number: '{v}'"),
                            1,
                        )
                    })?)
                }
                "size" | "backing_file" | "backing_fmt" | "data_file" | "data_file_raw"
                | "encrypt.format" | "cluster_size" | "preallocation" | "compression_type"
                | "extended_l2" => {
                    return fail(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    ))
                }
                _ => return fail(format!("Invalid parameter '{k}'")),
            }
        }
    }
    match a.fmt.as_deref() {
        Some("qcow2") | None if is_qcow2(&a.filename)? => {}
        Some("qcow2") => {
            return fail(format!(
                "Could not open '{}': Image is not in qcow2 format",
                a.filename
            ))
        }
        Some(f) => {
            return fail(format!(
                "Format driver '{f}' does not support option amendment"
            ))
        }
        None => return fail("Format driver 'raw' does not support option amendment"),
    }
    let g = BlockGraph::new();
    let img = open_q2_chain(&g, &a.filename, a.cache.as_deref())?;
    img.amend(&am).map_err(|e| Fail(e.to_string(), 1))?;
    img.close().map_err(|e| Fail(e.to_string(), 1))?;
    Ok(0)
}
