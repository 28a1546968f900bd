//! The dmg reader on images the tests build (tests/support/dmg_image.rs):
//! every chunk kind in both homes of the block tables, reads at any
//! offset, and hostile images (trailers cut or pointing astray, tables
//! and chunks too large, holes and overlaps, decompression bombs, bad
//! base64), each refused by an error naming the file, never a panic.
//! Then the `dmg_open` fuzz corpus is replayed with mutations of the
//! tables and the trailer at the end of each image.

mod support {
    pub mod dmg_image;
}

use formats::dmg::Dmg;
use formats::error::FResult;
use formats::mapping::{read_only_read, ReadOnly, ReadOnlyMap};
use formats::storage::MemStorage;
use std::io::Write;
use std::sync::Arc;
use support::dmg_image::*;

const NAME: &str = "t.dmg";

fn zlib(d: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

fn bz2(d: &[u8]) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

type Img = (ReadOnly<Dmg>, Arc<MemStorage>);

fn open(bytes: Vec<u8>) -> FResult<Img> {
    let n = bytes.len() as u64;
    let f = Arc::new(MemStorage::new(bytes, n));
    Ok((ReadOnly(Dmg::open(NAME, f.clone())?), f))
}

fn read(img: &Img, off: u64, len: usize) -> FResult<Vec<u8>> {
    let mut b = vec![0u8; len];
    read_only_read(&img.0, NAME, &*img.1, off, &mut b)?;
    Ok(b)
}

fn open_err(bytes: Vec<u8>) -> String {
    match open(bytes) {
        Ok(_) => panic!("opened"),
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains(NAME), "{m}");
            m
        }
    }
}

/// Two tables: one of every kind at sector 0, one of raw and zlib after
/// it, and what the disk holds. LZFSE chunks are the reference
/// implementation's encodings.
fn every_kind() -> (Vec<Table>, Vec<u8>, u64) {
    let [(lz8, t8), (lz1, t1)] = lzfse_samples();
    let mut want = Vec::new();
    let mut t0 = Vec::new();
    let mut push = |c: Chunk, bytes: Vec<u8>| {
        want.extend_from_slice(&bytes);
        t0.push(c);
    };
    push(Chunk::new(RAW, 3, pattern(0, 3)), pattern(0, 3));
    push(Chunk::new(ZERO, 5, vec![]), vec![0; 5 * 512]);
    push(Chunk::new(ZLIB, 8, zlib(&pattern(8, 8))), pattern(8, 8));
    push(Chunk::new(IGNORE, 2, vec![]), vec![0; 1024]);
    push(Chunk::new(BZIP2, 7, bz2(&pattern(18, 7))), pattern(18, 7));
    push(Chunk::new(LZFSE, 16, lz8), t8);
    push(Chunk::new(LZFSE, 2, lz1), t1);
    push(Chunk::new(ZLIB, 1, zlib(&pattern(43, 1))), pattern(43, 1));
    let first = (want.len() / 512) as u64;
    let t1 = vec![
        Chunk::new(ZLIB, 4, zlib(&pattern(100, 4))),
        Chunk::new(RAW, 2, pattern(104, 2)),
    ];
    want.extend_from_slice(&pattern(100, 4));
    want.extend_from_slice(&pattern(104, 2));
    let tables = vec![
        Table {
            first_sector: 0,
            chunks: t0,
        },
        Table {
            first_sector: first,
            chunks: t1,
        },
    ];
    let n = (want.len() / 512) as u64;
    (tables, want, n)
}

#[test]
fn every_chunk_kind_reads_back_in_both_forms() {
    let (tables, want, n) = every_kind();
    for form in [Form::Plist, Form::ResourceFork] {
        let img = open(build(&tables, n, form)).unwrap();
        assert_eq!(img.0 .0.size(), n * 512, "{form:?}");
        assert!(read(&img, 0, want.len()).unwrap() == want, "{form:?}");
        // Unaligned pieces across chunk borders, and again from the
        // cached chunk.
        for (off, len) in [(1000, 7000), (4100, 9), (10_000, 12_000), (22_000, 1530)] {
            let got = read(&img, off, len).unwrap();
            assert!(
                got == want[off as usize..off as usize + len],
                "{form:?} {off}"
            );
        }
        // Past the end.
        assert!(read(&img, n * 512 - 10, 11).is_err());
    }
}

