//! The `luks` format driver: LUKS1 images ([`formats::luks`]) as QEMU's
//! `luks` driver opens and creates them. The class probes the magic and
//! creates images (`key-secret`, `cipher-alg`, `cipher-mode`, `ivgen-alg`,
//! `ivgen-hash-alg`, `hash-alg`, `iter-time`); the node unlocks the image
//! with the secret object named by `key-secret` and encrypts and
//! decrypts its payload sector by sector over the `file` child.

use crate::driver::{BlockDriver, Limits};
use crate::error::{BlockError, BlockResult};
use crate::format::{
    block_error, CreateOpts, DriverClass, DriverKind, ImageInfo, InfoValue, NodeStorage, OptSpec,
    OptType,
};
use crate::graph::OpenCtx;
use crate::node::Node;
use formats::error::FormatError;
use formats::luks::{self, CipherSpec, HashAlg, IvGen, Luks, Mode, SECTOR};
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The `luks` class.
pub struct LuksClass;

const LUKS_OPTS: &[OptSpec] = &[
    crate::format::SIZE,
    OptSpec::new(
        "key-secret",
        OptType::Str,
        "ID of secret providing the LUKS passphrase",
    ),
    OptSpec::new(
        "cipher-alg",
        OptType::Str,
        "Name of encryption cipher algorithm",
    ),
    OptSpec::new(
        "cipher-mode",
        OptType::Str,
        "Name of encryption cipher mode",
    ),
    OptSpec::new("ivgen-alg", OptType::Str, "Name of IV generator algorithm"),
    OptSpec::new(
        "ivgen-hash-alg",
        OptType::Str,
        "Name of IV generator hash algorithm",
    ),
    OptSpec::new(
        "hash-alg",
        OptType::Str,
        "Name of encryption hash algorithm",
    ),
    OptSpec::new(
        "iter-time",
        OptType::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
];

/// QEMU's default `iter-time`.
const ITER_TIME_DEFAULT: u64 = 2000;

/// The secret named `id`, or an error naming it and the option.
pub fn secret_of(option: &str, id: &str) -> BlockResult<Arc<Vec<u8>>> {
    crate::objects::secret(id).map_err(|e| BlockError::Open(format!("{option}: {e}")))
}

/// The cipher and hash a create asks for (QEMU's defaults: aes-256,
/// xts, plain64, sha256).
fn create_spec(opts: &CreateOpts) -> BlockResult<(CipherSpec, HashAlg)> {
    let bad = |m: String| BlockError::Invalid(m);
    let alg = opts.str("cipher-alg").unwrap_or("aes-256");
    let bits: usize = match alg {
        "aes-128" => 128,
        "aes-192" => 192,
        "aes-256" => 256,
        _ => return Err(bad(format!("Cipher algorithm '{alg}' is not supported"))),
    };
    let mode = match opts.str("cipher-mode").unwrap_or("xts") {
        "xts" => Mode::Xts,
        "cbc" => Mode::Cbc,
        m => return Err(bad(format!("Cipher mode '{m}' is not supported"))),
    };
    let hash_of = |key: &str| -> BlockResult<HashAlg> {
        let v = opts.str(key).unwrap_or("sha256");
        HashAlg::parse(v).ok_or_else(|| bad(format!("Hash algorithm '{v}' is not supported")))
    };
    let ivgen = match opts.str("ivgen-alg").unwrap_or("plain64") {
        "plain" => IvGen::Plain,
        "plain64" => IvGen::Plain64,
        "essiv" => IvGen::Essiv(hash_of("ivgen-hash-alg")?),
        g => return Err(bad(format!("IV generator '{g}' is not supported"))),
    };
    let key_bytes = match mode {
        Mode::Xts => bits / 8 * 2,
        Mode::Cbc => bits / 8,
    };
    let modestr = CipherSpec {
        key_bytes,
        mode,
        ivgen,
    }
    .mode_string();
    let spec = CipherSpec::from_header("aes", &modestr, key_bytes as u32).map_err(bad)?;
    Ok((spec, hash_of("hash-alg")?))
}

/// The bytes of the LUKS header `opts` make (its payload offset), for
/// `measure`.
pub fn header_len(opts: &CreateOpts) -> BlockResult<u64> {
    let (cipher, hash) = create_spec(opts)?;
    let o = luks::CreateOptions {
        cipher,
        hash,
        slot_iterations: 0,
        mk_iterations: 0,
        uuid: String::new(),
    };
    Ok(luks::layout(&o).payload_bytes())
}

/// Refuse unknown ciphers, modes, IV generators and hashes before
/// anything is created.
pub fn check_create(opts: &CreateOpts) -> BlockResult<()> {
    create_spec(opts).map(|_| ())
}

fn random_bytes(n: usize) -> BlockResult<Vec<u8>> {
    use std::io::Read;
    let mut v = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut v))
        .map_err(|e| BlockError::io(e.raw_os_error().unwrap_or(libc::EIO), "/dev/urandom"))?;
    Ok(v)
}

