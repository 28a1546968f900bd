//! Builds UDIF (dmg) images for the tests, since no tool on Linux makes
//! them: the data fork (every chunk's stored bytes), the block tables
//! ("mish") in an XML property list or in a resource fork, and the
//! 512-byte "koly" trailer, laid out as hdiutil lays them out (see
//! `formats/src/dmg.rs` for the format's sources). The chunks' bytes are
//! given already stored (compressed by the caller), so the builder needs
//! nothing beyond std; it is shared by the formats and the cli tests.
#![allow(dead_code)]

pub const ZERO: u32 = 0;
pub const RAW: u32 = 1;
pub const IGNORE: u32 = 2;
pub const ADC: u32 = 0x8000_0004;
pub const ZLIB: u32 = 0x8000_0005;
pub const BZIP2: u32 = 0x8000_0006;
pub const LZFSE: u32 = 0x8000_0007;
pub const COMMENT: u32 = 0x7fff_fffe;
pub const LAST: u32 = 0xffff_ffff;

/// One chunk: `sectors` guest sectors whose bytes are stored as `stored`.
#[derive(Clone)]
pub struct Chunk {
    pub kind: u32,
    pub sectors: u64,
    pub stored: Vec<u8>,
}

impl Chunk {
    pub fn new(kind: u32, sectors: u64, stored: Vec<u8>) -> Chunk {
        Chunk {
            kind,
            sectors,
            stored,
        }
    }
}

/// One block table (a partition): its chunks follow each other from
/// `first_sector` on.
#[derive(Clone)]
pub struct Table {
    pub first_sector: u64,
    pub chunks: Vec<Chunk>,
}

/// Where the block tables go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `<data>` elements under the XML property list's `blkx` key (what
    /// hdiutil writes today).
    Plist,
    /// Resources of the resource fork (older images).
    ResourceFork,
}

fn be32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}

fn be64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_be_bytes());
}

/// One 40-byte chunk entry.
pub fn entry(kind: u32, sector: u64, sectors: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut e = Vec::new();
    be32(&mut e, kind);
    be32(&mut e, 0);
    be64(&mut e, sector);
    be64(&mut e, sectors);
    be64(&mut e, offset);
    be64(&mut e, length);
    e
}

/// A block table's 204-byte header followed by `entries` (already
/// encoded): first sector, sector count, data offset in the data fork.
pub fn mish_raw(first_sector: u64, sectors: u64, data_offset: u64, entries: &[Vec<u8>]) -> Vec<u8> {
    let mut m = b"mish".to_vec();
    be32(&mut m, 1); // version
    be64(&mut m, first_sector);
    be64(&mut m, sectors);
    be64(&mut m, data_offset);
    be32(&mut m, 0x208); // buffers needed
    be32(&mut m, 0); // block descriptor
    m.resize(0x40, 0); // reserved
    be32(&mut m, 2); // checksum type (CRC32), size, value
    be32(&mut m, 32);
    m.resize(0xc8, 0);
    be32(&mut m, entries.len() as u32);
    for e in entries {
        m.extend_from_slice(e);
    }
    m
}

/// `t`'s block table, its data at `data_offset` of the data fork: a
/// comment entry first and the last-entry marker at the end, as hdiutil
/// writes them.
pub fn mish(t: &Table, data_offset: u64) -> Vec<u8> {
    let mut entries = vec![entry(COMMENT, 0, 0, 0, 0)];
    let (mut sector, mut off) = (0u64, 0u64);
    for c in &t.chunks {
        let len = c.stored.len() as u64;
        entries.push(entry(c.kind, sector, c.sectors, off, len));
        sector += c.sectors;
        off += len;
    }
    entries.push(entry(LAST, sector, 0, off, 0));
    mish_raw(t.first_sector, sector, data_offset, &entries)
}

