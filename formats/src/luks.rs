//! LUKS version 1 encrypted images, as QEMU's `luks` format and
//! cryptsetup use them.
//!
//! Spec: "LUKS On-Disk Format Specification Version 1.2.3": §2.4 the
//! partition header (592 bytes, big-endian: magic, version, cipher name
//! and mode, hash spec, payload offset, key bytes, master key digest with
//! its salt and iterations, UUID, eight key slots), §2.5 the key slots
//! (active mark, PBKDF2 iterations and salt, key material offset,
//! stripes), §2.4 the anti-forensic splitter (AFsplit/AFmerge with the
//! hash's diffusion), §2.1 PBKDF2 (RFC 2898) for the slot keys and the
//! master key digest; the payload is encrypted sector by sector (512
//! bytes) with the sector number as IV (`plain64`, `plain`, or ESSIV:
//! the number encrypted with the hash of the master key), in XTS or CBC.
//!
//! The ciphers, modes, hashes and PBKDF2 are RustCrypto's (`aes`,
//! `xts-mode`, `cbc`, `sha1`/`sha2`, `pbkdf2`); only the splitter and the
//! IV generators, which are layout and not cryptography, are here.
//!
//! Hostile headers: every count is bounded before it is used (stripes,
//! key bytes, key material inside the file) and PBKDF2 iterations beyond
//! [`MAX_ITERATIONS`] are refused, since a forged count would keep a
//! thread busy for hours.

use crate::error::{FResult, FormatError};
use crate::storage::Storage;
use aes::cipher::{BlockDecryptMut, BlockEncrypt, BlockEncryptMut, KeyInit, KeyIvInit};
use aes::{Aes128, Aes192, Aes256};
use sha2::Digest;
use std::sync::Arc;

/// The magic at offset 0.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const HEADER_LEN: usize = 592;
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
const SLOT_INACTIVE: u32 = 0x0000_dead;
/// Key slots in a LUKS1 header.
pub const NUM_SLOTS: usize = 8;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
/// The encryption unit.
pub const SECTOR: u64 = 512;
/// The most PBKDF2 iterations an image may ask for.
pub const MAX_ITERATIONS: u32 = 20_000_000;
const MAX_STRIPES: u32 = 64_000;
/// QEMU's layout: key material from 4 KiB on, each slot's aligned to 4 KiB.
const SLOT_OFFSET: u64 = 4096;
const SLOT_ALIGN: u64 = 4096;
/// The stripes of a new slot (the spec's and QEMU's).
pub const STRIPES: u32 = 4000;

/// The hash of the splitter and the key derivation (`hash-alg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlg {
    /// The name in headers and options.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha512 => "sha512",
        }
    }
    /// By name.
    pub fn parse(s: &str) -> Option<HashAlg> {
        [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512]
            .into_iter()
            .find(|h| h.name() == s)
    }
    fn pbkdf2(self, pass: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(pass, salt, rounds, out),
            HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(pass, salt, rounds, out),
            HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(pass, salt, rounds, out),
        }
    }
    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<sha1::Sha1>(parts),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts),
        }
    }
    fn len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha256 => 32,
            HashAlg::Sha512 => 64,
        }
    }
}

/// The block cipher mode (`cipher-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Xts,
    Cbc,
}

/// How a sector's IV is made (`ivgen-alg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGen {
    Plain,
    Plain64,
    /// ESSIV with this hash of the master key (`ivgen-hash-alg`).
    Essiv(HashAlg),
}

/// The cipher of an image: AES of `key_bytes` (per key: XTS uses two),
/// a mode and an IV generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CipherSpec {
    /// Master key bytes (XTS: both keys).
    pub key_bytes: usize,
    pub mode: Mode,
    pub ivgen: IvGen,
}

