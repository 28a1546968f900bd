//! The commands QMP and HMP share: the table of QMP commands and their
//! arguments (what `query-commands` and `query-qmp-schema` report), the
//! typed [`Command`] a request becomes before anything runs, and QMP's
//! error classes.
//!
//! Argument checking follows QEMU's QAPI input visitor (qapi/qmp-spec.rst,
//! "Commands Responses"; qapi/qapi-schema.json): a missing mandatory
//! argument, a member of the wrong JSON type and a member the command does
//! not have are each refused with QEMU's wording, which clients match on.

use serde_json::{Map, Value};

/// QMP's error classes (qapi/error.json `QapiErrorClass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KvmMissingCap,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }
}

/// A command's failure, as QMP reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// The `error` member of a response.
    pub fn to_json(&self) -> Value {
        serde_json::json!({"class": self.class.name(), "desc": self.desc})
    }
}

/// The JSON type of an argument, as the schema names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ty {
    Str,
    Int,
    Bool,
    StrList,
    Any,
}

impl Ty {
    /// The schema's name for the type (`query-qmp-schema`'s builtins).
    pub fn schema_name(self) -> &'static str {
        match self {
            Ty::Str => "str",
            Ty::Int => "int",
            Ty::Bool => "bool",
            Ty::StrList => "[str]",
            Ty::Any => "any",
        }
    }

    /// The input visitor's name for the type in its "expected" message.
    fn expected(self) -> &'static str {
        match self {
            Ty::Str => "string",
            Ty::Int => "integer",
            Ty::Bool => "boolean",
            Ty::StrList => "array",
            Ty::Any => "any",
        }
    }

    fn accepts(self, v: &Value) -> bool {
        match self {
            Ty::Str => v.is_string(),
            Ty::Int => v.is_i64() || v.is_u64(),
            Ty::Bool => v.is_boolean(),
            Ty::StrList => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            Ty::Any => true,
        }
    }
}

/// One argument of a command.
pub struct Arg {
    pub name: &'static str,
    pub ty: Ty,
    pub optional: bool,
}

const fn req(name: &'static str, ty: Ty) -> Arg {
    Arg {
        name,
        ty,
        optional: false,
    }
}

const fn opt(name: &'static str, ty: Ty) -> Arg {
    Arg {
        name,
        ty,
        optional: true,
    }
}

/// A command's arguments after checking against its [`Def`]: every
/// mandatory one present, every present one of its declared type.
pub struct Args(Map<String, Value>);