#[test]
fn mapping_names_where_each_kind_is() {
    let (tables, _, n) = every_kind();
    let img = open(build(&tables, n, Form::Plist)).unwrap();
    let pieces = img.0 .0.map_read(0, n * 512).unwrap();
    use formats::mapping::Run;
    // Raw bytes are where the data fork keeps them (it starts the file).
    assert_eq!(pieces[0].run, Run::Data(0));
    assert_eq!(pieces[0].len, 3 * 512);
    assert_eq!(pieces[1].run, Run::Zero);
    assert_eq!(pieces[1].len, 5 * 512);
    assert!(matches!(pieces[2].run, Run::Encoded(_)));
    assert_eq!(pieces[3].run, Run::Zero);
}

#[test]
fn a_trailer_that_ends_before_the_end_of_the_file_is_found() {
    let (tables, want, n) = every_kind();
    for extra in [1, 300, 511] {
        let mut v = build(&tables, n, Form::Plist);
        v.resize(v.len() + extra, 0xee);
        let img = open(v).unwrap();
        assert!(read(&img, 0, want.len()).unwrap() == want, "{extra}");
    }
    // 512 bytes after it: not looked for.
    let mut v = build(&tables, n, Form::Plist);
    v.extend([0u8; 512]);
    assert!(open_err(v).contains("Could not locate UDIF trailer"));
}

fn one_table(chunks: Vec<Chunk>, sectors: u64) -> Vec<u8> {
    build(
        &[Table {
            first_sector: 0,
            chunks,
        }],
        sectors,
        Form::Plist,
    )
}

#[test]
fn truncated_and_misplaced_trailers_are_refused() {
    let v = one_table(vec![Chunk::new(RAW, 1, pattern(0, 1))], 1);
    // Too short, no trailer, a trailer cut in half.
    assert!(open_err(v[..100].to_vec()).contains("at least 512 bytes"));
    assert!(open_err(v[..v.len() - 512].to_vec()).contains("Could not locate"));
    assert!(open_err(v[..v.len() - 256].to_vec()).contains("Could not locate"));
    let koly = v.len() - 512;
    // Forks pointing at or past the trailer.
    for (at, val) in [
        (0x18, koly as u64 + 1),
        (0x28, koly as u64),
        (0x30, u64::MAX),
        (0xd8, u64::MAX),
        (0xe0, koly as u64),
    ] {
        let mut b = v.clone();
        b[koly + at..koly + at + 8].copy_from_slice(&val.to_be_bytes());
        open_err(b);
    }
    // Neither fork.
    let mut b = v.clone();
    b[koly + 0xe0..koly + 0xe8].fill(0);
    assert!(open_err(b).contains("neither"));
    // A disk size past 2^63 bytes.
    let mut b = v.clone();
    b[koly + 0x1ec..koly + 0x1f4].copy_from_slice(&(u64::MAX / 256).to_be_bytes());
    assert!(open_err(b).contains("too large"));
}

/// An image whose one table holds `entries` (encoded) over a data fork
/// of `data`.
fn with_entries(data: Vec<u8>, entries: &[Vec<u8>], sectors: u64, form: Form) -> Vec<u8> {
    let m = mish_raw(0, sectors, 0, entries);
    finish(data, &[m], sectors, form)
}