impl CipherSpec {
    /// QEMU's `cipher-alg` name (`aes-256`).
    pub fn alg_name(&self) -> String {
        let per_key = match self.mode {
            Mode::Xts => self.key_bytes / 2,
            Mode::Cbc => self.key_bytes,
        };
        format!("aes-{}", per_key * 8)
    }
    /// The header's mode string (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn mode_string(&self) -> String {
        let m = match self.mode {
            Mode::Xts => "xts",
            Mode::Cbc => "cbc",
        };
        match self.ivgen {
            IvGen::Plain => format!("{m}-plain"),
            IvGen::Plain64 => format!("{m}-plain64"),
            IvGen::Essiv(h) => format!("{m}-essiv:{}", h.name()),
        }
    }
    /// From the header's cipher name, mode string and key bytes.
    pub fn from_header(name: &str, mode: &str, key_bytes: u32) -> Result<CipherSpec, String> {
        if name != "aes" {
            return Err(format!("Cipher '{name}' is not supported"));
        }
        let (m, iv) = mode
            .split_once('-')
            .ok_or_else(|| format!("Cipher mode '{mode}' is not supported"))?;
        let mode_e = match m {
            "xts" => Mode::Xts,
            "cbc" => Mode::Cbc,
            _ => return Err(format!("Cipher mode '{mode}' is not supported")),
        };
        let ivgen = match iv {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            _ => match iv.strip_prefix("essiv:").and_then(HashAlg::parse) {
                Some(h) => IvGen::Essiv(h),
                None => return Err(format!("IV generator '{iv}' is not supported")),
            },
        };
        let kb = key_bytes as usize;
        let ok = match mode_e {
            Mode::Xts => kb == 32 || kb == 64,
            Mode::Cbc => kb == 16 || kb == 24 || kb == 32,
        };
        if !ok {
            return Err(format!("{kb}-byte keys are not supported with {mode}"));
        }
        Ok(CipherSpec {
            key_bytes: kb,
            mode: mode_e,
            ivgen,
        })
    }
}

/// AES of one of the three key sizes.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Aes {
        match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).expect("16-byte key")),
            24 => Aes::A192(Aes192::new_from_slice(key).expect("24-byte key")),
            _ => Aes::A256(Aes256::new_from_slice(&key[..32]).expect("32-byte key")),
        }
    }
    fn encrypt_block(&self, b: &mut [u8; 16]) {
        let blk = aes::Block::from_mut_slice(b);
        match self {
            Aes::A128(c) => c.encrypt_block(blk),
            Aes::A192(c) => c.encrypt_block(blk),
            Aes::A256(c) => c.encrypt_block(blk),
        }
    }
}

/// A keyed cipher: encrypts and decrypts whole sectors.
pub struct SectorCipher {
    spec: CipherSpec,
    key: Vec<u8>,
    xts: Option<XtsEngine>,
    /// ESSIV's cipher, keyed with the hash of the master key.
    essiv: Option<Aes>,
}

enum XtsEngine {
    X128(Box<xts_mode::Xts128<Aes128>>),
    X256(Box<xts_mode::Xts128<Aes256>>),
}