impl Args {
    fn str(&self, name: &str) -> String {
        self.opt_str(name).unwrap_or_default()
    }
    fn opt_str(&self, name: &str) -> Option<String> {
        self.0.get(name).and_then(Value::as_str).map(str::to_string)
    }
    fn bool(&self, name: &str) -> bool {
        self.0.get(name).and_then(Value::as_bool).unwrap_or(false)
    }
    fn opt_int(&self, name: &str) -> Option<i64> {
        self.0.get(name).and_then(Value::as_i64)
    }
    fn int(&self, name: &str) -> i64 {
        self.opt_int(name).unwrap_or_default()
    }
    fn str_list(&self, name: &str) -> Vec<String> {
        self.0
            .get(name)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What arguments a command takes.
pub enum Params {
    /// Named members, checked here.
    Members(&'static [Arg]),
    /// The whole arguments object is the command's data (QAPI's `boxed`),
    /// checked by the code that consumes it (`blockdev-add`'s options).
    Boxed,
}

/// A row of the command table.
pub struct Def {
    pub name: &'static str,
    pub params: Params,
    build: fn(Args) -> Command,
}

/// A request after parsing: what the main loop executes.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Capabilities {
        enable: Vec<String>,
    },
    QueryVersion,
    QueryCommands,
    QueryStatus,
    QueryName,
    QueryKvm,
    QueryMachines,
    QueryCpusFast,
    QueryPci,
    QueryBlock,
    QueryBlockstats,
    QueryNamedBlockNodes,
    QueryQmpSchema,
    QueryIothreads,
    QueryChardev,
    QomListTypes {
        implements: Option<String>,
    },
    QomList {
        path: String,
    },
    QomGet {
        path: String,
        property: String,
    },
    Stop,
    Cont,
    Migrate {
        uri: String,
        blk: bool,
        inc: bool,
        resume: bool,
    },
    QueryMigrate,
    MigrateCancel,
    SystemReset,
    SystemPowerdown,
    Quit,
    BlockdevAdd(Map<String, Value>),
    BlockdevDel {
        node_name: String,
    },
    BlockResize {
        device: Option<String>,
        node_name: Option<String>,
        size: i64,
    },
    HumanMonitorCommand {
        line: String,
    },
    /// A live block operation, job verb, bitmap or NBD export command
    /// (`super::jobs`), whose arguments that module parses.
    Block {
        name: &'static str,
        args: Map<String, Value>,
    },
    BlockSetIoThrottle {
        drive: Option<String>,
        id: Option<String>,
        /// bps, bps_rd, bps_wr, iops, iops_rd, iops_wr, then their `_max`
        /// and `_max_length` companions (0 when absent).
        limits: Box<[[i64; 3]; 6]>,
        iops_size: i64,
        group: Option<String>,
    },
    DeviceAdd(Map<String, Value>),
    DeviceDel {
        id: String,
    },
    /// Removable media. `drive` is `device=` (a drive id), `id` the
    /// device's `id=`.
    Eject {
        drive: Option<String>,
        id: Option<String>,
        force: bool,
    },
    OpenTray {
        drive: Option<String>,
        id: Option<String>,
        force: bool,
    },
    CloseTray {
        drive: Option<String>,
        id: Option<String>,
    },
    RemoveMedium {
        id: String,
    },
    InsertMedium {
        id: String,
        node_name: String,
    },
    ChangeMedium {
        drive: Option<String>,
        id: Option<String>,
        filename: String,
        format: Option<String>,
        force: bool,
        read_only_mode: Option<String>,
    },
}

/// Every command, in the order `query-commands` lists them.
pub static COMMANDS: &[Def] = &[
    Def {
        name: "qmp_capabilities",
        params: Params::Members(&[opt("enable", Ty::StrList)]),
        build: |a| Command::Capabilities {
            enable: a.str_list("enable"),
        },
    },
    Def {
        name: "query-version",
        params: Params::Members(&[]),
        build: |_| Command::QueryVersion,
    },
    Def {
        name: "query-commands",
        params: Params::Members(&[]),
        build: |_| Command::QueryCommands,
    },
    Def {
        name: "query-status",
        params: Params::Members(&[]),
        build: |_| Command::QueryStatus,
    },
    Def {
        name: "query-name",
        params: Params::Members(&[]),
        build: |_| Command::QueryName,
    },
    Def {
        name: "query-kvm",
        params: Params::Members(&[]),
        build: |_| Command::QueryKvm,
    },
    Def {
        name: "query-machines",
        params: Params::Members(&[opt("compat-props", Ty::Bool)]),
        build: |_| Command::QueryMachines,
    },
    Def {
        name: "query-cpus-fast",
        params: Params::Members(&[]),
        build: |_| Command::QueryCpusFast,
    },
    Def {
        name: "query-pci",
        params: Params::Members(&[]),
        build: |_| Command::QueryPci,
    },
    Def {
        name: "query-block",
        params: Params::Members(&[]),
        build: |_| Command::QueryBlock,
    },
    Def {
        name: "query-blockstats",
        params: Params::Members(&[opt("query-nodes", Ty::Bool)]),
        build: |_| Command::QueryBlockstats,
    },
    Def {
        name: "query-named-block-nodes",
        params: Params::Members(&[opt("flat", Ty::Bool)]),
        build: |_| Command::QueryNamedBlockNodes,
    },
    Def {
        name: "query-qmp-schema",
        params: Params::Members(&[]),
        build: |_| Command::QueryQmpSchema,
    },
    Def {
        name: "query-iothreads",
        params: Params::Members(&[]),
        build: |_| Command::QueryIothreads,
    },
    Def {
        name: "query-chardev",
        params: Params::Members(&[]),
        build: |_| Command::QueryChardev,
    },
    Def {
        name: "qom-list-types",
        params: Params::Members(&[opt("implements", Ty::Str), opt("abstract", Ty::Bool)]),
        build: |a| Command::QomListTypes {
            implements: a.opt_str("implements"),
        },
    },
    Def {
        name: "qom-list",
        params: Params::Members(&[req("path", Ty::Str)]),
        build: |a| Command::QomList {
            path: a.str("path"),
        },
    },
    Def {
        name: "qom-get",
        params: Params::Members(&[req("path", Ty::Str), req("property", Ty::Str)]),
        build: |a| Command::QomGet {
            path: a.str("path"),
            property: a.str("property"),
        },
    },
    Def {
        name: "stop",
        params: Params::Members(&[]),
        build: |_| Command::Stop,
    },
    Def {
        name: "cont",
        params: Params::Members(&[]),
        build: |_| Command::Cont,
    },
    Def {
        name: "migrate",
        params: Params::Members(&[
            req("uri", Ty::Str),
            opt("blk", Ty::Bool),
            opt("inc", Ty::Bool),
            opt("detach", Ty::Bool),
            opt("resume", Ty::Bool),
        ]),
        build: |a| Command::Migrate {
            uri: a.str("uri"),
            blk: a.bool("blk"),
            inc: a.bool("inc"),
            resume: a.bool("resume"),
        },
    },
    Def {
        name: "query-migrate",
        params: Params::Members(&[]),
        build: |_| Command::QueryMigrate,
    },
    Def {
        name: "migrate_cancel",
        params: Params::Members(&[]),
        build: |_| Command::MigrateCancel,
    },
    Def {
        name: "system_reset",
        params: Params::Members(&[]),
        build: |_| Command::SystemReset,
    },
    Def {
        name: "system_powerdown",
        params: Params::Members(&[]),
        build: |_| Command::SystemPowerdown,
    },
    Def {
        name: "quit",
        params: Params::Members(&[]),
        build: |_| Command::Quit,
    },
    Def {
        name: "blockdev-add",
        params: Params::Boxed,
        build: |a| Command::BlockdevAdd(a.0),
    },
    Def {
        name: "blockdev-del",
        params: Params::Members(&[req("node-name", Ty::Str)]),
        build: |a| Command::BlockdevDel {
            node_name: a.str("node-name"),
        },
    },
    Def {
        name: "block_resize",
        params: Params::Members(&[
            opt("device", Ty::Str),
            opt("node-name", Ty::Str),
            req("size", Ty::Int),
        ]),
        build: |a| Command::BlockResize {
            device: a.opt_str("device"),
            node_name: a.opt_str("node-name"),
            size: a.int("size"),
        },
    },
    Def {
        name: "block_set_io_throttle",
        params: Params::Members(&[
            opt("device", Ty::Str),
            opt("id", Ty::Str),
            req("bps", Ty::Int),
            req("bps_rd", Ty::Int),
            req("bps_wr", Ty::Int),
            req("iops", Ty::Int),
            req("iops_rd", Ty::Int),
            req("iops_wr", Ty::Int),
            opt("bps_max", Ty::Int),
            opt("bps_rd_max", Ty::Int),
            opt("bps_wr_max", Ty::Int),
            opt("iops_max", Ty::Int),
            opt("iops_rd_max", Ty::Int),
            opt("iops_wr_max", Ty::Int),
            opt("bps_max_length", Ty::Int),
            opt("bps_rd_max_length", Ty::Int),
            opt("bps_wr_max_length", Ty::Int),
            opt("iops_max_length", Ty::Int),
            opt("iops_rd_max_length", Ty::Int),
            opt("iops_wr_max_length", Ty::Int),
            opt("iops_size", Ty::Int),
            opt("group", Ty::Str),
        ]),
        build: |a| {
            let names = ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"];
            let limits = names.map(|n| {
                [
                    a.int(n),
                    a.int(&format!("{n}_max")),
                    a.int(&format!("{n}_max_length")),
                ]
            });
            Command::BlockSetIoThrottle {
                drive: a.opt_str("device"),
                id: a.opt_str("id"),
                limits: Box::new(limits),
                iops_size: a.int("iops_size"),
                group: a.opt_str("group"),
            }
        },
    },
    Def {
        name: "device_add",
        params: Params::Boxed,
        build: |a| Command::DeviceAdd(a.0),
    },
    Def {
        name: "device_del",
        params: Params::Members(&[req("id", Ty::Str)]),
        build: |a| Command::DeviceDel { id: a.str("id") },
    },
    Def {
        name: "eject",
        params: Params::Members(&[
            opt("device", Ty::Str),
            opt("id", Ty::Str),
            opt("force", Ty::Bool),
        ]),
        build: |a| Command::Eject {
            drive: a.opt_str("device"),
            id: a.opt_str("id"),
            force: a.bool("force"),
        },
    },
    Def {
        name: "blockdev-open-tray",
        params: Params::Members(&[
            opt("device", Ty::Str),
            opt("id", Ty::Str),
            opt("force", Ty::Bool),
        ]),
        build: |a| Command::OpenTray {
            drive: a.opt_str("device"),
            id: a.opt_str("id"),
            force: a.bool("force"),
        },
    },
    Def {
        name: "blockdev-close-tray",
        params: Params::Members(&[opt("device", Ty::Str), opt("id", Ty::Str)]),
        build: |a| Command::CloseTray {
            drive: a.opt_str("device"),
            id: a.opt_str("id"),
        },
    },
    Def {
        name: "blockdev-remove-medium",
        params: Params::Members(&[req("id", Ty::Str)]),
        build: |a| Command::RemoveMedium { id: a.str("id") },
    },
    Def {
        name: "blockdev-insert-medium",
        params: Params::Members(&[req("id", Ty::Str), req("node-name", Ty::Str)]),
        build: |a| Command::InsertMedium {
            id: a.str("id"),
            node_name: a.str("node-name"),
        },
    },
    Def {
        name: "blockdev-change-medium",
        params: Params::Members(&[
            opt("device", Ty::Str),
            opt("id", Ty::Str),
            req("filename", Ty::Str),
            opt("format", Ty::Str),
            opt("force", Ty::Bool),
            opt("read-only-mode", Ty::Str),
        ]),
        build: |a| Command::ChangeMedium {
            drive: a.opt_str("device"),
            id: a.opt_str("id"),
            filename: a.str("filename"),
            format: a.opt_str("format"),
            force: a.bool("force"),
            read_only_mode: a.opt_str("read-only-mode"),
        },
    },
    Def {
        name: "human-monitor-command",
        params: Params::Members(&[req("command-line", Ty::Str), opt("cpu-index", Ty::Int)]),
        build: |a| {
            let _ = a.int("cpu-index");
            Command::HumanMonitorCommand {
                line: a.str("command-line"),
            }
        },
    },
    Def {
        name: "blockdev-snapshot-sync",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "blockdev-snapshot-sync",
            args: a.0,
        },
    },
    Def {
        name: "blockdev-snapshot",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "blockdev-snapshot",
            args: a.0,
        },
    },
    Def {
        name: "transaction",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "transaction",
            args: a.0,
        },
    },
    Def {
        name: "block-commit",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-commit",
            args: a.0,
        },
    },
    Def {
        name: "block-stream",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-stream",
            args: a.0,
        },
    },
    Def {
        name: "drive-mirror",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "drive-mirror",
            args: a.0,
        },
    },
    Def {
        name: "blockdev-mirror",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "blockdev-mirror",
            args: a.0,
        },
    },
    Def {
        name: "drive-backup",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "drive-backup",
            args: a.0,
        },
    },
    Def {
        name: "blockdev-backup",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "blockdev-backup",
            args: a.0,
        },
    },
    Def {
        name: "block-dirty-bitmap-add",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-dirty-bitmap-add",
            args: a.0,
        },
    },
    Def {
        name: "block-dirty-bitmap-remove",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-dirty-bitmap-remove",
            args: a.0,
        },
    },
    Def {
        name: "block-dirty-bitmap-clear",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-dirty-bitmap-clear",
            args: a.0,
        },
    },
    Def {
        name: "block-dirty-bitmap-enable",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-dirty-bitmap-enable",
            args: a.0,
        },
    },
    Def {
        name: "block-dirty-bitmap-disable",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-dirty-bitmap-disable",
            args: a.0,
        },
    },
    Def {
        name: "block-dirty-bitmap-merge",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-dirty-bitmap-merge",
            args: a.0,
        },
    },
    Def {
        name: "query-block-jobs",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "query-block-jobs",
            args: a.0,
        },
    },
    Def {
        name: "query-jobs",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "query-jobs",
            args: a.0,
        },
    },
    Def {
        name: "block-job-set-speed",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-job-set-speed",
            args: a.0,
        },
    },
    Def {
        name: "block-job-pause",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-job-pause",
            args: a.0,
        },
    },
    Def {
        name: "block-job-resume",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-job-resume",
            args: a.0,
        },
    },
    Def {
        name: "block-job-cancel",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-job-cancel",
            args: a.0,
        },
    },
    Def {
        name: "block-job-complete",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-job-complete",
            args: a.0,
        },
    },
    Def {
        name: "block-job-finalize",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-job-finalize",
            args: a.0,
        },
    },
    Def {
        name: "block-job-dismiss",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-job-dismiss",
            args: a.0,
        },
    },
    Def {
        name: "job-pause",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "job-pause",
            args: a.0,
        },
    },
    Def {
        name: "job-resume",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "job-resume",
            args: a.0,
        },
    },
    Def {
        name: "job-cancel",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "job-cancel",
            args: a.0,
        },
    },
    Def {
        name: "job-complete",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "job-complete",
            args: a.0,
        },
    },
    Def {
        name: "job-finalize",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "job-finalize",
            args: a.0,
        },
    },
    Def {
        name: "job-dismiss",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "job-dismiss",
            args: a.0,
        },
    },
    Def {
        name: "nbd-server-start",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "nbd-server-start",
            args: a.0,
        },
    },
    Def {
        name: "nbd-server-add",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "nbd-server-add",
            args: a.0,
        },
    },
    Def {
        name: "nbd-server-remove",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "nbd-server-remove",
            args: a.0,
        },
    },
    Def {
        name: "nbd-server-stop",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "nbd-server-stop",
            args: a.0,
        },
    },
    Def {
        name: "block-export-add",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-export-add",
            args: a.0,
        },
    },
    Def {
        name: "block-export-del",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "block-export-del",
            args: a.0,
        },
    },
    Def {
        name: "query-block-exports",
        params: Params::Boxed,
        build: |a| Command::Block {
            name: "query-block-exports",
            args: a.0,
        },
    },
];

