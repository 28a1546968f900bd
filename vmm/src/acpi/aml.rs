//! A small AML encoder: just the terms the `pc` DSDT needs, each a
//! function returning its encoded bytes. Encodings follow ACPI 6.5
//! chapter 20 ("ACPI Machine Language Specification"): 20.2.2 name
//! strings, 20.2.3 data objects, 20.2.4 package length, 20.2.5 terms; and
//! chapter 6.4 for the resource descriptors inside resource templates.

/// PkgLength (20.2.4) for a body of `len` bytes: the encoded value counts
/// the PkgLength bytes themselves.
pub fn pkg_length(len: usize) -> Vec<u8> {
    if len + 1 < 0x40 {
        return vec![(len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    panic!("AML package of {len} bytes is too large");
}

fn with_pkg(prefix: &[u8], body: Vec<u8>) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend(pkg_length(body.len()));
    v.extend(body);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A NameSeg padded with '_' to four characters.
fn seg(s: &str) -> [u8; 4] {
    assert!(!s.is_empty() && s.len() <= 4, "bad AML name segment '{s}'");
    let mut b = [b'_'; 4];
    b[..s.len()].copy_from_slice(s.as_bytes());
    b
}

/// A NameString (20.2.2): optional `\` or `^` prefixes, then segments
/// separated by dots.
pub fn name_string(path: &str) -> Vec<u8> {
    let mut v = Vec::new();
    let mut rest = path;
    while let Some(r) = rest.strip_prefix('\\').or_else(|| rest.strip_prefix('^')) {
        v.push(rest.as_bytes()[0]);
        rest = r;
    }
    let segs: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('.').collect()
    };
    match segs.len() {
        0 => v.push(0),
        1 => {}
        2 => v.push(0x2e),
        n => {
            v.push(0x2f);
            v.push(n as u8);
        }
    }
    for s in segs {
        v.extend(seg(s));
    }
    v
}

pub const ZERO: u8 = 0x00;
pub const ONE: u8 = 0x01;
pub const LOCAL0: u8 = 0x60;
pub const LOCAL1: u8 = 0x61;
pub const ARG0: u8 = 0x68;

/// An integer constant with the shortest encoding.
pub fn int(n: u64) -> Vec<u8> {
    match n {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, n as u8],
        0x100..=0xffff => cat(&[&[0x0b], &(n as u16).to_le_bytes()]),
        0x1_0000..=0xffff_ffff => cat(&[&[0x0c], &(n as u32).to_le_bytes()]),
        _ => cat(&[&[0x0e], &n.to_le_bytes()]),
    }
}

pub fn string(s: &str) -> Vec<u8> {
    cat(&[&[0x0d], s.as_bytes(), &[0]])
}

/// EISAID("PNP0A03") as its 32-bit compressed form.
pub fn eisa_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    assert!(b.len() == 7, "EISA id must be 7 characters");
    let c = |x: u8| (x - b'@') as u32 & 0x1f;
    let hex = |x: u8| (x as char).to_digit(16).expect("EISA id hex digit");
    let v: u32 = (c(b[0]) << 26)
        | (c(b[1]) << 21)
        | (c(b[2]) << 16)
        | (hex(b[3]) << 12)
        | (hex(b[4]) << 8)
        | (hex(b[5]) << 4)
        | hex(b[6]);
    cat(&[&[0x0c], &v.swap_bytes().to_le_bytes()])
}

pub fn name(n: &str, obj: Vec<u8>) -> Vec<u8> {
    cat(&[&[0x08], &name_string(n), &obj])
}

pub fn scope(n: &str, body: Vec<u8>) -> Vec<u8> {
    with_pkg(&[0x10], cat(&[&name_string(n), &body]))
}

pub fn device(n: &str, body: Vec<u8>) -> Vec<u8> {
    with_pkg(&[0x5b, 0x82], cat(&[&name_string(n), &body]))
}

pub fn method(n: &str, args: u8, serialized: bool, body: Vec<u8>) -> Vec<u8> {
    let flags = (args & 7) | if serialized { 1 << 3 } else { 0 };
    with_pkg(&[0x14], cat(&[&name_string(n), &[flags], &body]))
}

pub fn package(elems: &[Vec<u8>]) -> Vec<u8> {
    assert!(elems.len() < 256, "package too long");
    with_pkg(&[0x12], cat(&[&[elems.len() as u8], &elems.concat()]))
}

/// A reference to a named object inside a package (e.g. a link device).
pub fn name_ref(path: &str) -> Vec<u8> {
    name_string(path)
}

pub fn buffer(data: &[u8]) -> Vec<u8> {
    with_pkg(&[0x11], cat(&[&int(data.len() as u64), data]))
}

pub const REGION_SYSTEM_IO: u8 = 1;
pub const REGION_PCI_CONFIG: u8 = 2;

pub fn op_region(n: &str, space: u8, offset: u64, len: u64) -> Vec<u8> {
    cat(&[
        &[0x5b, 0x80],
        &name_string(n),
        &[space],
        &int(offset),
        &int(len),
    ])
}

/// Field flags: ByteAcc, NoLock, Preserve.
pub const FIELD_BYTE_ACC: u8 = 1;
pub const FIELD_DWORD_ACC: u8 = 3;

/// A field list of (name, bits) over `region`.
pub fn field(region: &str, flags: u8, fields: &[(&str, usize)]) -> Vec<u8> {
    let mut body = cat(&[&name_string(region), &[flags]]);
    for (n, bits) in fields {
        body.extend(seg(n));
        body.extend(field_length(*bits));
    }
    with_pkg(&[0x5b, 0x81], body)
}

