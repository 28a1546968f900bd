//! NBD wire format: constants and parse-then-execute message types shared by
//! the client (`client.rs`) and the server (`server.rs`).
//!
//! Follows the NBD protocol document (`doc/proto.md` of the NBD project):
//! "Newstyle negotiation" (fixed newstyle handshake, `NBD_OPT_*` options and
//! their `NBD_REP_*` replies, `NBD_OPT_INFO`/`NBD_OPT_GO` with the
//! `NBD_INFO_*` items), "Transmission" ("Request message", "Simple reply
//! message", "Structured reply chunk message" and the chunk types),
//! "Metadata querying" (`base:allocation`), "Error values" and the
//! extended headers of `NBD_OPT_EXTENDED_HEADERS` (32-byte requests and
//! reply chunks with 64-bit lengths, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`).
//!
//! Every function here turns bytes from a peer into a typed value after its
//! bounds checks, or an error; none allocates more than its caps allow
//! ([`MAX_OPTION_LEN`], [`MAX_PAYLOAD`], [`MAX_STRING`]) and none panics on
//! any input (the `nbd_proto` fuzz target holds them to that).

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended request (`NBD_OPT_EXTENDED_HEADERS`).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server): fixed newstyle, and no 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// See [`FLAG_FIXED_NEWSTYLE`].
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags, answering the handshake flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// See [`FLAG_C_FIXED_NEWSTYLE`].
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Several connections see one consistent export.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_CACHE` is supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option numbers (`NBD_OPT_*`).
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types (`NBD_REP_*`).
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export of a list.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Error replies have this bit set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_TLS_REQD`: start TLS first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

/// Info types (`NBD_INFO_*`).
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands (`NBD_CMD_*`).
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags (`NBD_CMD_FLAG_*`).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers): the length is that of
/// a payload that follows.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply chunk flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk types (`NBD_REPLY_TYPE_*`).
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (extended headers: 64-bit extents).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads return zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context Strata knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Error values on the wire ("Error values").
pub const EPERM: u32 = 1;
/// `NBD_EIO`.
pub const EIO: u32 = 5;
/// `NBD_ENOMEM`.
pub const ENOMEM: u32 = 12;
/// `NBD_EINVAL`.
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`.
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`.
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`.
pub const ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`.
pub const ESHUTDOWN: u32 = 108;

/// Largest request payload (write data, read length) either side accepts:
/// QEMU's `NBD_MAX_BUFFER_SIZE`, also advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option request or option reply body accepted.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, description, context name) accepted.
pub const MAX_STRING: usize = 4096;
/// Largest non-data structured chunk accepted (block status descriptors,
/// error messages): 1 MiB holds 131071 extents.
pub const MAX_CHUNK_META: u32 = 1 << 20;

/// Request header length.
pub const REQUEST_LEN: usize = 28;
/// Extended request header length.
pub const EXT_REQUEST_LEN: usize = 32;

/// A protocol violation by the peer: the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtoError {}

fn perr<T>(msg: impl Into<String>) -> Result<T, ProtoError> {
    Err(ProtoError(msg.into()))
}

/// A bounds-checked reader over a message body.
struct Cur<'a> {
    b: &'a [u8],
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtoError> {
        if self.b.len() < n {
            return perr(format!("{what}: message too short"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self, what: &str) -> Result<u16, ProtoError> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ProtoError> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ProtoError> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    /// A string of `len` bytes (UTF-8, at most [`MAX_STRING`]).
    fn string(&mut self, len: usize, what: &str) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return perr(format!("{what}: string of {len} bytes is too long"));
        }
        let s = self.take(len, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| ProtoError(format!("{what}: not UTF-8")))
    }
    /// A string prefixed by its u32 length.
    fn string32(&mut self, what: &str) -> Result<String, ProtoError> {
        let n = self.u32(what)? as usize;
        self.string(n, what)
    }
    fn end(&self, what: &str) -> Result<(), ProtoError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            perr(format!("{what}: {} trailing bytes", self.b.len()))
        }
    }
}

// ---------------------------------------------------------------------------
// Handshake ("Newstyle negotiation")

/// The server's greeting: 18 bytes.
pub fn encode_greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Parse the server's greeting (client side): its handshake flags. Only
/// fixed newstyle servers are accepted (oldstyle has no export names).
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, ProtoError> {
    let mut c = Cur { b };
    if c.u64("greeting")? != NBDMAGIC {
        return perr("not an NBD server (bad magic)");
    }
    if c.u64("greeting")? != IHAVEOPT {
        return perr("the server speaks oldstyle NBD, which has no export names");
    }
    let flags = c.u16("greeting")?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return perr("the server does not speak fixed newstyle NBD");
    }
    Ok(flags)
}

/// Header of an option request (client to server), 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*`.
    pub option: u32,
    /// Length of the data that follows (at most [`MAX_OPTION_LEN`]).
    pub len: u32,
}