/// The table row of a command name.
pub fn find(name: &str) -> Option<&'static Def> {
    COMMANDS.iter().find(|d| d.name == name)
}

/// Parses a command's arguments into a [`Command`]; `arguments` is the
/// request's `arguments` member (absent is an empty object).
pub fn parse(name: &str, arguments: Map<String, Value>) -> Result<Command, QmpError> {
    let def = find(name).ok_or_else(|| {
        QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    })?;
    if let Params::Members(members) = &def.params {
        for a in members.iter() {
            match arguments.get(a.name) {
                None if !a.optional => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' is missing",
                        a.name
                    )))
                }
                Some(v) if !a.ty.accepts(v) => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for '{}', expected: {}",
                        a.name,
                        a.ty.expected()
                    )))
                }
                _ => {}
            }
        }
        if let Some(k) = arguments
            .keys()
            .find(|k| !members.iter().any(|a| a.name == k.as_str()))
        {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
    }
    Ok((def.build)(Args(arguments)))
}

/// `query-qmp-schema`: every command with its argument object, and the
/// builtin types they use (qapi/introspect.json `SchemaInfo`). Type names
/// are the command's own (QEMU masks them as numbers; clients look them up
/// through the commands, never by name).
pub fn schema() -> Value {
    let mut out = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for d in COMMANDS {
        let arg_type = format!("{}-arg", d.name);
        out.push(serde_json::json!({
            "name": d.name,
            "meta-type": "command",
            "arg-type": arg_type,
            "ret-type": "any",
            "allow-oob": false,
        }));
        let members: Vec<Value> = match &d.params {
            Params::Members(m) => m
                .iter()
                .map(|a| {
                    used.insert(a.ty);
                    let mut v = serde_json::json!({"name": a.name, "type": a.ty.schema_name()});
                    if a.optional {
                        v["default"] = Value::Null;
                    }
                    v
                })
                .collect(),
            Params::Boxed => Vec::new(),
        };
        out.push(serde_json::json!({
            "name": arg_type,
            "meta-type": "object",
            "members": members,
        }));
    }
    for (name, json) in [
        ("str", "string"),
        ("int", "int"),
        ("bool", "boolean"),
        ("any", "value"),
    ] {
        out.push(serde_json::json!({"name": name, "meta-type": "builtin", "json-type": json}));
    }
    if used.contains(&Ty::StrList) {
        out.push(serde_json::json!({"name": "[str]", "meta-type": "array", "element-type": "str"}));
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn argument_errors_have_qemus_words() {
        assert_eq!(
            parse("frob", Map::new()).unwrap_err(),
            QmpError::new(
                ErrorClass::CommandNotFound,
                "The command frob has not been found"
            )
        );
        assert_eq!(
            parse("blockdev-del", Map::new()).unwrap_err().desc,
            "Parameter 'node-name' is missing"
        );
        assert_eq!(
            parse("blockdev-del", args(json!({"node-name": 3})))
                .unwrap_err()
                .desc,
            "Invalid parameter type for 'node-name', expected: string"
        );
        assert_eq!(
            parse("stop", args(json!({"now": true}))).unwrap_err().desc,
            "Parameter 'now' is unexpected"
        );
        assert_eq!(
            parse(
                "human-monitor-command",
                args(json!({"command-line": "info status"}))
            )
            .unwrap(),
            Command::HumanMonitorCommand {
                line: "info status".into()
            }
        );
    }

    #[test]
    fn schema_lists_every_command() {
        let s = schema();
        for d in COMMANDS {
            assert!(s
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == d.name && e["meta-type"] == "command"));
        }
    }
}