/// 16 random bytes as a version 4 UUID's text.
fn uuid_string(u: [u8; 16]) -> String {
    let mut u = u;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    formats::uuid_string(&u)
}

/// The LUKS create options nested under `prefix` in `opts` (qcow2's
/// `encrypt.cipher-alg`, ...), under their own names.
pub fn nested_opts(opts: &CreateOpts, prefix: &str) -> CreateOpts {
    let mut o = CreateOpts::default();
    for spec in LUKS_OPTS {
        if let Some(v) = opts.get(&format!("{prefix}{}", spec.name)) {
            o.set(spec.name, v.clone());
        }
    }
    o
}

/// A new LUKS header, key slot 0 opened by `secret`, as the bytes of a
/// volume whose payload is kept elsewhere (qcow2's clusters): the
/// header up to its payload offset.
pub fn header_blob(opts: &CreateOpts, secret: &[u8]) -> BlockResult<Vec<u8>> {
    let mem = formats::storage::MemStorage::new(Vec::new(), formats::qcow2::crypt::MAX_LUKS_HEADER);
    let payload = create_on(&mem, opts, secret)?;
    let mut blob = mem.contents();
    // Slots 1 to 7 are never written: zeroes up to the payload.
    blob.resize(payload as usize, 0);
    Ok(blob)
}

/// Lay out a new LUKS header with key slot 0 on `file` (of `secret`),
/// from `opts`; the payload's byte offset.
pub fn create_on(
    file: &dyn formats::storage::Storage,
    opts: &CreateOpts,
    secret: &[u8],
) -> BlockResult<u64> {
    let (cipher, hash) = create_spec(opts)?;
    let ms = opts.num("iter-time").unwrap_or(ITER_TIME_DEFAULT);
    let iters = luks::iterations_for(hash, ms);
    let o = luks::CreateOptions {
        cipher,
        hash,
        slot_iterations: iters,
        // QEMU spends an eighth of the time on the master key digest.
        mk_iterations: (iters / 8).max(1000),
        uuid: uuid_string(crate::vpc::new_uuid()),
    };
    let mk = random_bytes(cipher.key_bytes)?;
    let random = random_bytes(luks::random_len(&o))?;
    let h = luks::create(file, &o, secret, &mk, &random).map_err(block_error)?;
    Ok(h.payload_bytes())
}