/// Parse an option request header; its length is capped.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
    let mut c = Cur { b };
    if c.u64("option")? != IHAVEOPT {
        return perr("option request with a bad magic");
    }
    let option = c.u32("option")?;
    let len = c.u32("option")?;
    if len > MAX_OPTION_LEN {
        return perr(format!("option {option} of {len} bytes is too long"));
    }
    Ok(OptionHeader { option, len })
}

/// Encode an option request.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A parsed option request (server side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO` (`go: false`) or `NBD_OPT_GO`.
    Info {
        /// GO (enter transmission) rather than INFO.
        go: bool,
        /// Export name.
        name: String,
        /// Requested `NBD_INFO_*` items.
        infos: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// `NBD_OPT_LIST_META_CONTEXT` (`set: false`) or `SET_META_CONTEXT`.
    MetaContext {
        /// SET rather than LIST.
        set: bool,
        /// Export name.
        export: String,
        /// Queries.
        queries: Vec<String>,
    },
    /// Anything else: answered with `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

/// Parse an option's data. Errors are answered with `NBD_REP_ERR_INVALID`
/// (the framing is intact, so negotiation goes on).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, ProtoError> {
    let mut c = Cur { b: data };
    let o = match option {
        OPT_EXPORT_NAME => ClientOption::ExportName(c.string(data.len(), "export name")?),
        OPT_ABORT => ClientOption::Abort,
        OPT_LIST => {
            c.end("NBD_OPT_LIST")?;
            ClientOption::List
        }
        OPT_STARTTLS => {
            c.end("NBD_OPT_STARTTLS")?;
            ClientOption::StartTls
        }
        OPT_INFO | OPT_GO => {
            let name = c.string32("NBD_OPT_GO")?;
            let n = c.u16("NBD_OPT_GO")? as usize;
            // Each item is two bytes, so the count is bounded by the data.
            let mut infos = Vec::with_capacity(n.min(data.len() / 2));
            for _ in 0..n {
                infos.push(c.u16("NBD_OPT_GO")?);
            }
            c.end("NBD_OPT_GO")?;
            ClientOption::Info {
                go: option == OPT_GO,
                name,
                infos,
            }
        }
        OPT_STRUCTURED_REPLY => {
            c.end("NBD_OPT_STRUCTURED_REPLY")?;
            ClientOption::StructuredReply
        }
        OPT_EXTENDED_HEADERS => {
            c.end("NBD_OPT_EXTENDED_HEADERS")?;
            ClientOption::ExtendedHeaders
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let export = c.string32("meta context")?;
            let n = c.u32("meta context")? as usize;
            let mut queries = Vec::with_capacity(n.min(data.len() / 4));
            for _ in 0..n {
                queries.push(c.string32("meta context")?);
            }
            c.end("meta context")?;
            ClientOption::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                export,
                queries,
            }
        }
        other => ClientOption::Unknown(other),
    };
    Ok(o)
}