#[test]
fn oversized_chunks_and_tables_are_refused() {
    for form in [Form::Plist, Form::ResourceFork] {
        // A zlib chunk of more than 64 MiB of sectors, a raw one storing
        // more than 64 MiB.
        let e = open_err(with_entries(
            vec![],
            &[entry(ZLIB, 0, 131_073, 0, 10)],
            131_073,
            form,
        ));
        assert!(e.contains("sector count 131073"), "{e}");
        let e = open_err(with_entries(
            vec![],
            &[entry(RAW, 0, 1, 0, (64 << 20) + 1)],
            1,
            form,
        ));
        assert!(e.contains("is larger than max"), "{e}");
        // Sectors and offsets past 2^64.
        let e = open_err(with_entries(
            vec![],
            &[entry(ZERO, u64::MAX, 2, 0, 0)],
            1,
            form,
        ));
        assert!(e.contains("past 2^64"), "{e}");
        let e = open_err(with_entries(
            vec![],
            &[entry(RAW, 0, 1, u64::MAX - 10, 512)],
            1,
            form,
        ));
        assert!(e.contains("past 2^64"), "{e}");
    }
    // A zero chunk as large as the disk can be is fine: it is never
    // inflated.
    let big = (1u64 << 50) / 512;
    let img = open(with_entries(
        vec![],
        &[entry(ZERO, 0, big, 0, 0)],
        big,
        Form::Plist,
    ))
    .unwrap();
    assert!(read(&img, (1 << 50) - 4096, 4096).unwrap() == vec![0; 4096]);
    // A property list claimed larger than 16 MiB (the file is that big).
    let mut v = vec![0u8; (16 << 20) + 2];
    let k = koly((0, 0), (0, 0), (0, (16 << 20) + 1), 1);
    v.extend_from_slice(&k);
    assert!(open_err(v).contains("larger than max"));
}