impl SectorCipher {
    /// Key `spec` with `key` (`spec.key_bytes` long).
    pub fn new(spec: CipherSpec, key: &[u8]) -> SectorCipher {
        let xts = (spec.mode == Mode::Xts).then(|| {
            let (a, b) = key.split_at(key.len() / 2);
            if a.len() == 16 {
                XtsEngine::X128(Box::new(xts_mode::Xts128::new(
                    Aes128::new_from_slice(a).expect("key"),
                    Aes128::new_from_slice(b).expect("key"),
                )))
            } else {
                XtsEngine::X256(Box::new(xts_mode::Xts128::new(
                    Aes256::new_from_slice(a).expect("key"),
                    Aes256::new_from_slice(b).expect("key"),
                )))
            }
        });
        let essiv = match spec.ivgen {
            IvGen::Essiv(h) => {
                let d = h.digest(&[key]);
                // The ESSIV key is the digest, cut to an AES key size.
                let n = match d.len() {
                    20 => 16,
                    n => n.min(32),
                };
                Some(Aes::new(&d[..n]))
            }
            _ => None,
        };
        SectorCipher {
            spec,
            key: key.to_vec(),
            xts,
            essiv,
        }
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.spec.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(_) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                if let Some(e) = &self.essiv {
                    e.encrypt_block(&mut iv);
                }
            }
        }
        iv
    }

    fn each_sector(&self, first: u64, buf: &mut [u8], encrypt: bool) {
        for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let iv = self.iv(first + i as u64);
            // Whole blocks only (callers pass whole sectors; a short tail
            // of a key-material area is a multiple of 16).
            let n = s.len() / 16 * 16;
            let s = &mut s[..n];
            match (&self.xts, encrypt) {
                (Some(XtsEngine::X128(x)), true) => x.encrypt_sector(s, iv),
                (Some(XtsEngine::X128(x)), false) => x.decrypt_sector(s, iv),
                (Some(XtsEngine::X256(x)), true) => x.encrypt_sector(s, iv),
                (Some(XtsEngine::X256(x)), false) => x.decrypt_sector(s, iv),
                (None, _) => self.cbc(s, &iv, encrypt),
            }
        }
    }

    fn cbc(&self, s: &mut [u8], iv: &[u8; 16], encrypt: bool) {
        use aes::cipher::block_padding::NoPadding;
        let n = s.len();
        macro_rules! run {
            ($c:ty) => {
                if encrypt {
                    let e = cbc::Encryptor::<$c>::new_from_slices(&self.key, iv).expect("key");
                    let _ = e.encrypt_padded_mut::<NoPadding>(s, n);
                } else {
                    let d = cbc::Decryptor::<$c>::new_from_slices(&self.key, iv).expect("key");
                    let _ = d.decrypt_padded_mut::<NoPadding>(s);
                }
            };
        }
        match self.key.len() {
            16 => run!(Aes128),
            24 => run!(Aes192),
            _ => run!(Aes256),
        }
    }

    /// Encrypt whole sectors in place, the first numbered `first`.
    pub fn encrypt(&self, first: u64, buf: &mut [u8]) {
        self.each_sector(first, buf, true)
    }
    /// Decrypt whole sectors in place, the first numbered `first`.
    pub fn decrypt(&self, first: u64, buf: &mut [u8]) {
        self.each_sector(first, buf, false)
    }
}

/// The cipher of the legacy AES encryption of qcow (v1) and qcow2
/// (`crypt_method` 1): AES-128-CBC whose key is the passphrase cut or
/// padded with zeroes to 16 bytes, each sector's IV its number (plain64).
/// Insecure (no key derivation, IVs predictable): for reading old images.
pub fn legacy_aes(passphrase: &[u8]) -> SectorCipher {
    let mut key = [0u8; 16];
    let n = passphrase.len().min(16);
    key[..n].copy_from_slice(&passphrase[..n]);
    let spec = CipherSpec {
        key_bytes: 16,
        mode: Mode::Cbc,
        ivgen: IvGen::Plain64,
    };
    SectorCipher::new(spec, &key)
}

/// One key slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySlot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// Key material offset, in sectors.
    pub key_offset: u32,
    pub stripes: u32,
}