/// Encode `NBD_OPT_INFO`/`GO` data.
pub fn encode_go(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// Encode `NBD_OPT_{LIST,SET}_META_CONTEXT` data.
pub fn encode_meta_context(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Encode an option reply.
pub fn encode_option_reply(option: u32, rtype: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&rtype.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Header of an option reply (server to client), 20 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// `NBD_REP_*`.
    pub rtype: u32,
    /// Length of the data (at most [`MAX_OPTION_LEN`]).
    pub len: u32,
}

/// Parse an option reply header; it must answer `expect`.
pub fn parse_option_reply_header(
    b: &[u8; 20],
    expect: u32,
) -> Result<OptionReplyHeader, ProtoError> {
    let mut c = Cur { b };
    if c.u64("option reply")? != REPLY_MAGIC {
        return perr("option reply with a bad magic");
    }
    let option = c.u32("option reply")?;
    let rtype = c.u32("option reply")?;
    let len = c.u32("option reply")?;
    if option != expect {
        return perr(format!("reply to option {option}, expected {expect}"));
    }
    if len > MAX_OPTION_LEN {
        return perr(format!("option reply of {len} bytes is too long"));
    }
    Ok(OptionReplyHeader { option, rtype, len })
}

/// What a server said about an export in `NBD_REP_INFO` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum, preferred and maximum block sizes, when sent.
    pub block_size: Option<(u32, u32, u32)>,
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoItem {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Size.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
    BlockSize(u32, u32, u32),
    /// Name, description or an unknown item: ignored.
    Other(u16),
}

/// Parse the data of an `NBD_REP_INFO` reply (client side).
pub fn parse_info(data: &[u8]) -> Result<InfoItem, ProtoError> {
    let mut c = Cur { b: data };
    let t = c.u16("NBD_REP_INFO")?;
    Ok(match t {
        INFO_EXPORT => {
            let size = c.u64("NBD_INFO_EXPORT")?;
            let flags = c.u16("NBD_INFO_EXPORT")?;
            c.end("NBD_INFO_EXPORT")?;
            if size > i64::MAX as u64 {
                return perr(format!("export size {size} is too large"));
            }
            InfoItem::Export { size, flags }
        }
        INFO_BLOCK_SIZE => {
            let min = c.u32("NBD_INFO_BLOCK_SIZE")?;
            let pref = c.u32("NBD_INFO_BLOCK_SIZE")?;
            let max = c.u32("NBD_INFO_BLOCK_SIZE")?;
            c.end("NBD_INFO_BLOCK_SIZE")?;
            // "Block size constraints": powers of two, min <= pref <= max
            // (max need only be a multiple of min).
            if !min.is_power_of_two()
                || min > 64 << 10
                || !pref.is_power_of_two()
                || pref < min
                || max < pref
                || !max.is_multiple_of(min)
            {
                return perr(format!(
                    "invalid block sizes: minimum {min}, preferred {pref}, maximum {max}"
                ));
            }
            InfoItem::BlockSize(min, pref, max)
        }
        other => InfoItem::Other(other),
    })
}

/// Encode `NBD_INFO_EXPORT` data.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// Encode `NBD_INFO_BLOCK_SIZE` data.
pub fn encode_info_block_size(min: u32, pref: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for x in [min, pref, max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// Encode an `NBD_INFO_NAME`/`NBD_INFO_DESCRIPTION` item.
pub fn encode_info_string(t: u16, s: &str) -> Vec<u8> {
    let mut v = t.to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// Parse an `NBD_REP_META_CONTEXT` reply: (context id, name).
pub fn parse_meta_context_reply(data: &[u8]) -> Result<(u32, String), ProtoError> {
    let mut c = Cur { b: data };
    let id = c.u32("NBD_REP_META_CONTEXT")?;
    let name = c.string(data.len() - 4, "NBD_REP_META_CONTEXT")?;
    Ok((id, name))
}

/// Parse the reply to `NBD_OPT_EXPORT_NAME` (size, flags), after which any
/// 124 zero bytes the server sends are the caller's to skip.
pub fn parse_export_name_reply(b: &[u8; 10]) -> Result<ExportInfo, ProtoError> {
    let mut c = Cur { b };
    let size = c.u64("export")?;
    let flags = c.u16("export")?;
    if size > i64::MAX as u64 {
        return perr(format!("export size {size} is too large"));
    }
    Ok(ExportInfo {
        size,
        flags,
        block_size: None,
    })
}

// ---------------------------------------------------------------------------
// Transmission: requests

/// A request header as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub cmd: u16,
    /// The cookie (handle) echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (at most 32 bits unless extended headers were negotiated).
    pub len: u64,
}

impl RequestHeader {
    /// Encode as 28 bytes (the caller keeps `len` within 32 bits).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&(self.len as u32).to_be_bytes());
        b
    }
    /// Encode as an extended request (32 bytes).
    pub fn encode_ext(&self) -> [u8; EXT_REQUEST_LEN] {
        let mut b = [0u8; EXT_REQUEST_LEN];
        b[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.len.to_be_bytes());
        b
    }
    /// Decode 28 bytes; only the magic is checked here.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, ProtoError> {
        let mut c = Cur { b };
        if c.u32("request")? != REQUEST_MAGIC {
            return perr("request with a bad magic");
        }
        Ok(RequestHeader {
            flags: c.u16("request")?,
            cmd: c.u16("request")?,
            cookie: c.u64("request")?,
            offset: c.u64("request")?,
            len: c.u32("request")? as u64,
        })
    }
    /// Decode an extended request (32 bytes); only the magic is checked.
    pub fn decode_ext(b: &[u8; EXT_REQUEST_LEN]) -> Result<Self, ProtoError> {
        let mut c = Cur { b };
        if c.u32("request")? != EXTENDED_REQUEST_MAGIC {
            return perr("extended request with a bad magic");
        }
        Ok(RequestHeader {
            flags: c.u16("request")?,
            cmd: c.u16("request")?,
            cookie: c.u64("request")?,
            offset: c.u64("request")?,
            len: c.u64("request")?,
        })
    }
}

/// A checked request (server side): what to execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write the `len` bytes of payload that follow.
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Close the connection.
    Disc,
    /// Flush.
    Flush,
    /// Discard.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Durable before the reply.
        fua: bool,
    },
    /// Prefetch (advisory).
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Durable before the reply.
        fua: bool,
        /// Deallocation is not allowed.
        no_hole: bool,
        /// Fail rather than fall back to a slow write.
        fast_zero: bool,
    },
    /// `base:allocation` status.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Only one extent.
        req_one: bool,
    },
}