/// The PkgLength-shaped encoding of a field's width in bits.
fn field_length(bits: usize) -> Vec<u8> {
    if bits < 0x40 {
        vec![bits as u8]
    } else {
        vec![0x40 | (bits & 0xf) as u8, (bits >> 4) as u8]
    }
}

pub fn if_(pred: Vec<u8>, body: Vec<u8>) -> Vec<u8> {
    with_pkg(&[0xa0], cat(&[&pred, &body]))
}

pub fn ret(v: Vec<u8>) -> Vec<u8> {
    cat(&[&[0xa4], &v])
}

pub fn store(src: Vec<u8>, dst: Vec<u8>) -> Vec<u8> {
    cat(&[&[0x70], &src, &dst])
}

/// And(a, b) with no target (NullName).
pub fn and(a: Vec<u8>, b: Vec<u8>) -> Vec<u8> {
    cat(&[&[0x7b], &a, &b, &[0]])
}

/// Or(a, b, target).
pub fn or(a: Vec<u8>, b: Vec<u8>, target: Vec<u8>) -> Vec<u8> {
    cat(&[&[0x7d], &a, &b, &target])
}

pub fn lless(a: Vec<u8>, b: Vec<u8>) -> Vec<u8> {
    cat(&[&[0x95], &a, &b])
}

pub fn create_dword_field(buf: Vec<u8>, index: u64, n: &str) -> Vec<u8> {
    cat(&[&[0x8a], &buf, &int(index), &name_string(n)])
}

/// Notify(object, value) (ACPI 6.5 section 19.6.94).
pub fn notify(obj: &str, value: u64) -> Vec<u8> {
    cat(&[&[0x86], &name_string(obj), &int(value)])
}

pub fn call(n: &str, args: &[Vec<u8>]) -> Vec<u8> {
    cat(&[&name_string(n), &args.concat()])
}

/// Resource descriptors (ACPI 6.5 section 6.4) for resource templates.
pub mod res {
    /// I/O port descriptor, 16-bit decode, fixed range.
    pub fn io(base: u16, len: u8) -> Vec<u8> {
        let b = base.to_le_bytes();
        vec![0x47, 1, b[0], b[1], b[0], b[1], 1, len]
    }

    /// IRQ descriptor without flags (edge, active-high): a mask of IRQs.
    pub fn irq(irq: u8) -> Vec<u8> {
        let m = (1u16 << irq).to_le_bytes();
        vec![0x22, m[0], m[1]]
    }

    /// DMA descriptor: compatibility timing, not bus master, 8-bit.
    pub fn dma(channel: u8) -> Vec<u8> {
        vec![0x2a, 1 << channel, 0]
    }

    /// Extended interrupt descriptor: consumer, level, active-high, shared.
    pub fn ext_irq(irqs: &[u32]) -> Vec<u8> {
        let len = 2 + 4 * irqs.len();
        let mut v = vec![0x89, len as u8, 0, 0b1001, irqs.len() as u8];
        for i in irqs {
            v.extend_from_slice(&i.to_le_bytes());
        }
        v
    }

    const TYPE_MEM: u8 = 0;
    const TYPE_IO: u8 = 1;
    const TYPE_BUS: u8 = 2;
    /// General flags: producer, positive decode, min and max fixed.
    const FIXED: u8 = 0b1100;

    pub fn word_bus(min: u16, max: u16) -> Vec<u8> {
        word(TYPE_BUS, 0, min, max)
    }

    /// I/O range; type flags 3 = ISA and non-ISA ranges.
    pub fn word_io(min: u16, max: u16) -> Vec<u8> {
        word(TYPE_IO, 3, min, max)
    }

    fn word(kind: u8, tflags: u8, min: u16, max: u16) -> Vec<u8> {
        let mut v = vec![0x88, 13, 0, kind, FIXED, tflags];
        for x in [0, min, max, 0, max - min + 1] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    /// Memory range, read/write, cacheable.
    pub fn dword_mem(min: u32, max: u32) -> Vec<u8> {
        let mut v = vec![0x87, 23, 0, TYPE_MEM, FIXED, 0b011];
        for x in [0, min, max, 0, max - min + 1] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    /// Wraps descriptors with the end tag (checksum 0: "valid").
    pub fn template(descs: &[Vec<u8>]) -> Vec<u8> {
        let mut v = descs.concat();
        v.extend([0x79, 0]);
        super::buffer(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(pkg_length(0x3e), vec![0x3f]);
        assert_eq!(pkg_length(0x3f), vec![0x41, 0x04]);
        assert_eq!(pkg_length(0xffd), vec![0x4f, 0xff]);
        assert_eq!(pkg_length(0x1000), vec![0x83, 0x00, 0x01]);
        assert_eq!(name_string("\\_SB.PCI0"), b"\\\x2e_SB_PCI0".to_vec());
        assert_eq!(name_string("LNKA"), b"LNKA".to_vec());
        assert_eq!(name_string("\\_S5"), b"\\_S5_".to_vec());
        assert_eq!(
            name_string("\\_SB.PCI0.ISA"),
            b"\\\x2f\x03_SB_PCI0ISA_".to_vec()
        );
        assert_eq!(int(0x1234), vec![0x0b, 0x34, 0x12]);
        // EISAID("PNP0A03") = 0x030AD041.
        assert_eq!(eisa_id("PNP0A03"), vec![0x0c, 0x41, 0xd0, 0x0a, 0x03]);
        assert_eq!(field_length(8), vec![8]);
        assert_eq!(field_length(0x80), vec![0x40, 0x08]);
    }
}