#[test]
fn huge_resource_counts_are_refused_before_any_allocation() {
    let v = build(
        &[Table {
            first_sector: 0,
            chunks: vec![Chunk::new(RAW, 1, pattern(0, 1))],
        }],
        1,
        Form::ResourceFork,
    );
    let rsrc = 512usize; // the data fork is one sector
                         // Resource data claimed larger than the fork; one resource claimed
                         // larger than the resource data.
    let mut b = v.clone();
    b[rsrc + 8..rsrc + 12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(open_err(b).contains("does not lie in the resource fork"));
    let mut b = v.clone();
    b[rsrc + 256..rsrc + 260].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(open_err(b).contains("does not fit"));
    let mut b = v.clone();
    b[rsrc + 256..rsrc + 260].fill(0);
    assert!(open_err(b).contains("does not fit"));
}

#[test]
fn chunks_past_the_end_of_the_file() {
    let z = zlib(&pattern(0, 4));
    let len = z.len() as u64;
    // A compressed chunk past the end reads as zeroes, which do not
    // inflate: the read fails by name.
    let img = open(with_entries(
        z.clone(),
        &[entry(ZLIB, 0, 4, 1 << 40, len)],
        4,
        Form::Plist,
    ))
    .unwrap();
    let e = read(&img, 0, 512).unwrap_err().to_string();
    assert!(e.contains(NAME) && e.contains("inflate"), "{e}");
    // A raw chunk past the end reads as zeroes, as QEMU's reads past the
    // end of a file do.
    let img = open(with_entries(
        vec![],
        &[entry(RAW, 0, 2, 1 << 40, 1024)],
        2,
        Form::Plist,
    ))
    .unwrap();
    assert!(read(&img, 0, 1024).unwrap() == vec![0; 1024]);
}

#[test]
fn decompression_bombs_stop_at_the_chunk() {
    // 1 MiB of zeroes stored for one sector, in zlib and bzip2.
    for (kind, stored) in [(ZLIB, zlib(&[0; 1 << 20])), (BZIP2, bz2(&[0; 1 << 20]))] {
        let n = stored.len() as u64;
        let img = open(with_entries(
            stored,
            &[entry(kind, 0, 1, 0, n)],
            1,
            Form::Plist,
        ))
        .unwrap();
        let e = read(&img, 0, 512).unwrap_err().to_string();
        assert!(
            e.contains(NAME) && e.contains("does not inflate to 512"),
            "{e}"
        );
    }
    // An LZFSE stream longer, and one shorter, than its chunk.
    let [(lz8, _), (lz1, _)] = lzfse_samples();
    for (stored, sectors) in [(lz8, 15), (lz1, 3)] {
        let n = stored.len() as u64;
        let img = open(with_entries(
            stored,
            &[entry(LZFSE, 0, sectors, 0, n)],
            sectors,
            Form::Plist,
        ))
        .unwrap();
        let e = read(&img, 0, 512).unwrap_err().to_string();
        assert!(e.contains("does not inflate"), "{e}");
    }
    // A zlib stream shorter than its chunk; garbage as bzip2.
    let z = zlib(&pattern(0, 1));
    let n = z.len() as u64;
    let img = open(with_entries(z, &[entry(ZLIB, 0, 2, 0, n)], 2, Form::Plist)).unwrap();
    assert!(read(&img, 0, 512).is_err());
    let img = open(with_entries(
        vec![0x42; 600],
        &[entry(BZIP2, 0, 2, 0, 600)],
        2,
        Form::Plist,
    ))
    .unwrap();
    assert!(read(&img, 0, 512).is_err());
}

#[test]
fn bad_base64_and_broken_xml_are_refused() {
    let m = mish_raw(0, 1, 0, &[entry(ZERO, 0, 1, 0, 0)]);
    let good = finish(vec![], &[m], 1, Form::Plist);
    assert!(open(good.clone()).is_ok());
    let s = String::from_utf8(good[..good.len() - 512].to_vec()).unwrap();
    let redo = |x: String| {
        let mut v = x.into_bytes();
        let k = koly((0, 0), (0, 0), (0, v.len() as u64), 1);
        v.extend_from_slice(&k);
        v
    };
    let i = s.find("<data>").unwrap() + 12;
    let mut bad = s.clone();
    bad.replace_range(i..i + 1, "*");
    assert!(open_err(redo(bad)).contains("not base64"));
    let mut bad = s.clone();
    bad.replace_range(i..i + 1, "=");
    assert!(open_err(redo(bad)).contains("not base64"));
    let cut = s[..s.rfind("</data>").unwrap()].to_string();
    assert!(open_err(redo(cut)).contains("without </data>"));
}

#[test]
fn holes_unknown_types_and_short_raw_chunks_fail_their_reads() {
    // Sectors 0-1 raw, 2-3 nothing, 4-5 ADC (unknown: skipped), 6-7
    // raw storing one sector, 8-9 zero.
    let data = pattern(0, 3);
    let img = open(with_entries(
        data.clone(),
        &[
            entry(RAW, 0, 2, 0, 1024),
            entry(ADC, 4, 2, 1024, 10),
            entry(RAW, 6, 2, 1024, 512),
            entry(ZERO, 8, 2, 0, 0),
        ],
        12,
        Form::Plist,
    ))
    .unwrap();
    assert!(read(&img, 0, 1024).unwrap() == data[..1024]);
    assert!(read(&img, 8 * 512, 1024).unwrap() == vec![0; 1024]);
    for (sector, what) in [
        (2, "no chunk holds sector 2"),
        (4, "no chunk holds sector 4"),
        (6, "stores 512 bytes for 2 sectors"),
        (10, "no chunk holds sector 10"),
    ] {
        let e = read(&img, sector * 512, 512).unwrap_err().to_string();
        assert!(e.contains(NAME) && e.contains(what), "{sector}: {e}");
    }
    // A read that starts well and runs into the hole fails whole.
    assert!(read(&img, 512, 1024).is_err());
}

#[test]
fn overlapping_chunks_are_refused_and_tables_out_of_order_are_sorted() {
    let e = open_err(with_entries(
        pattern(0, 4),
        &[entry(RAW, 0, 3, 0, 1536), entry(RAW, 2, 2, 1024, 1024)],
        4,
        Form::Plist,
    ));
    assert!(e.contains("overlap at sector 2"), "{e}");
    // Two tables given in reverse order of their sectors.
    let data = pattern(0, 4);
    let late = mish_raw(2, 2, 1024, &[entry(RAW, 0, 2, 0, 1024)]);
    let early = mish_raw(0, 2, 0, &[entry(RAW, 0, 2, 0, 1024)]);
    let img = open(finish(data.clone(), &[late, early], 4, Form::ResourceFork)).unwrap();
    assert!(read(&img, 0, 2048).unwrap() == data);
}

#[test]
fn tables_that_are_not_mish_blocks_are_skipped() {
    // A block with another magic, one too short for an entry: no chunks,
    // so every read fails, but the image opens as QEMU's does.
    let mut other = mish_raw(0, 1, 0, &[entry(ZERO, 0, 1, 0, 0)]);
    other[..4].copy_from_slice(b"nope");
    let short = mish_raw(0, 1, 0, &[entry(ZERO, 0, 1, 0, 0)])[..243].to_vec();
    for form in [Form::Plist, Form::ResourceFork] {
        let img = open(finish(vec![], &[other.clone(), short.clone()], 1, form)).unwrap();
        assert!(read(&img, 0, 512).is_err());
    }
}

#[test]
fn an_empty_disk_opens() {
    let img = open(finish(vec![], &[], 0, Form::Plist)).unwrap();
    assert_eq!(img.0 .0.size(), 0);
}

/// The seeds of fuzz/corpus/dmg_open, written to the directory named by
/// STRATA_DMG_SEEDS (how the committed ones were made).
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let [(lz8, _), (lz1, _)] = lzfse_samples();
    let small = |form| {
        build(
            &[
                Table {
                    first_sector: 0,
                    chunks: vec![
                        Chunk::new(RAW, 1, vec![0x11; 512]),
                        Chunk::new(ZERO, 3, vec![]),
                        Chunk::new(ZLIB, 4, zlib(&[0x22; 2048])),
                    ],
                },
                Table {
                    first_sector: 8,
                    chunks: vec![
                        Chunk::new(BZIP2, 2, bz2(&[0x33; 1024])),
                        Chunk::new(LZFSE, 2, lz1.clone()),
                        Chunk::new(IGNORE, 2, vec![]),
                    ],
                },
            ],
            14,
            form,
        )
    };
    vec![
        ("plist-every-kind.dmg", small(Form::Plist)),
        ("rsrc-every-kind.dmg", small(Form::ResourceFork)),
        // The FSE decoder's input (the other seeds have an LZVN block).
        (
            "rsrc-lzfse.dmg",
            build(
                &[Table {
                    first_sector: 0,
                    chunks: vec![Chunk::new(LZFSE, 16, lz8), Chunk::new(ZERO, 4, vec![])],
                }],
                20,
                Form::ResourceFork,
            ),
        ),
        (
            "plist-zero-disk.dmg",
            one_table(vec![Chunk::new(ZERO, 1 << 20, vec![])], 1 << 20),
        ),
    ]
}

