//! qcow2 encryption (qcow2.rst: "Header", field `crypt_method`; "Header
//! extensions", type 0x0537be77 "Full disk encryption header pointer").
//!
//! * Method 1, legacy AES: the qcow (v1) scheme ([`luks::legacy_aes`]),
//!   each 512-byte sector's IV its *guest* sector number. Insecure; kept
//!   for reading old images.
//! * Method 2, LUKS: a LUKS1 header ([`crate::luks`]) stored in clusters
//!   of the image itself, found through the extension (offset and length,
//!   big-endian). Its payload-offset field is the header's own length; the
//!   payload is the qcow2 data clusters, each sector's IV its *host*
//!   sector number (QEMU's "physical offset" rule), so data moved to a new
//!   host cluster (copy-on-write) is decrypted and encrypted again.
//!
//! Both encrypt data clusters only: metadata, zero clusters and
//! unallocated ones stay plain. Compressed clusters cannot be encrypted
//! (QEMU refuses the combination, and so does Strata).

use super::header::Header;
use crate::error::{FResult, FormatError};
use crate::luks::{self, Luks, SectorCipher, SECTOR};
use crate::storage::{MemStorage, Storage};

/// `crypt_method`: none, legacy AES, LUKS.
pub const METHOD_NONE: u32 = 0;
pub const METHOD_AES: u32 = 1;
pub const METHOD_LUKS: u32 = 2;

/// Largest LUKS header Strata reads from an image: QEMU's with eight
/// slots of a 512-bit key is about 2 MiB; a bigger claim is hostile.
pub const MAX_LUKS_HEADER: u64 = 32 << 20;

/// The keyed cipher of an open encrypted image.
pub struct Crypt {
    cipher: SectorCipher,
    /// IVs from host offsets (LUKS) rather than guest offsets (AES).
    physical: bool,
}

impl Crypt {
    fn sector(&self, guest: u64, host: u64) -> u64 {
        if self.physical {
            host / SECTOR
        } else {
            guest / SECTOR
        }
    }
    /// Decrypt whole sectors read from host offset `host`, which hold
    /// guest bytes from `guest` on.
    pub fn decrypt(&self, guest: u64, host: u64, buf: &mut [u8]) {
        self.cipher.decrypt(self.sector(guest, host), buf)
    }
    /// Encrypt whole sectors about to be written at `host` (guest `guest`).
    pub fn encrypt(&self, guest: u64, host: u64, buf: &mut [u8]) {
        self.cipher.encrypt(self.sector(guest, host), buf)
    }
}

/// The crypto header extension: where the LUKS header lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CryptoExt {
    pub offset: u64,
    pub length: u64,
}

impl CryptoExt {
    /// Parse the extension's 16 bytes, checked against the cluster size
    /// and the file (`name` in errors).
    pub fn parse(raw: &[u8], cs: u64, file_len: u64, name: &str) -> FResult<CryptoExt> {
        let bad = |m: &str| FormatError::Corrupt(format!("{name}: {m}"));
        if raw.len() != 16 {
            return Err(bad("Invalid encryption header extension length"));
        }
        let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
        let e = CryptoExt {
            offset: be(&raw[0..8]),
            length: be(&raw[8..16]),
        };
        if !e.offset.is_multiple_of(cs) {
            return Err(bad(&format!(
                "Encryption header offset '{}' is not a multiple of cluster size '{cs}'",
                e.offset
            )));
        }
        if e.length > MAX_LUKS_HEADER {
            return Err(bad(&format!(
                "Encryption header length {} is larger than the {MAX_LUKS_HEADER} bytes Strata reads",
                e.length
            )));
        }
        if e.offset
            .checked_add(e.length)
            .is_none_or(|end| end > file_len)
        {
            return Err(bad("Encryption header is outside the image file"));
        }
        Ok(e)
    }
    /// The extension's bytes.
    pub fn serialize(&self) -> Vec<u8> {
        let mut v = self.offset.to_be_bytes().to_vec();
        v.extend_from_slice(&self.length.to_be_bytes());
        v
    }
}