/// A parsed LUKS1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub cipher: CipherSpec,
    pub hash: HashAlg,
    /// Payload offset, in sectors.
    pub payload_offset: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    pub uuid: String,
    pub slots: [KeySlot; NUM_SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn put_str(b: &mut [u8], s: &str) {
    b[..s.len()].copy_from_slice(s.as_bytes());
}

/// How sure probing is that `head` starts a LUKS1 image.
pub fn probe(head: &[u8]) -> u32 {
    if head.starts_with(MAGIC) && head.len() >= 8 && head[6..8] == [0, 1] {
        100
    } else {
        0
    }
}

impl Header {
    /// Parse the first [`HEADER_LEN`] bytes (`name` in errors).
    pub fn parse(name: &str, b: &[u8]) -> FResult<Header> {
        let bad = |m: String| FormatError::Corrupt(format!("{name}: {m}"));
        if b.len() < HEADER_LEN || &b[..6] != MAGIC {
            return Err(FormatError::Invalid(format!(
                "{name}: Volume is not in LUKS format"
            )));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(FormatError::Unsupported(format!(
                "{name}: LUKS version {version} is not supported"
            )));
        }
        let cipher = CipherSpec::from_header(&cstr(&b[8..40]), &cstr(&b[40..72]), be32(b, 108))
            .map_err(|e| FormatError::Unsupported(format!("{name}: {e}")))?;
        let hash_name = cstr(&b[72..104]);
        let hash = HashAlg::parse(&hash_name).ok_or_else(|| {
            FormatError::Unsupported(format!("{name}: Hash '{hash_name}' is not supported"))
        })?;
        let mut slots = [KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: 0,
            stripes: 0,
        }; NUM_SLOTS];
        for (i, s) in slots.iter_mut().enumerate() {
            let o = 208 + i * 48;
            let mark = be32(b, o);
            s.active = match mark {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                m => return Err(bad(format!("key slot {i} has a bad state {m:#x}"))),
            };
            s.iterations = be32(b, o + 4);
            s.salt.copy_from_slice(&b[o + 8..o + 40]);
            s.key_offset = be32(b, o + 40);
            s.stripes = be32(b, o + 44);
            if s.active && (s.stripes == 0 || s.stripes > MAX_STRIPES) {
                return Err(bad(format!("key slot {i} has {} stripes", s.stripes)));
            }
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_salt = [0u8; SALT_LEN];
        mk_salt.copy_from_slice(&b[132..164]);
        Ok(Header {
            cipher,
            hash,
            payload_offset: be32(b, 104),
            mk_digest,
            mk_salt,
            mk_iterations: be32(b, 164),
            uuid: cstr(&b[168..208]),
            slots,
        })
    }

    /// The header's bytes.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_str(&mut b[8..40], "aes");
        put_str(&mut b[40..72], &self.cipher.mode_string());
        put_str(&mut b[72..104], self.hash.name());
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&(self.cipher.key_bytes as u32).to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        put_str(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            let mark = if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            b[o..o + 4].copy_from_slice(&mark.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// The payload's byte offset.
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR
    }
}

/// The hash diffusion of the anti-forensic splitter: each digest-sized
/// piece of `buf` becomes the hash of its index and itself (§2.4).
fn diffuse(h: HashAlg, buf: &mut [u8]) {
    let dl = h.len();
    for (i, chunk) in buf.chunks_mut(dl).enumerate() {
        let d = h.digest(&[&(i as u32).to_be_bytes(), chunk]);
        let n = chunk.len();
        chunk.copy_from_slice(&d[..n]);
    }
}

/// AFmerge: the key that `stripes` blocks of `split` hide.
fn af_merge(h: HashAlg, split: &[u8], key_len: usize, stripes: usize) -> Vec<u8> {
    let mut d = vec![0u8; key_len];
    for s in 0..stripes - 1 {
        for (a, b) in d.iter_mut().zip(&split[s * key_len..(s + 1) * key_len]) {
            *a ^= b;
        }
        diffuse(h, &mut d);
    }
    for (a, b) in d.iter_mut().zip(&split[(stripes - 1) * key_len..]) {
        *a ^= b;
    }
    d
}

/// AFsplit: `stripes` blocks hiding `key`, the first `stripes - 1` from
/// `random`.
fn af_split(h: HashAlg, key: &[u8], stripes: usize, random: &[u8]) -> Vec<u8> {
    let kl = key.len();
    let mut out = random[..(stripes - 1) * kl].to_vec();
    let mut d = vec![0u8; kl];
    for s in 0..stripes - 1 {
        for (a, b) in d.iter_mut().zip(&out[s * kl..(s + 1) * kl]) {
            *a ^= b;
        }
        diffuse(h, &mut d);
    }
    out.extend(d.iter().zip(key).map(|(a, b)| a ^ b));
    out
}

/// An unlocked LUKS image.
pub struct Luks {
    pub header: Header,
    /// The payload's size in bytes.
    size: u64,
    cipher: SectorCipher,
    /// Which slot the secret opened.
    pub slot: usize,
}

impl Luks {
    /// Open `file` (named `name` in errors) with `secret`, trying each
    /// active slot; PBKDF2 counts above `max_iterations` are refused.
    pub fn open(
        name: &str,
        file: &dyn Storage,
        secret: &[u8],
        max_iterations: u32,
    ) -> FResult<Luks> {
        let io = |e| FormatError::io(e, format!("{name}: Could not read the LUKS header"));
        let mut b = vec![0u8; HEADER_LEN];
        file.read_at(0, &mut b).map_err(io)?;
        let header = Header::parse(name, &b)?;
        let file_len = file.len().map_err(io)?;
        let payload = header.payload_bytes();
        if payload > file_len {
            return Err(FormatError::Corrupt(format!(
                "{name}: LUKS payload is overflowing the size of the file"
            )));
        }
        let too_many = |what: String, n: u32| {
            FormatError::Unsupported(format!(
                "{name}: {what} asks for {n} PBKDF2 iterations, more than the {max_iterations} Strata runs"
            ))
        };
        if header.mk_iterations > max_iterations {
            return Err(too_many(
                "the master key digest".into(),
                header.mk_iterations,
            ));
        }
        let kl = header.cipher.key_bytes;
        for (i, s) in header.slots.iter().enumerate() {
            if !s.active {
                continue;
            }
            if s.iterations > max_iterations {
                return Err(too_many(format!("key slot {i}"), s.iterations));
            }
            let len = kl as u64 * u64::from(s.stripes);
            let at = u64::from(s.key_offset) * SECTOR;
            if at + len > file_len {
                return Err(FormatError::Corrupt(format!(
                    "{name}: key slot {i}'s key material is outside the file"
                )));
            }
            let mut slot_key = vec![0u8; kl];
            header
                .hash
                .pbkdf2(secret, &s.salt, s.iterations.max(1), &mut slot_key);
            let mut material = vec![0u8; len as usize];
            file.read_at(at, &mut material).map_err(io)?;
            SectorCipher::new(header.cipher, &slot_key).decrypt(0, &mut material);
            let mk = af_merge(header.hash, &material, kl, s.stripes as usize);
            let mut digest = [0u8; DIGEST_LEN];
            header.hash.pbkdf2(
                &mk,
                &header.mk_salt,
                header.mk_iterations.max(1),
                &mut digest,
            );
            if digest == header.mk_digest {
                return Ok(Luks {
                    size: file_len - payload,
                    cipher: SectorCipher::new(header.cipher, &mk),
                    header,
                    slot: i,
                });
            }
        }
        Err(FormatError::Invalid(format!(
            "{name}: Invalid password, cannot unlock any keyslot"
        )))
    }

    /// The decrypted size: the file after the payload offset.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Resize: the guest size follows the file.
    pub fn set_size(&mut self, size: u64) {
        self.size = size;
    }

    /// The cipher keyed with the master key (for a payload that is not
    /// the file's own, as qcow2's clusters).
    pub fn into_cipher(self) -> SectorCipher {
        self.cipher
    }

    /// Decrypt payload sectors read from the file, the first at guest
    /// byte `offset` (a multiple of [`SECTOR`]).
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) {
        self.cipher.decrypt(offset / SECTOR, buf)
    }

    /// Encrypt payload sectors before writing them at guest `offset`.
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) {
        self.cipher.encrypt(offset / SECTOR, buf)
    }
}