impl DriverClass for LuksClass {
    fn name(&self) -> &str {
        "luks"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn open(&self, ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        LuksNode::open(ctx)
    }
    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        luks::probe(head)
    }
    fn create_options(&self) -> &'static [OptSpec] {
        LUKS_OPTS
    }
    fn create_summary(&self, _filename: &str, opts: &CreateOpts) -> BlockResult<String> {
        create_spec(opts)?;
        let mut line = format!("size={}", opts.size().unwrap_or(0));
        for o in &LUKS_OPTS[1..] {
            if let Some(v) = opts.str(o.name) {
                line.push_str(&format!(" {}={v}", o.name));
            } else if let Some(n) = opts.num(o.name) {
                line.push_str(&format!(" {}={n}", o.name));
            }
        }
        Ok(line)
    }
    fn create(&self, filename: &str, opts: &CreateOpts) -> BlockResult<()> {
        let id = opts.str("key-secret").ok_or_else(|| {
            BlockError::Invalid(format!(
                "{filename}: Parameter 'key-secret' is required for cipher"
            ))
        })?;
        let secret = secret_of("key-secret", id)?;
        let size = opts.size().unwrap_or(0);
        crate::format::create_file(filename, filename)?;
        let g = crate::graph::BlockGraph::new();
        let f = crate::format::locked_storage(
            crate::format::file_node(&g, filename, false, None)?,
            filename,
            true,
            false,
        )?;
        let payload = create_on(&*f, opts, &secret)
            .map_err(|e| BlockError::Open(format!("{filename}: {e}")))?;
        f.set_len(payload + size)
            .map_err(|e| BlockError::Open(format!("{filename}: Could not resize file: {e}")))?;
        f.flush()
            .map_err(|e| BlockError::Open(format!("{filename}: {e}")))
    }
}

/// An open LUKS image: unlocked, or (opened for metadata only without
/// a key) its header alone.
pub struct LuksNode {
    header: luks::Header,
    /// The cipher keyed with the master key; `None` when not unlocked.
    img: Option<Luks>,
    payload: u64,
    size: AtomicU64,
    file: Arc<Node>,
    /// Whole-sector requests.
    sectors: crate::sectors::Sectors,
}

fn open_error(e: FormatError) -> BlockError {
    match e {
        FormatError::Io { .. } => block_error(e),
        FormatError::Unsupported(m) => BlockError::Unsupported(m),
        other => BlockError::Open(other.to_string()),
    }
}

impl LuksNode {
    /// Open from options: the `file` child and `key-secret` (which
    /// `info`, opening for metadata only, may leave out).
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let key = ctx.opts.path("key-secret");
        let id = ctx.opts.take_str("key-secret")?;
        if id.is_none() && !ctx.flags.no_io {
            return Err(BlockError::Open(format!(
                "Parameter '{key}' is required for cipher"
            )));
        }
        // Metadata only: not unlocked even with a key, as QEMU's
        // QCRYPTO_BLOCK_OPEN_NO_IO (a wrong key does not fail `info`).
        let secret = match id {
            Some(id) if !ctx.flags.no_io => Some(secret_of(&key, &id)?),
            _ => None,
        };
        let file = ctx.open_child("file")?;
        let name = file.filename().unwrap_or_else(|| file.name().to_string());
        let fs = NodeStorage(file.clone());
        let file_len = file.len();
        let (header, img) = match secret {
            Some(sec) => {
                let img = Luks::open(&name, &fs, &sec, luks::MAX_ITERATIONS).map_err(open_error)?;
                (img.header.clone(), Some(img))
            }
            None => {
                let mut b = vec![0u8; 592];
                formats::storage::Storage::read_at(&fs, 0, &mut b).map_err(|e| {
                    BlockError::io(e.raw_os_error().unwrap_or(libc::EIO), name.clone())
                })?;
                (luks::Header::parse(&name, &b).map_err(open_error)?, None)
            }
        };
        let payload = header.payload_bytes();
        Ok(Arc::new(LuksNode {
            size: AtomicU64::new(file_len.saturating_sub(payload)),
            header,
            img,
            payload,
            file,
            sectors: Default::default(),
        }))
    }

    /// Whole payload sectors, decrypted.
    fn read_sectors(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let luks = self.keyed()?;
        self.file
            .read_vectored(self.payload + offset, &mut [IoSliceMut::new(buf)])?;
        luks.decrypt(offset, buf);
        Ok(())
    }

    /// The unlocked image, or the error of a node opened without a key.
    fn keyed(&self) -> BlockResult<&Luks> {
        self.img.as_ref().ok_or_else(|| {
            BlockError::Invalid(format!(
                "{}: opened without key-secret, the data cannot be decrypted",
                self.file.filename().unwrap_or_default()
            ))
        })
    }
}