/// The LUKS header of a method-2 image, read whole from `file` (as a
/// LUKS volume of its own, payload empty).
pub fn read_luks_blob(file: &dyn Storage, h: &Header, name: &str) -> FResult<MemStorage> {
    let flen = file
        .len()
        .map_err(|e| FormatError::io(e, format!("{name}: reading the encryption header")))?;
    let raw = h.crypto_ext.as_deref().ok_or_else(|| {
        FormatError::Corrupt(format!(
            "{name}: LUKS encryption without its header extension"
        ))
    })?;
    let ext = CryptoExt::parse(raw, h.cluster_size(), flen, name)?;
    let mut blob = vec![0u8; ext.length as usize];
    file.read_at(ext.offset, &mut blob)
        .map_err(|e| FormatError::io(e, format!("{name}: reading the encryption header")))?;
    Ok(MemStorage::new(blob, ext.length))
}

/// The LUKS header of a method-2 image (for `info`, without a key).
pub fn luks_header(file: &dyn Storage, h: &Header, name: &str) -> FResult<luks::Header> {
    let blob = read_luks_blob(file, h, name)?;
    let mut b = vec![0u8; 592];
    blob.read_at(0, &mut b)
        .map_err(|e| FormatError::io(e, format!("{name}: reading the encryption header")))?;
    luks::Header::parse(name, &b)
}

/// The cipher of an image with header `h` unlocked by `secret`: `None`
/// for a plain image or without a secret (the image then opens for its
/// metadata only; its data is refused).
pub fn open(
    file: &dyn Storage,
    h: &Header,
    secret: Option<&[u8]>,
    name: &str,
) -> FResult<Option<Crypt>> {
    let Some(secret) = secret else {
        return Ok(None);
    };
    match h.crypt_method {
        METHOD_NONE => Ok(None),
        METHOD_AES => Ok(Some(Crypt {
            cipher: luks::legacy_aes(secret),
            physical: false,
        })),
        METHOD_LUKS => {
            let blob = read_luks_blob(file, h, name)?;
            let l = Luks::open(name, &blob, secret, luks::MAX_ITERATIONS)?;
            Ok(Some(Crypt {
                cipher: l.into_cipher(),
                physical: true,
            }))
        }
        m => Err(FormatError::Unsupported(format!(
            "{name}: Unsupported encryption method: {m}"
        ))),
    }
}