/// What a new image is made with (QEMU's `luks` create options).
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub cipher: CipherSpec,
    pub hash: HashAlg,
    /// PBKDF2 iterations of slot 0 and of the master key digest.
    pub slot_iterations: u32,
    pub mk_iterations: u32,
    pub uuid: String,
}

/// Random bytes a new header needs: the master key, the salts and the
/// splitter's stripes.
pub fn random_len(o: &CreateOptions) -> usize {
    o.cipher.key_bytes * STRIPES as usize + SALT_LEN * 2
}

/// The new header for `o` (slot 0 not yet filled): QEMU's layout.
pub fn layout(o: &CreateOptions) -> Header {
    let split_sectors = (o.cipher.key_bytes as u64 * u64::from(STRIPES)).div_ceil(SECTOR);
    let stride = split_sectors.div_ceil(SLOT_ALIGN / SECTOR) * (SLOT_ALIGN / SECTOR);
    let mut slots = [KeySlot {
        active: false,
        iterations: 0,
        salt: [0; SALT_LEN],
        key_offset: 0,
        stripes: STRIPES,
    }; NUM_SLOTS];
    for (i, s) in slots.iter_mut().enumerate() {
        s.key_offset = (SLOT_OFFSET / SECTOR + i as u64 * stride) as u32;
    }
    let payload = u64::from(slots[NUM_SLOTS - 1].key_offset) + stride;
    Header {
        cipher: o.cipher,
        hash: o.hash,
        payload_offset: payload as u32,
        mk_digest: [0; DIGEST_LEN],
        mk_salt: [0; SALT_LEN],
        mk_iterations: o.mk_iterations,
        uuid: o.uuid.clone(),
        slots,
    }
}