/// What a server must do with a request it cannot execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Reply with this error (after reading and dropping `skip` payload
    /// bytes): the framing is intact.
    Reply {
        /// Cookie to answer.
        cookie: u64,
        /// NBD error value.
        error: u32,
        /// Payload bytes still to read and drop (at most [`MAX_PAYLOAD`]).
        skip: u32,
        /// Why (for the log).
        why: String,
    },
    /// The stream cannot be trusted any more: drop the connection.
    Fatal(ProtoError),
}

/// What the server offers, against which requests are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Export size.
    pub size: u64,
    /// Transmission flags sent.
    pub flags: u16,
    /// The client negotiated structured replies (needed for block status).
    pub structured: bool,
    /// The client selected a metadata context (`base:allocation` or a
    /// dirty bitmap), so block status may be asked.
    pub base_allocation: bool,
    /// Extended headers were negotiated (64-bit lengths, payload flag).
    pub extended: bool,
}

/// Check a request header against the export ("Request types" and the
/// per-command rules). A payload's length is checked before anything
/// else so a hostile length never makes the server allocate.
///
/// With extended headers, `NBD_CMD_FLAG_PAYLOAD_LEN` says the length is
/// that of a payload: only a write may carry one here (the server does not
/// offer `NBD_FLAG_BLOCK_STAT_PAYLOAD`), so on other commands the payload
/// is dropped and the request refused.
pub fn check_request(h: &RequestHeader, ex: &ExportLimits) -> Result<Command, RequestError> {
    let reply = |error: u32, skip: u32, why: String| RequestError::Reply {
        cookie: h.cookie,
        error,
        skip,
        why,
    };
    let payload_flag = ex.extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    let has_payload = h.cmd == CMD_WRITE || payload_flag;
    if has_payload && h.len > MAX_PAYLOAD as u64 {
        return Err(RequestError::Fatal(ProtoError(format!(
            "request payload of {} bytes is larger than {MAX_PAYLOAD}",
            h.len
        ))));
    }
    // Fits: checked just above.
    let skip = if has_payload { h.len as u32 } else { 0 };
    let mut known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if ex.extended {
        known |= CMD_FLAG_PAYLOAD_LEN;
    }
    if h.flags & !known != 0 {
        return Err(reply(EINVAL, skip, format!("unknown flags {:#x}", h.flags)));
    }
    if payload_flag && h.cmd != CMD_WRITE {
        return Err(reply(
            EINVAL,
            skip,
            format!("command {} takes no payload", h.cmd),
        ));
    }
    let ro = ex.flags & TF_READ_ONLY != 0;
    let in_range = |len: u64| h.offset.checked_add(len).is_some_and(|end| end <= ex.size);
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.len);
    match h.cmd {
        CMD_READ => {
            if len > MAX_PAYLOAD as u64 {
                return Err(reply(
                    EINVAL,
                    0,
                    format!("read of {len} bytes is too large"),
                ));
            }
            if !in_range(len) {
                return Err(reply(EINVAL, 0, "read beyond the end".into()));
            }
            Ok(Command::Read {
                offset,
                len: len as u32,
            })
        }
        CMD_WRITE => {
            if ro {
                return Err(reply(EPERM, skip, "write to a read-only export".into()));
            }
            if !in_range(len) {
                return Err(reply(ENOSPC, skip, "write beyond the end".into()));
            }
            Ok(Command::Write {
                offset,
                len: len as u32,
                fua,
            })
        }
        CMD_DISC => Ok(Command::Disc),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM | CMD_WRITE_ZEROES => {
            if ro {
                return Err(reply(EPERM, 0, "write to a read-only export".into()));
            }
            if !in_range(len) {
                return Err(reply(ENOSPC, 0, "request beyond the end".into()));
            }
            if h.cmd == CMD_TRIM {
                Ok(Command::Trim { offset, len, fua })
            } else {
                Ok(Command::WriteZeroes {
                    offset,
                    len,
                    fua,
                    no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                    fast_zero: h.flags & CMD_FLAG_FAST_ZERO != 0,
                })
            }
        }
        CMD_CACHE => {
            if !in_range(len) {
                return Err(reply(EINVAL, 0, "cache beyond the end".into()));
            }
            Ok(Command::Cache { offset, len })
        }
        CMD_BLOCK_STATUS => {
            if !ex.structured || !ex.base_allocation {
                return Err(reply(EINVAL, 0, "no metadata context negotiated".into()));
            }
            if len == 0 || !in_range(len) {
                return Err(reply(EINVAL, 0, "block status beyond the end".into()));
            }
            Ok(Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        other => Err(reply(EINVAL, skip, format!("unknown command {other}"))),
    }
}

// ---------------------------------------------------------------------------
// Transmission: replies

/// Encode a simple reply (16 bytes).
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encode a structured reply chunk header (20 bytes).
pub fn encode_chunk_header(flags: u16, rtype: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&rtype.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encode an extended reply chunk header (32 bytes); `offset` is that of
/// the request it answers.
pub fn encode_ext_chunk_header(
    flags: u16,
    rtype: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&rtype.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..].copy_from_slice(&len.to_be_bytes());
    b
}

/// A chunk header in the negotiated form: extended or structured (whose
/// length the caller keeps within 32 bits).
pub fn encode_chunk(
    extended: bool,
    flags: u16,
    rtype: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    if extended {
        encode_ext_chunk_header(flags, rtype, cookie, offset, len).to_vec()
    } else {
        encode_chunk_header(flags, rtype, cookie, len as u32).to_vec()
    }
}

/// Encode an `NBD_REPLY_TYPE_ERROR` chunk (header and payload), final, in
/// the negotiated form.
pub fn encode_error_chunk(
    extended: bool,
    cookie: u64,
    offset: u64,
    error: u32,
    msg: &str,
) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
    let mut v = encode_chunk(
        extended,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        offset,
        6 + msg.len() as u64,
    );
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// The header of a reply: simple, or one structured chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply; for a successful read, the data follows.
    Simple {
        /// Cookie.
        cookie: u64,
        /// NBD error (0: success).
        error: u32,
    },
    /// A structured or extended chunk header.
    Chunk {
        /// `NBD_REPLY_FLAG_*`.
        flags: u16,
        /// `NBD_REPLY_TYPE_*`.
        rtype: u16,
        /// Cookie.
        cookie: u64,
        /// Payload length (not yet checked against the request).
        len: u64,
    },
}