/// What a new image is encrypted with.
#[derive(Clone, Debug)]
pub enum NewCrypt {
    /// Legacy AES (`encrypt.format=aes`, `encryption=on`).
    Aes,
    /// LUKS, whose header (key slot 0 filled, as [`luks::create`] writes
    /// it onto an empty volume) goes into the image's clusters.
    Luks(Vec<u8>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::create::{create, CreateOptions};
    use crate::qcow2::{OpenOptions, Qcow2, Secret};
    use std::sync::Arc;

    fn luks_blob(secret: &[u8]) -> Vec<u8> {
        let o = luks::CreateOptions {
            cipher: luks::CipherSpec::from_header("aes", "xts-plain64", 64).unwrap(),
            hash: luks::HashAlg::Sha256,
            slot_iterations: 1000,
            mk_iterations: 1000,
            uuid: "00000000-0000-4000-8000-000000000000".into(),
        };
        let f = MemStorage::new(Vec::new(), MAX_LUKS_HEADER);
        let mk: Vec<u8> = (0..64u8).collect();
        let random: Vec<u8> = (0..luks::random_len(&o)).map(|i| (i * 7) as u8).collect();
        let h = luks::create(&f, &o, secret, &mk, &random).unwrap();
        let mut blob = f.contents();
        blob.resize(h.payload_bytes() as usize, 0);
        blob
    }

    fn open(f: &Arc<dyn Storage>, backing: Option<Arc<dyn Storage>>, key: &[u8]) -> Qcow2 {
        let o = OpenOptions {
            secret: Some(Secret(key.to_vec())),
            ..Default::default()
        };
        Qcow2::open("t", f.clone(), None, backing, &o).unwrap()
    }

    /// Sector-granular writes inside clusters (copy-on-write from the
    /// backing file, then in place) read back after a reopen, and the
    /// host holds no plaintext, for both methods.
    #[test]
    fn both_methods_round_trip_over_a_backing_file() {
        for crypt in [NewCrypt::Luks(luks_blob(b"pw")), NewCrypt::Aes] {
            let f: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
            let base: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 512) as u8 | 1).collect();
            let b: Arc<dyn Storage> = Arc::new(MemStorage::new(base.clone(), 1 << 20));
            let o = CreateOptions {
                size: 1 << 20,
                cluster_size: 4096,
                backing_file: Some("base".into()),
                crypt: Some(crypt.clone()),
                ..Default::default()
            };
            create("t", f.clone(), None, &o).unwrap();
            let img = open(&f, Some(b.clone()), b"pw");
            assert!(img.is_encrypted());
            let mut want = base.clone();
            for (off, len, v) in [
                (5120u64, 1024usize, 0xabu8),
                (5632, 512, 0xcd),
                (65536, 8192, 0xef),
            ] {
                img.write(off, &vec![v; len], false).unwrap();
                want[off as usize..off as usize + len].fill(v);
            }
            img.write_zeroes(8192, 4096, false).unwrap();
            want[8192..12288].fill(0);
            assert!(
                img.write(100, &[1; 512], false).is_err(),
                "not whole sectors"
            );
            img.close().unwrap();
            let img = open(&f, Some(b.clone()), b"pw");
            let mut got = vec![0u8; 1 << 20];
            img.read(0, &mut got).unwrap();
            assert!(got == want);
            let mut raw = vec![0u8; f.len().unwrap() as usize];
            f.read_at(0, &mut raw).unwrap();
            assert!(!raw.windows(512).any(|w| w.iter().all(|&x| x == 0xef)));
            // Without the secret: metadata only.
            let locked =
                Qcow2::open("t", f.clone(), None, Some(b), &OpenOptions::default()).unwrap();
            let e = locked.read(65536, &mut got[..512]).unwrap_err().to_string();
            assert!(e.contains("without encrypt.key-secret"), "{e}");
            assert!(locked.write_compressed(0, &[0; 4096]).is_err());
        }
        // A wrong passphrase does not open a LUKS image.
        let f: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
        let o = CreateOptions {
            size: 1 << 20,
            crypt: Some(NewCrypt::Luks(luks_blob(b"pw"))),
            ..Default::default()
        };
        create("t", f.clone(), None, &o).unwrap();
        let o = OpenOptions {
            secret: Some(Secret(b"wrong".to_vec())),
            ..Default::default()
        };
        let e = Qcow2::open("t", f, None, None, &o)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("Invalid password"), "{e}");
    }

    #[test]
    fn hostile_extensions_are_refused() {
        let e = |raw: &[u8]| {
            CryptoExt::parse(raw, 65536, 1 << 20, "t")
                .unwrap_err()
                .to_string()
        };
        assert!(e(&[0; 8]).contains("length"));
        let ext = |o: u64, l: u64| {
            CryptoExt {
                offset: o,
                length: l,
            }
            .serialize()
        };
        assert!(e(&ext(4096, 512)).contains("multiple of cluster size"));
        assert!(e(&ext(65536, 1 << 30)).contains("larger than"));
        assert!(e(&ext(u64::MAX - 65535, 4096)).contains("outside"));
        assert!(CryptoExt::parse(&ext(65536, 4096), 65536, 1 << 20, "t").is_ok());
    }
}