/// Write a new image's header and key slot 0 (unlocked by `secret`) to
/// `file`, with `master_key` and `random` ([`random_len`] bytes); the
/// payload is left to the caller to size. The header written.
pub fn create(
    file: &dyn Storage,
    o: &CreateOptions,
    secret: &[u8],
    master_key: &[u8],
    random: &[u8],
) -> FResult<Header> {
    let kl = o.cipher.key_bytes;
    let mut h = layout(o);
    let stripes_random = &random[..(STRIPES as usize - 1) * kl];
    let salts = &random[kl * STRIPES as usize..];
    h.mk_salt.copy_from_slice(&salts[..SALT_LEN]);
    let mut digest = [0u8; DIGEST_LEN];
    o.hash
        .pbkdf2(master_key, &h.mk_salt, o.mk_iterations, &mut digest);
    h.mk_digest = digest;
    let slot = &mut h.slots[0];
    slot.active = true;
    slot.iterations = o.slot_iterations;
    slot.salt.copy_from_slice(&salts[SALT_LEN..2 * SALT_LEN]);
    let mut slot_key = vec![0u8; kl];
    o.hash
        .pbkdf2(secret, &slot.salt, slot.iterations, &mut slot_key);
    let mut split = af_split(o.hash, master_key, STRIPES as usize, stripes_random);
    // Key material is encrypted in whole sectors: pad to the next one.
    split.resize(
        (split.len() as u64).div_ceil(SECTOR) as usize * SECTOR as usize,
        0,
    );
    SectorCipher::new(o.cipher, &slot_key).encrypt(0, &mut split);
    let io = |e| FormatError::io(e, "writing the LUKS header".to_string());
    file.write_at(u64::from(h.slots[0].key_offset) * SECTOR, &split)
        .map_err(io)?;
    file.write_at(0, &h.serialize()).map_err(io)?;
    Ok(h)
}

