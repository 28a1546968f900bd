//! `amend -o options [-f fmt] [-t cache] [--force] image`: change the
//! creation options an image's format can change in place (qemu-img's
//! options and messages). The options are parsed against the format's
//! create option table; its driver refuses those it cannot change.

use super::{fail, open, Fail, OpenSpec, R};
use block::format::CreateOpts;
use block::graph::BlockGraph;

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

/// `amend`.
pub fn amend(a: AmendArgs) -> R<i32> {
    if a.options.is_empty() {
        return fail("Must specify options (-o)");
    }
    if let Some(c) = &a.cache {
        super::cache_mode(c)?;
    }
    let g = BlockGraph::new();
    let mut spec = OpenSpec::new(&a.filename);
    spec.fmt = a.fmt.as_deref();
    spec.read_only = false;
    spec.cache = a.cache.as_deref();
    let blk = open(&g, &spec)?;
    let Some(root) = blk.root() else {
        return fail(format!("Could not open '{}': no medium", a.filename));
    };
    let class = g
        .class(root.driver_name())
        .ok_or_else(|| Fail(format!("Unknown driver '{}'", root.driver_name()), 1))?;
    if super::create::wants_help(&a.options) {
        print!("{}", block::format::options_help(class.create_options()));
        return Ok(0);
    }
    let table = class.create_options();
    if !class.can_amend() {
        return fail(format!(
            "Format driver '{}' does not support option amendment",
            root.driver_name()
        ));
    }
    let opts = CreateOpts::parse(table, &a.options).map_err(|e| Fail(e.to_string(), 1))?;
    root.driver()
        .amend(&opts, a.force)
        .map_err(|e| Fail(e.to_string(), 1))?;
    root.close().map_err(|e| Fail(e.to_string(), 1))?;
    Ok(0)
}