/// Bytes of a reply header that follow the 4-byte magic.
pub fn reply_rest_len(magic: u32) -> Result<usize, ProtoError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(12),
        STRUCTURED_REPLY_MAGIC => Ok(16),
        EXTENDED_REPLY_MAGIC => Ok(28),
        m => perr(format!("reply with a bad magic {m:#x}")),
    }
}

/// Parse a reply header: `magic` and the [`reply_rest_len`] bytes after it.
pub fn parse_reply_header(magic: u32, rest: &[u8]) -> Result<ReplyHeader, ProtoError> {
    let mut c = Cur { b: rest };
    let h = match magic {
        SIMPLE_REPLY_MAGIC => {
            let error = c.u32("reply")?;
            let cookie = c.u64("reply")?;
            ReplyHeader::Simple { cookie, error }
        }
        STRUCTURED_REPLY_MAGIC => {
            let flags = c.u16("reply")?;
            let rtype = c.u16("reply")?;
            let cookie = c.u64("reply")?;
            let len = c.u32("reply")? as u64;
            ReplyHeader::Chunk {
                flags,
                rtype,
                cookie,
                len,
            }
        }
        EXTENDED_REPLY_MAGIC => {
            let flags = c.u16("reply")?;
            let rtype = c.u16("reply")?;
            let cookie = c.u64("reply")?;
            // The request's offset echoed: nothing relies on it.
            let _offset = c.u64("reply")?;
            let len = c.u64("reply")?;
            ReplyHeader::Chunk {
                flags,
                rtype,
                cookie,
                len,
            }
        }
        m => return perr(format!("reply with a bad magic {m:#x}")),
    };
    c.end("reply")?;
    Ok(h)
}

/// A structured chunk's payload, other than the data of `OFFSET_DATA`
/// (which the client reads straight into the request's buffers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: zeroes at `offset`.
    Hole {
        /// Offset in the export.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` or `_EXT`: (length, flags)
    /// descriptors.
    BlockStatus {
        /// Context id.
        context: u32,
        /// Descriptors.
        extents: Vec<(u64, u64)>,
    },
    /// `NBD_REPLY_TYPE_ERROR`/`ERROR_OFFSET`.
    Error {
        /// NBD error value (non-zero).
        error: u32,
        /// The server's message.
        message: String,
    },
}

/// Check a chunk header's length before anything is read: the payload must
/// fit what the request could legitimately get back. `req_len` is the
/// request's length.
pub fn check_chunk_len(rtype: u16, len: u64, req_len: u32) -> Result<(), ProtoError> {
    let max: u64 = match rtype {
        REPLY_TYPE_NONE => 0,
        REPLY_TYPE_OFFSET_DATA => 8 + req_len as u64,
        REPLY_TYPE_OFFSET_HOLE => 12,
        REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => MAX_CHUNK_META as u64,
        REPLY_TYPE_ERROR => 6 + MAX_STRING as u64,
        REPLY_TYPE_ERROR_OFFSET => 14 + MAX_STRING as u64,
        t if t & (1 << 15) != 0 => 6 + MAX_STRING as u64,
        t => return perr(format!("unknown structured reply type {t}")),
    };
    if len > max {
        return perr(format!(
            "structured reply chunk of type {rtype} has {len} bytes, at most {max} allowed"
        ));
    }
    Ok(())
}

