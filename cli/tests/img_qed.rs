//! strata-img and qemu-img on the same QED images, both ways: images
//! qemu-img makes and qemu-io writes (data, zero clusters, a backing
//! file with partly written clusters) read back, map, check and `info`
//! as qemu-img does; images strata-img makes (and fills) are the ones
//! qemu-img makes and pass `qemu-img check`/`compare`; an image left
//! with need-check set and a bad table entry is repaired when opened
//! writable.

mod support;

use support::img::{io, q_ok, s_ok, strata, Dir};

fn same_reads(d: &Dir, img: &str) {
    let (ours, theirs) = (d.p("ours.raw"), d.p("theirs.raw"));
    s_ok(&["convert", "-O", "raw", img, &ours]);
    q_ok(&["convert", "-O", "raw", img, &theirs]);
    assert!(
        std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
        "{img}"
    );
}

#[test]
fn images_qemu_img_makes_read_map_and_check_the_same() {
    let d = Dir::new("qed", "theirs");
    for opts in ["cluster_size=65536", "cluster_size=4096"] {
        let img = d.p("q.qed");
        q_ok(&["create", "-q", "-f", "qed", "-o", opts, &img, "64M"]);
        io(
            &img,
            "qed",
            &[
                "write -P 0x11 0 100k",
                "write -P 0x22 33M 1M",
                "write -z 40M 64k",
                "write -P 0x33 63M 1000k",
            ],
        );
        same_reads(&d, &img);
        for args in [
            &["info"][..],
            &["info", "--output=json"],
            &["map", "--output=json"],
            &["check"],
        ] {
            let mut a = args.to_vec();
            a.push(&img);
            assert_eq!(s_ok(&a), q_ok(&a), "{opts}: {args:?}");
        }
    }
    // A backing file under partly written clusters.
    let base = d.p("base.raw");
    std::fs::write(
        &base,
        (0..8u32 << 20)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let ov = d.p("ov.qed");
    q_ok(&["create", "-q", "-f", "qed", "-b", &base, "-F", "raw", &ov]);
    io(
        &ov,
        "qed",
        &["write -P 0x99 1000 3000", "write -P 0x98 5M 70k"],
    );
    same_reads(&d, &ov);
    assert_eq!(s_ok(&["info", &ov]), q_ok(&["info", &ov]));
    assert_eq!(
        s_ok(&["map", "--output=json", &ov]),
        q_ok(&["map", "--output=json", &ov])
    );
}

#[test]
fn images_strata_img_makes_are_qemu_imgs() {
    let d = Dir::new("qed", "ours");
    let (ours, theirs) = (d.p("s.qed"), d.p("q.qed"));
    let line = s_ok(&["create", "-f", "qed", &ours, "64M"]);
    assert!(
        line.contains("fmt=qed size=67108864 cluster_size=65536"),
        "{line}"
    );
    q_ok(&["create", "-q", "-f", "qed", &theirs, "64M"]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    // Filled by strata-img, read by qemu-img.
    let src = d.p("src.qcow2");
    q_ok(&["create", "-q", "-f", "qcow2", &src, "64M"]);
    io(
        &src,
        "qcow2",
        &[
            "write -P 0x5a 0 3M",
            "write -P 0x6b 37M 65k",
            "write -P 0x7c 63M 1M",
        ],
    );
    s_ok(&["convert", "-n", "-O", "qed", &src, &ours]);
    let o = q_ok(&["compare", &ours, &src]);
    assert!(o.contains("Images are identical"), "{o}");
    let o = q_ok(&["check", &ours]);
    assert!(o.contains("No errors were found"), "{o}");
    // And a new image by convert, small tables.
    let made = d.p("made.qed");
    s_ok(&[
        "convert",
        "-O",
        "qed",
        "-o",
        "cluster_size=4096,table_size=2",
        &src,
        &made,
    ]);
    let o = q_ok(&["compare", &made, &src]);
    assert!(o.contains("Images are identical"), "{o}");
    assert!(q_ok(&["check", &made]).contains("No errors were found"));
}

#[test]
fn need_check_repairs_bad_entries_on_a_writable_open() {
    let d = Dir::new("qed", "needcheck");
    let img = d.p("n.qed");
    q_ok(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096",
        &img,
        "4M",
    ]);
    io(&img, "qed", &["write -P 0x44 0 8k"]);
    // Point an L2 entry far past the file's end and set need-check.
    let mut b = std::fs::read(&img).unwrap();
    let l1 = u64::from_le_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_le_bytes(b[l1..l1 + 8].try_into().unwrap()) as usize;
    b[l2 + 8 * 5..l2 + 8 * 6].copy_from_slice(&(1u64 << 40).to_le_bytes());
    b[16] |= 2;
    std::fs::write(&img, &b).unwrap();
    let o = strata(&["check", &img]);
    assert_ne!(o.status.code(), Some(0));
    // A writable open checks and repairs it.
    let src = d.p("one.raw");
    std::fs::write(&src, vec![0x55u8; 4 << 20]).unwrap();
    s_ok(&["convert", "-n", "-O", "qed", "-f", "raw", &src, &img]);
    let o = q_ok(&["check", &img]);
    assert!(o.contains("No errors were found"), "{o}");
    let b = std::fs::read(&img).unwrap();
    assert_eq!(b[16] & 2, 0, "need-check cleared");
    let o = q_ok(&["compare", "-f", "qed", "-F", "raw", &img, &src]);
    assert!(o.contains("Images are identical"), "{o}");
}