impl BlockDriver for LuksNode {
    fn driver_name(&self) -> &'static str {
        "luks"
    }
    fn metadata_in_file(&self) -> bool {
        true
    }
    fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn limits(&self) -> Limits {
        // Encryption works on whole sectors (advertised, e.g. to NBD
        // clients); `sectors` pads smaller requests.
        Limits {
            request_alignment: SECTOR,
            mem_alignment: 1,
        }
    }
    fn filename(&self) -> Option<String> {
        self.file.filename()
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        self.sectors
            .read(offset, iov, |o, b| self.read_sectors(o, b))
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        self.sectors.write(
            offset,
            iov,
            |o, b| self.read_sectors(o, b),
            |o, b| {
                let mut buf = b.to_vec();
                self.keyed()?.encrypt(o, &mut buf);
                self.file
                    .write_vectored(self.payload + o, &[IoSlice::new(&buf)], false)
            },
        )?;
        if fua {
            self.file.flush()?;
        }
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        self.file.flush()
    }
    fn truncate(&self, len: u64) -> BlockResult<()> {
        self.file.truncate(self.payload + len)?;
        self.size.store(len, Ordering::Release);
        Ok(())
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.driver().allocated_size()
    }
    fn info(&self) -> Option<ImageInfo> {
        Some(ImageInfo {
            encrypted: true,
            specific: Some(("luks".into(), luks_fields(&self.header))),
            ..Default::default()
        })
    }
}

/// The `format-specific` fields of a LUKS header, in qemu-img's order.
pub fn luks_fields(h: &luks::Header) -> Vec<(String, InfoValue)> {
    let s = |v: &str| InfoValue::Str(v.to_string());
    let (ivgen, ivhash) = match h.cipher.ivgen {
        IvGen::Plain => ("plain", None),
        IvGen::Plain64 => ("plain64", None),
        IvGen::Essiv(a) => ("essiv", Some(a.name())),
    };
    let mut f = vec![
        ("ivgen-alg".to_string(), s(ivgen)),
        ("detached-header".to_string(), InfoValue::Bool(false)),
        ("hash-alg".to_string(), s(h.hash.name())),
        ("cipher-alg".to_string(), s(&h.cipher.alg_name())),
        ("uuid".to_string(), s(&h.uuid)),
    ];
    if let Some(a) = ivhash {
        f.push(("ivgen-hash-alg".into(), s(a)));
    }
    f.push((
        "cipher-mode".into(),
        s(match h.cipher.mode {
            Mode::Xts => "xts",
            Mode::Cbc => "cbc",
        }),
    ));
    let slots = h
        .slots
        .iter()
        .map(|k| {
            let mut o = vec![("active".to_string(), InfoValue::Bool(k.active))];
            if k.active {
                o.push(("iters".into(), InfoValue::Num(k.iterations.into())));
            }
            o.push((
                "key-offset".into(),
                InfoValue::Num(u64::from(k.key_offset) * SECTOR),
            ));
            if k.active {
                o.push(("stripes".into(), InfoValue::Num(k.stripes.into())));
            }
            InfoValue::Obj(o)
        })
        .collect();
    f.push(("slots".into(), InfoValue::List(slots)));
    f.push(("payload-offset".into(), InfoValue::Num(h.payload_bytes())));
    f.push((
        "master-key-iters".into(),
        InfoValue::Num(h.mk_iterations.into()),
    ));
    f
}