#[test]
fn seeds_are_small_and_open() {
    let out = std::env::var("STRATA_DMG_SEEDS").ok();
    for (name, v) in seeds() {
        assert!(v.len() < 4096, "{name}: {}", v.len());
        let img = open(v.clone()).unwrap();
        read(&img, 0, img.0 .0.size() as usize).unwrap();
        if let Some(d) = &out {
            std::fs::write(format!("{d}/{name}"), &v).unwrap();
        }
    }
}

#[test]
fn dmg_open_corpus_with_mutations_at_the_tail() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/dmg_open");
    let mut corpus: Vec<_> = std::fs::read_dir(dir)
        .expect("corpus directory")
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    corpus.sort();
    assert!(!corpus.is_empty());
    let mut x: u64 = 0x646d_6700_0000_0001;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for base in corpus {
        formats::dmg::fuzz_open(&base);
        // The tables and the trailer are at the end of the file.
        let tail = base.len().min(2048);
        for i in 0..300 {
            let mut d = base.clone();
            for _ in 0..1 + next() % 4 {
                let at = d.len() - 1 - (next() as usize) % tail;
                d[at] ^= (next() as u8) | 1;
            }
            if i % 10 == 9 {
                let n = (next() as usize) % d.len();
                d.truncate(n.max(1));
            }
            formats::dmg::fuzz_open(&d);
        }
    }
}