/// Parse a (length-checked) chunk payload of any type but `OFFSET_DATA`.
pub fn parse_chunk(rtype: u16, data: &[u8]) -> Result<Chunk, ProtoError> {
    let mut c = Cur { b: data };
    let chunk = match rtype {
        REPLY_TYPE_NONE => Chunk::None,
        REPLY_TYPE_OFFSET_HOLE => {
            let offset = c.u64("hole")?;
            let len = c.u32("hole")?;
            if len == 0 {
                return perr("empty hole chunk");
            }
            Chunk::Hole { offset, len }
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let context = c.u32("block status")?;
            if c.b.is_empty() || !c.b.len().is_multiple_of(8) {
                return perr("block status chunk without whole descriptors");
            }
            let mut extents = Vec::with_capacity(c.b.len() / 8);
            while !c.b.is_empty() {
                let l = c.u32("block status")?;
                let f = c.u32("block status")?;
                extents.push((l as u64, f as u64));
            }
            Chunk::BlockStatus { context, extents }
        }
        REPLY_TYPE_BLOCK_STATUS_EXT => {
            let context = c.u32("block status")?;
            let count = c.u32("block status")? as usize;
            // The count must match the payload exactly, which also bounds
            // the allocation by the (capped) chunk length.
            if count == 0 || c.b.len() / 16 != count || !c.b.len().is_multiple_of(16) {
                return perr("extended block status chunk whose count does not match");
            }
            let mut extents = Vec::with_capacity(count);
            while !c.b.is_empty() {
                let l = c.u64("block status")?;
                let f = c.u64("block status")?;
                extents.push((l, f));
            }
            Chunk::BlockStatus { context, extents }
        }
        t if t & (1 << 15) != 0 => {
            let error = c.u32("error chunk")?;
            let mlen = c.u16("error chunk")? as usize;
            let message = String::from_utf8_lossy(c.take(mlen, "error chunk")?).into_owned();
            if t == REPLY_TYPE_ERROR_OFFSET {
                let _ = c.u64("error chunk")?;
            }
            if error == 0 {
                return perr("error chunk with error 0");
            }
            Chunk::Error { error, message }
        }
        t => return perr(format!("unexpected structured reply type {t}")),
    };
    Ok(chunk)
}

/// Parse the 8-byte offset of an `OFFSET_DATA` chunk and check that its
/// `data_len` bytes lie inside the request `[req_off, req_off + req_len)`.
/// Returns the position of the data in the request's buffer.
pub fn check_data_chunk(
    offset_bytes: &[u8; 8],
    data_len: u32,
    req_off: u64,
    req_len: u32,
) -> Result<usize, ProtoError> {
    let off = u64::from_be_bytes(*offset_bytes);
    check_in_request(off, data_len as u64, req_off, req_len)
}

/// Check that `[off, off + len)` lies inside the request; the position in
/// its buffer.
pub fn check_in_request(
    off: u64,
    len: u64,
    req_off: u64,
    req_len: u32,
) -> Result<usize, ProtoError> {
    // The request is the client's own, but checked arithmetic costs nothing
    // and keeps this total for any input.
    let req_end = req_off.saturating_add(req_len as u64);
    match off.checked_add(len) {
        Some(end) if off >= req_off && end <= req_end && len > 0 => Ok((off - req_off) as usize),
        _ => perr(format!(
            "reply chunk at {off}+{len} outside the request at {req_off}+{req_len}"
        )),
    }
}