/// PBKDF2 iterations of `hash` that take about `ms` milliseconds here
/// (QEMU's `iter-time`), at least 1000.
pub fn iterations_for(hash: HashAlg, ms: u64) -> u32 {
    let start = std::time::Instant::now();
    let mut probe = 1000u32;
    let mut out = [0u8; 32];
    loop {
        let t = std::time::Instant::now();
        hash.pbkdf2(b"timing", b"salt", probe, &mut out);
        let el = t.elapsed().as_micros().max(1) as u64;
        if el > 20_000 || start.elapsed().as_millis() > 200 {
            let per_ms = u64::from(probe) * 1000 / el;
            return (per_ms * ms).clamp(1000, u64::from(MAX_ITERATIONS)) as u32;
        }
        probe = probe.saturating_mul(2);
    }
}

/// The hostile-image harness behind the `luks_open` fuzz target: `data`
/// as an image, opened with a fixed passphrase (iterations bounded low,
/// so an input runs fast), decrypted in a few places.
pub fn fuzz_open(data: &[u8]) {
    const NAME: &str = "hostile.luks";
    let file = Arc::new(crate::storage::MemStorage::new(
        data.to_vec(),
        data.len() as u64,
    ));
    if let Some(img) = crate::error::named(NAME, Luks::open(NAME, &*file, b"fuzz", 64)) {
        let mut buf = vec![0u8; (img.size().min(8192) / SECTOR * SECTOR) as usize];
        let _ = file.read_at(img.header.payload_bytes(), &mut buf);
        img.decrypt(0, &mut buf);
        img.encrypt(0, &mut buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn opts(mode: &str, kb: u32) -> CreateOptions {
        CreateOptions {
            cipher: CipherSpec::from_header("aes", mode, kb).unwrap(),
            hash: HashAlg::Sha256,
            slot_iterations: 1000,
            mk_iterations: 1000,
            uuid: "00000000-0000-4000-8000-000000000000".into(),
        }
    }

    #[test]
    fn create_then_unlock_and_round_trip_sectors() {
        for (mode, kb) in [
            ("xts-plain64", 64),
            ("cbc-essiv:sha256", 16),
            ("cbc-plain", 32),
        ] {
            let o = opts(mode, kb);
            let f = MemStorage::new(Vec::new(), 64 << 20);
            let mk: Vec<u8> = (0..kb as u8).collect();
            let random: Vec<u8> = (0..random_len(&o)).map(|i| (i * 31 % 251) as u8).collect();
            let h = create(&f, &o, b"secret", &mk, &random).unwrap();
            f.set_len(h.payload_bytes() + (1 << 20)).unwrap();
            let img = Luks::open("t", &f, b"secret", MAX_ITERATIONS).unwrap();
            assert_eq!(img.size(), 1 << 20);
            let mut buf = vec![0x42u8; 2048];
            img.encrypt(4096, &mut buf);
            assert_ne!(buf, vec![0x42u8; 2048]);
            img.decrypt(4096, &mut buf);
            assert_eq!(buf, vec![0x42u8; 2048]);
            let e = Luks::open("t.luks", &f, b"wrong", MAX_ITERATIONS)
                .err()
                .unwrap();
            assert!(
                e.to_string()
                    .contains("Invalid password, cannot unlock any keyslot"),
                "{e}"
            );
        }
    }

    #[test]
    fn iteration_bounds_are_enforced() {
        let o = opts("xts-plain64", 32);
        let f = MemStorage::new(Vec::new(), 64 << 20);
        let random = vec![7u8; random_len(&o)];
        let mut h = create(&f, &o, b"s", &[1u8; 32], &random).unwrap();
        h.slots[0].iterations = u32::MAX;
        f.write_at(0, &h.serialize()).unwrap();
        f.set_len(h.payload_bytes()).unwrap();
        let e = Luks::open("t", &f, b"s", MAX_ITERATIONS).err().unwrap();
        assert!(e.to_string().contains("PBKDF2 iterations"), "{e}");
    }
}