pub fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for g in data.chunks(3) {
        let b = [g[0], *g.get(1).unwrap_or(&0), *g.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= g.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The property list holding `blobs` (block tables, or anything) as the
/// `Data` of `blkx` entries, wrapped and indented as hdiutil does, and a
/// `plst` entry that is not a block table.
pub fn plist(blobs: &[Vec<u8>]) -> Vec<u8> {
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <plist version=\"1.0\">\n<dict>\n\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n",
    );
    for (i, b) in blobs.iter().enumerate() {
        x.push_str(
            "\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n",
        );
        x.push_str(&format!(
            "\t\t\t\t<key>CFName</key>\n\t\t\t\t<string>partition {i}</string>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n"
        ));
        let text = base64(b);
        for line in text.as_bytes().chunks(52) {
            x.push_str("\t\t\t\t");
            x.push_str(std::str::from_utf8(line).unwrap());
            x.push('\n');
        }
        x.push_str(&format!(
            "\t\t\t\t</data>\n\t\t\t\t<key>ID</key>\n\t\t\t\t<string>{i}</string>\n\t\t\t</dict>\n"
        ));
    }
    x.push_str("\t\t</array>\n\t\t<key>plst</key>\n\t\t<array>\n\t\t\t<dict>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n\t\t\t\t");
    x.push_str(&base64(&[0u8; 0x50]));
    x.push_str("\n\t\t\t\t</data>\n\t\t\t</dict>\n\t\t</array>\n\t</dict>\n</dict>\n</plist>\n");
    x.into_bytes()
}

/// A resource fork holding `blobs` as resources (and a 16-byte
/// resource that is not a block table), with a header naming the data
/// at 256 and a token resource map after it.
pub fn resource_fork(blobs: &[Vec<u8>]) -> Vec<u8> {
    let mut data = Vec::new();
    for b in blobs.iter().chain(std::iter::once(&vec![0x5au8; 16])) {
        be32(&mut data, b.len() as u32);
        data.extend_from_slice(b);
    }
    let map = vec![0u8; 64];
    let mut r = Vec::new();
    be32(&mut r, 256);
    be32(&mut r, 256 + data.len() as u32);
    be32(&mut r, data.len() as u32);
    be32(&mut r, map.len() as u32);
    r.resize(256, 0);
    r.extend_from_slice(&data);
    r.extend_from_slice(&map);
    r
}

/// The 512-byte trailer.
pub fn koly(data_fork: (u64, u64), rsrc: (u64, u64), xml: (u64, u64), sectors: u64) -> Vec<u8> {
    let mut k = b"koly".to_vec();
    be32(&mut k, 4); // version
    be32(&mut k, 512); // header size
    be32(&mut k, 1); // flags: flattened
    be64(&mut k, 0); // running data fork offset
    be64(&mut k, data_fork.0);
    be64(&mut k, data_fork.1);
    be64(&mut k, rsrc.0);
    be64(&mut k, rsrc.1);
    be32(&mut k, 1); // segment number and count
    be32(&mut k, 1);
    k.resize(0x50, 0x11); // segment id
    be32(&mut k, 2); // data checksum: CRC32
    be32(&mut k, 32);
    k.resize(0xd8, 0);
    be64(&mut k, xml.0);
    be64(&mut k, xml.1);
    k.resize(0x160, 0);
    be32(&mut k, 2); // master checksum: CRC32
    be32(&mut k, 32);
    k.resize(0x1e8, 0);
    be32(&mut k, 1); // image variant: device image
    be64(&mut k, sectors);
    k.resize(512, 0);
    k
}

/// The image whose disk is `sectors` long and whose tables are
/// `tables`, in form `form`: data fork, tables, trailer.
pub fn build(tables: &[Table], sectors: u64, form: Form) -> Vec<u8> {
    let mut img = Vec::new();
    let mut blobs = Vec::new();
    for t in tables {
        let at = img.len() as u64;
        for c in &t.chunks {
            img.extend_from_slice(&c.stored);
        }
        blobs.push(mish(t, at));
    }
    finish(img, &blobs, sectors, form)
}

/// `data_fork` followed by `blobs` in form `form` and the trailer.
pub fn finish(mut img: Vec<u8>, blobs: &[Vec<u8>], sectors: u64, form: Form) -> Vec<u8> {
    let fork = (0, img.len() as u64);
    let at = img.len() as u64;
    let (rsrc, xml) = match form {
        Form::Plist => {
            let p = plist(blobs);
            img.extend_from_slice(&p);
            ((0, 0), (at, p.len() as u64))
        }
        Form::ResourceFork => {
            let r = resource_fork(blobs);
            img.extend_from_slice(&r);
            ((at, r.len() as u64), (0, 0))
        }
    };
    img.extend_from_slice(&koly(fork, rsrc, xml, sectors));
    img
}

/// 512 bytes of sector `s` of the tests' pattern: every sector differs.
pub fn sector_pattern(s: u64) -> Vec<u8> {
    (0..512u64)
        .map(|i| (s.wrapping_mul(131) ^ (i * 7 + (i >> 5))) as u8)
        .collect()
}

/// Sectors `[from, from + n)` of the pattern.
pub fn pattern(from: u64, n: u64) -> Vec<u8> {
    (from..from + n).flat_map(sector_pattern).collect()
}

/// The LZFSE reference implementation's encodings (tests/samples) and
/// what they decode to: 8 KiB as an LZFSE ("bvx2") block, 1 KiB as an
/// LZVN ("bvxn") one.
pub fn lzfse_samples() -> [(Vec<u8>, Vec<u8>); 2] {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/samples");
    let read = |n: &str| std::fs::read(format!("{dir}/{n}")).unwrap();
    [
        (read("lzfse-bvx2-8k.lzfse"), lzfse_text(8192)),
        (read("lzfse-bvxn-1k.lzfse"), lzfse_text(1024)),
    ]
}

/// The text the LZFSE samples encode: numbered lines, cut at `n` bytes.
pub fn lzfse_text(n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..n / 20 {
        v.extend_from_slice(format!("lzfse line {i:05} of the strata dmg test\n").as_bytes());
    }
    v.truncate(n);
    v
}