/// Map an errno to its NBD error value.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Map an NBD error value to an errno (unknown values are EIO).
pub fn nbd_to_errno(e: u32) -> i32 {
    match e {
        EPERM => libc::EPERM,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// Feed arbitrary bytes to every parser (the `nbd_proto` fuzz target): none
/// may panic or allocate beyond its caps.
pub fn fuzz_parsers(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let word = |b: &[u8]| -> u32 {
        let mut a = [0u8; 4];
        for (d, s) in a.iter_mut().zip(b) {
            *d = *s;
        }
        u32::from_be_bytes(a)
    };
    match sel % 10 {
        0 => {
            if let Ok(b) = <[u8; 18]>::try_from(&rest[..rest.len().min(18)]) {
                let _ = parse_greeting(&b);
            }
        }
        1 => {
            if let Ok(b) = <[u8; 16]>::try_from(&rest[..rest.len().min(16)]) {
                let _ = parse_option_header(&b);
            }
        }
        2 => {
            let opt = word(rest) % 12;
            let _ = parse_option(opt, rest.get(4..).unwrap_or(&[]));
        }
        3 => {
            let _ = parse_info(rest);
            let _ = parse_meta_context_reply(rest);
            if let Ok(b) = <[u8; 20]>::try_from(&rest[..rest.len().min(20)]) {
                let _ = parse_option_reply_header(&b, word(rest));
            }
        }
        4 => {
            if let Ok(b) = <[u8; REQUEST_LEN]>::try_from(&rest[..rest.len().min(REQUEST_LEN)]) {
                if let Ok(h) = RequestHeader::decode(&b) {
                    let ex = ExportLimits {
                        size: word(&rest[REQUEST_LEN.min(rest.len())..]) as u64,
                        flags: TF_HAS_FLAGS,
                        structured: true,
                        base_allocation: true,
                        extended: false,
                    };
                    let _ = check_request(&h, &ex);
                }
            }
        }
        5 => {
            let magic = word(rest);
            if let Ok(n) = reply_rest_len(magic) {
                let _ = parse_reply_header(magic, rest.get(4..4 + n).unwrap_or(&[]));
            }
        }
        6 => {
            let rtype = (word(rest) >> 16) as u16;
            let body = rest.get(2..).unwrap_or(&[]);
            if check_chunk_len(rtype, body.len() as u64, 4096).is_ok() {
                let _ = parse_chunk(rtype, body);
            }
        }
        8 => {
            let n = EXT_REQUEST_LEN;
            if let Ok(b) = <[u8; EXT_REQUEST_LEN]>::try_from(&rest[..rest.len().min(n)]) {
                if let Ok(h) = RequestHeader::decode_ext(&b) {
                    let ex = ExportLimits {
                        size: word(&rest[n.min(rest.len())..]) as u64,
                        flags: TF_HAS_FLAGS,
                        structured: true,
                        base_allocation: true,
                        extended: true,
                    };
                    let _ = check_request(&h, &ex);
                }
            }
        }
        9 => {
            // An extended reply header, then its payload as the chunk.
            if rest.len() >= 32 {
                let magic = word(rest);
                if let Ok(ReplyHeader::Chunk { rtype, len, .. }) =
                    parse_reply_header(magic, &rest[4..32])
                {
                    let body = &rest[32..];
                    let len = len.min(body.len() as u64);
                    if check_chunk_len(rtype, len, 4096).is_ok() {
                        let _ = parse_chunk(rtype, &body[..len as usize]);
                    }
                }
            }
            let _ = parse_chunk(REPLY_TYPE_BLOCK_STATUS_EXT, rest);
        }
        _ => {
            if rest.len() >= 20 {
                let mut o = [0u8; 8];
                o.copy_from_slice(&rest[..8]);
                let req_off = u64::from_be_bytes(rest[8..16].try_into().unwrap_or([0; 8]));
                let _ = check_data_chunk(&o, word(&rest[16..]), req_off, word(&rest[12..]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_checks() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            len: 512,
        };
        let d = RequestHeader::decode(&h.encode()).unwrap();
        assert_eq!(d, h);
        let ex = ExportLimits {
            size: 8192,
            flags: TF_HAS_FLAGS,
            structured: false,
            base_allocation: false,
            extended: false,
        };
        assert_eq!(
            check_request(&d, &ex).unwrap(),
            Command::Write {
                offset: 4096,
                len: 512,
                fua: true
            }
        );
        // Beyond the end: an error reply after dropping the payload.
        let far = RequestHeader { offset: 8000, ..h };
        assert!(matches!(
            check_request(&far, &ex),
            Err(RequestError::Reply { skip: 512, .. })
        ));
        // Offset overflow.
        let wrap = RequestHeader {
            offset: u64::MAX,
            cmd: CMD_READ,
            ..h
        };
        assert!(matches!(
            check_request(&wrap, &ex),
            Err(RequestError::Reply { .. })
        ));
        // An oversized write payload ends the connection.
        let huge = RequestHeader {
            len: u32::MAX as u64,
            ..h
        };
        assert!(matches!(
            check_request(&huge, &ex),
            Err(RequestError::Fatal(_))
        ));
        // Block status needs a negotiated context.
        let bs = RequestHeader {
            cmd: CMD_BLOCK_STATUS,
            flags: 0,
            offset: 0,
            ..h
        };
        assert!(check_request(&bs, &ex).is_err());
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(RequestHeader::decode(&bad).is_err());
    }

    #[test]
    fn extended_headers() {
        let h = RequestHeader {
            flags: 0,
            cmd: CMD_TRIM,
            cookie: 9,
            offset: 1 << 20,
            len: 5 << 30,
        };
        let b = h.encode_ext();
        assert_eq!(RequestHeader::decode_ext(&b).unwrap(), h);
        assert!(RequestHeader::decode(&b[..REQUEST_LEN].try_into().unwrap()).is_err());
        let ex = ExportLimits {
            size: 8 << 30,
            flags: TF_HAS_FLAGS,
            structured: true,
            base_allocation: true,
            extended: true,
        };
        // A 64-bit effect length.
        assert_eq!(
            check_request(&h, &ex).unwrap(),
            Command::Trim {
                offset: 1 << 20,
                len: 5 << 30,
                fua: false
            }
        );
        // A payload on a command that takes none: dropped, refused.
        let p = RequestHeader {
            flags: CMD_FLAG_PAYLOAD_LEN,
            cmd: CMD_BLOCK_STATUS,
            len: 24,
            ..h
        };
        assert!(matches!(
            check_request(&p, &ex),
            Err(RequestError::Reply { skip: 24, .. })
        ));
        // ... a huge one ends the connection.
        let p = RequestHeader { len: 1 << 40, ..p };
        assert!(matches!(
            check_request(&p, &ex),
            Err(RequestError::Fatal(_))
        ));
        // The flag is unknown without extended headers.
        let compact = ExportLimits {
            extended: false,
            ..ex
        };
        let p = RequestHeader { len: 0, ..p };
        assert!(check_request(&p, &compact).is_err());

        let e = encode_error_chunk(true, 3, 4096, EIO, "bad");
        assert_eq!(e.len(), 32 + 6 + 3);
        let ReplyHeader::Chunk { rtype, len, .. } =
            parse_reply_header(EXTENDED_REPLY_MAGIC, &e[4..32]).unwrap()
        else {
            panic!()
        };
        assert_eq!((rtype, len), (REPLY_TYPE_ERROR, 9));
        let mut bs = 1u32.to_be_bytes().to_vec();
        bs.extend_from_slice(&2u32.to_be_bytes());
        for (l, f) in [(1u64 << 33, 0u64), (512, 3)] {
            bs.extend_from_slice(&l.to_be_bytes());
            bs.extend_from_slice(&f.to_be_bytes());
        }
        assert_eq!(
            parse_chunk(REPLY_TYPE_BLOCK_STATUS_EXT, &bs).unwrap(),
            Chunk::BlockStatus {
                context: 1,
                extents: vec![(1 << 33, 0), (512, 3)]
            }
        );
        // A count that lies.
        bs[7] = 3;
        assert!(parse_chunk(REPLY_TYPE_BLOCK_STATUS_EXT, &bs).is_err());
        assert!(check_chunk_len(REPLY_TYPE_BLOCK_STATUS_EXT, u64::MAX, 4096).is_err());
    }

    #[test]
    fn options() {
        let go = encode_go("disk", &[INFO_BLOCK_SIZE]);
        assert_eq!(
            parse_option(OPT_GO, &go).unwrap(),
            ClientOption::Info {
                go: true,
                name: "disk".into(),
                infos: vec![INFO_BLOCK_SIZE]
            }
        );
        // A count larger than the data is refused without allocating it.
        let mut lying = encode_go("", &[]);
        lying[4] = 0xff;
        lying[5] = 0xff;
        assert!(parse_option(OPT_GO, &lying).is_err());
        let mc = encode_meta_context("", &[BASE_ALLOCATION]);
        assert!(matches!(
            parse_option(OPT_SET_META_CONTEXT, &mc).unwrap(),
            ClientOption::MetaContext { set: true, .. }
        ));
        let mut lying = mc.clone();
        lying[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(OPT_SET_META_CONTEXT, &lying).is_err());
        let hdr: [u8; 16] = encode_option(OPT_GO, &[0; 4])[..16].try_into().unwrap();
        assert_eq!(parse_option_header(&hdr).unwrap().len, 4);
        let big: [u8; 16] = {
            let mut b = hdr;
            b[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
            b
        };
        assert!(parse_option_header(&big).is_err());
    }

    #[test]
    fn replies() {
        assert!(check_chunk_len(REPLY_TYPE_OFFSET_DATA, 8 + 4096, 4096).is_ok());
        assert!(check_chunk_len(REPLY_TYPE_OFFSET_DATA, 9 + 4096, 4096).is_err());
        assert!(check_chunk_len(REPLY_TYPE_BLOCK_STATUS, u32::MAX as u64, 4096).is_err());
        assert!(check_chunk_len(77, 0, 4096).is_err());
        assert_eq!(
            check_data_chunk(&4096u64.to_be_bytes(), 512, 0, 8192).unwrap(),
            4096
        );
        assert!(check_data_chunk(&8000u64.to_be_bytes(), 512, 0, 8192).is_err());
        assert!(check_data_chunk(&u64::MAX.to_be_bytes(), 512, 0, 8192).is_err());
        let e = encode_error_chunk(false, 3, 0, EIO, "bad");
        let ReplyHeader::Chunk { rtype, len, .. } =
            parse_reply_header(STRUCTURED_REPLY_MAGIC, &e[4..20]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            parse_chunk(rtype, &e[20..20 + len as usize]).unwrap(),
            Chunk::Error {
                error: EIO,
                message: "bad".into()
            }
        );
        assert!(parse_chunk(REPLY_TYPE_BLOCK_STATUS, &[0, 0, 0, 1, 0, 0]).is_err());
        for i in 0..2000u32 {
            let b: Vec<u8> = (0..64)
                .map(|j| (i.wrapping_mul(31) ^ (j * 7)) as u8)
                .collect();
            fuzz_parsers(&b);
        }
    }
}
