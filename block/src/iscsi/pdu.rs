//! iSCSI PDUs on the wire: RFC 7143 §11 ("iSCSI PDU Formats"): §11.2
//! the Basic Header Segment (BHS) and the padding of data segments,
//! §11.3/§11.4 SCSI Command and Response, §11.5/§11.6 Task Management,
//! §11.7 Data-Out and Data-In, §11.8 R2T, §11.9 Asynchronous Message,
//! §11.12-§11.15 Login and Logout, §11.17 Reject, §11.18/§11.19 NOP-Out
//! and NOP-In; §13.1 for the CRC32C digest.
//!
//! Parse, then execute: a header read from the target becomes a typed
//! [`TargetPdu`] here, with every length checked against what was
//! negotiated, before the session acts on it. Nothing here panics on
//! hostile input or allocates more than [`MAX_RECV_DATA`] plus a
//! bounded AHS; the session reads data segments only after this check.

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// The largest data segment we accept in one PDU: what we declare as our
/// MaxRecvDataSegmentLength (RFC 7143 §13.12), so a target that sends
/// more breaks the protocol and is cut off rather than allocated for.
pub const MAX_RECV_DATA: u32 = 256 * 1024;

/// The reserved tag ("no task"): RFC 7143 §11.18.
pub const NO_TAG: u32 = 0xffff_ffff;

// Initiator opcodes (RFC 7143 §11.2.1.2).
pub const OP_NOP_OUT: u8 = 0x00;
pub const OP_SCSI_CMD: u8 = 0x01;
pub const OP_TMF_REQ: u8 = 0x02;
pub const OP_LOGIN_REQ: u8 = 0x03;
pub const OP_TEXT_REQ: u8 = 0x04;
pub const OP_DATA_OUT: u8 = 0x05;
pub const OP_LOGOUT_REQ: u8 = 0x06;
// Target opcodes.
pub const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RESP: u8 = 0x21;
pub const OP_TMF_RESP: u8 = 0x22;
pub const OP_LOGIN_RESP: u8 = 0x23;
pub const OP_TEXT_RESP: u8 = 0x24;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RESP: u8 = 0x26;
pub const OP_R2T: u8 = 0x31;
pub const OP_ASYNC: u8 = 0x32;
pub const OP_REJECT: u8 = 0x3f;

/// The immediate-delivery bit of byte 0 (§11.2.1.2).
const IMMEDIATE: u8 = 0x40;
/// The Final bit of byte 1.
const FINAL: u8 = 0x80;

/// A target that broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PduError(pub String);

impl std::fmt::Display for PduError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Bytes of padding after a data segment of `len` bytes (§11.2.3: data
/// segments are padded to a multiple of 4).
pub fn pad(len: u32) -> usize {
    ((4 - (len % 4)) % 4) as usize
}

/// The CRC32C digest of `parts` as the wire carries it (§13.1: the
/// digest is sent least significant byte first, as libiscsi and Linux do).
pub fn digest(parts: &[&[u8]]) -> [u8; 4] {
    let mut c = 0u32;
    for p in parts {
        c = crc32c::crc32c_append(c, p);
    }
    c.to_le_bytes()
}

/// The 8-byte LUN field for LUN `n` (SAM-5 single-level addressing:
/// peripheral below 256, flat space up to 16383, as libiscsi encodes it).
pub fn encode_lun(n: u16) -> [u8; 8] {
    let mut l = [0u8; 8];
    if n < 256 {
        l[1] = n as u8;
    } else {
        l[0] = 0x40 | ((n >> 8) as u8 & 0x3f);
        l[1] = n as u8;
    }
    l
}

/// Status fields that most target PDUs carry at bytes 24..36 (§11.2.1.x:
/// StatSN, ExpCmdSN, MaxCmdSN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sn {
    pub statsn: u32,
    pub expcmdsn: u32,
    pub maxcmdsn: u32,
}

fn sn(b: &[u8]) -> Sn {
    Sn {
        statsn: be32(b, 24),
        expcmdsn: be32(b, 28),
        maxcmdsn: be32(b, 32),
    }
}

/// A PDU from the target, parsed from its BHS. `data_len` is the data
/// segment length that follows (before padding), already bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPdu {
    /// §11.19. A `ttt` other than [`NO_TAG`] asks for a NOP-Out reply.
    NopIn {
        itt: u32,
        ttt: u32,
        lun: [u8; 8],
        sn: Sn,
    },
    /// §11.4. The data segment holds the sense data.
    ScsiResponse {
        itt: u32,
        response: u8,
        status: u8,
        sn: Sn,
        /// (overflow, underflow, residual count)
        residual: (bool, bool, u32),
    },
    /// §11.6.
    TmfResponse { itt: u32, response: u8, sn: Sn },
    /// §11.13.
    LoginResponse {
        transit: bool,
        cont: bool,
        csg: u8,
        nsg: u8,
        version_active: u8,
        tsih: u16,
        itt: u32,
        sn: Sn,
        class: u8,
        detail: u8,
    },
    /// §11.11.
    TextResponse {
        final_: bool,
        cont: bool,
        itt: u32,
        ttt: u32,
        sn: Sn,
    },
    /// §11.7.2. With `status` (the S bit), it ends the command.
    DataIn {
        itt: u32,
        final_: bool,
        status: Option<u8>,
        sn: Sn,
        datasn: u32,
        offset: u32,
        residual: (bool, bool, u32),
    },
    /// §11.15.
    LogoutResponse { itt: u32, response: u8, sn: Sn },
    /// §11.8.
    R2t {
        itt: u32,
        ttt: u32,
        sn: Sn,
        r2tsn: u32,
        offset: u32,
        len: u32,
    },
    /// §11.9.
    Async { event: u8, sn: Sn, param: [u16; 3] },
    /// §11.17. The data segment is the rejected PDU's header.
    Reject { reason: u8, sn: Sn },
}

/// A parsed header: the PDU, the AHS length to skip and the data
/// segment length to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub pdu: TargetPdu,
    /// Bytes of Additional Header Segments that follow the BHS (at most
    /// 1020: TotalAHSLength is one byte counting 4-byte words).
    pub ahs_len: usize,
    /// Data segment length before padding (at most `max_data`).
    pub data_len: u32,
}

/// Parse a BHS from the target. `max_data`: the largest data segment
/// accepted (our MaxRecvDataSegmentLength; login responses may use the
/// login default of 8192 or more, the caller says).
pub fn parse(b: &[u8; BHS_LEN], max_data: u32) -> Result<Header, PduError> {
    let op = b[0] & 0x3f;
    let flags = b[1];
    let ahs_len = b[4] as usize * 4;
    let data_len = u32::from_be_bytes([0, b[5], b[6], b[7]]);
    if data_len > max_data {
        return Err(PduError(format!(
            "PDU (opcode {op:#04x}) with a {data_len}-byte data segment, more than the {max_data} negotiated"
        )));
    }
    let itt = be32(b, 16);
    let ttt = be32(b, 20);
    let residual = (flags & 0x04 != 0, flags & 0x02 != 0, be32(b, 44));
    let no_data = |what: &str| -> Result<(), PduError> {
        if data_len != 0 {
            Err(PduError(format!("{what} with a data segment")))
        } else {
            Ok(())
        }
    };
    let pdu = match op {
        OP_NOP_IN => {
            let mut lun = [0u8; 8];
            lun.copy_from_slice(&b[8..16]);
            TargetPdu::NopIn {
                itt,
                ttt,
                lun,
                sn: sn(b),
            }
        }
        OP_SCSI_RESP => {
            if flags & FINAL == 0 {
                return Err(PduError("SCSI Response without the F bit".into()));
            }
            if residual.0 && residual.1 {
                return Err(PduError(
                    "SCSI Response with both overflow and underflow".into(),
                ));
            }
            TargetPdu::ScsiResponse {
                itt,
                response: b[2],
                status: b[3],
                sn: sn(b),
                residual,
            }
        }
        OP_TMF_RESP => {
            no_data("Task Management Response")?;
            TargetPdu::TmfResponse {
                itt,
                response: b[2],
                sn: sn(b),
            }
        }
        OP_LOGIN_RESP => {
            let transit = flags & 0x80 != 0;
            let cont = flags & 0x40 != 0;
            if transit && cont {
                // §11.13.2: T and C must not both be set.
                return Err(PduError("Login Response with both T and C bits".into()));
            }
            TargetPdu::LoginResponse {
                transit,
                cont,
                csg: (flags >> 2) & 3,
                nsg: flags & 3,
                version_active: b[3],
                tsih: be16(b, 14),
                itt,
                sn: sn(b),
                class: b[36],
                detail: b[37],
            }
        }
        OP_TEXT_RESP => TargetPdu::TextResponse {
            final_: flags & FINAL != 0,
            cont: flags & 0x40 != 0,
            itt,
            ttt,
            sn: sn(b),
        },
        OP_DATA_IN => {
            let s = flags & 0x01 != 0;
            if s && flags & FINAL == 0 {
                // §11.7.4: the S bit only with the F bit.
                return Err(PduError("Data-In with status but without the F bit".into()));
            }
            if residual.0 && residual.1 {
                return Err(PduError("Data-In with both overflow and underflow".into()));
            }
            TargetPdu::DataIn {
                itt,
                final_: flags & FINAL != 0,
                status: s.then_some(b[3]),
                sn: sn(b),
                datasn: be32(b, 36),
                offset: be32(b, 40),
                residual,
            }
        }
        OP_LOGOUT_RESP => {
            no_data("Logout Response")?;
            TargetPdu::LogoutResponse {
                itt,
                response: b[2],
                sn: sn(b),
            }
        }
        OP_R2T => {
            no_data("R2T")?;
            let len = be32(b, 44);
            if len == 0 {
                // §11.8.5: the desired length is never 0.
                return Err(PduError("R2T for 0 bytes".into()));
            }
            TargetPdu::R2t {
                itt,
                ttt,
                sn: sn(b),
                r2tsn: be32(b, 36),
                offset: be32(b, 40),
                len,
            }
        }
        OP_ASYNC => TargetPdu::Async {
            event: b[36],
            sn: sn(b),
            param: [be16(b, 38), be16(b, 40), be16(b, 42)],
        },
        OP_REJECT => TargetPdu::Reject {
            reason: b[2],
            sn: sn(b),
        },
        _ => {
            return Err(PduError(format!(
                "unknown opcode {op:#04x} from the target"
            )))
        }
    };
    Ok(Header {
        pdu,
        ahs_len,
        data_len,
    })
}

/// Fields of a SCSI Command PDU (§11.3).
#[derive(Debug, Clone, Copy)]
pub struct ScsiCommand {
    pub read: bool,
    pub write: bool,
    pub lun: [u8; 8],
    pub itt: u32,
    pub expected_len: u32,
    pub cmdsn: u32,
    pub expstatsn: u32,
    pub cdb: [u8; 16],
    /// Length of the immediate data that follows.
    pub data_len: u32,
    /// Unsolicited data follows in Data-Out PDUs (clears the F bit).
    pub more_unsolicited: bool,
}

fn header(op: u8, flags: u8, data_len: u32) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = op;
    b[1] = flags;
    let l = data_len.to_be_bytes();
    b[5..8].copy_from_slice(&l[1..4]);
    b
}

impl ScsiCommand {
    pub fn encode(&self) -> [u8; BHS_LEN] {
        // ATTR = 1 (simple task): §11.3.1.
        let mut f = 0x01;
        if !self.more_unsolicited {
            f |= FINAL;
        }
        if self.read {
            f |= 0x40;
        }
        if self.write {
            f |= 0x20;
        }
        let mut b = header(OP_SCSI_CMD, f, self.data_len);
        b[8..16].copy_from_slice(&self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.expected_len);
        put32(&mut b, 24, self.cmdsn);
        put32(&mut b, 28, self.expstatsn);
        b[32..48].copy_from_slice(&self.cdb);
        b
    }
}

/// A Data-Out PDU header (§11.7.1).
#[allow(clippy::too_many_arguments)]
pub fn data_out(
    final_: bool,
    lun: [u8; 8],
    itt: u32,
    ttt: u32,
    expstatsn: u32,
    datasn: u32,
    offset: u32,
    len: u32,
) -> [u8; BHS_LEN] {
    let mut b = header(OP_DATA_OUT, if final_ { FINAL } else { 0 }, len);
    b[8..16].copy_from_slice(&lun);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    put32(&mut b, 28, expstatsn);
    put32(&mut b, 36, datasn);
    put32(&mut b, 40, offset);
    b
}

/// A NOP-Out (§11.18): a reply to a target's NOP-In (`itt` = [`NO_TAG`],
/// its `ttt` and LUN echoed), or a ping of ours (`ttt` = [`NO_TAG`]).
pub fn nop_out(itt: u32, ttt: u32, lun: [u8; 8], cmdsn: u32, expstatsn: u32) -> [u8; BHS_LEN] {
    let mut b = header(OP_NOP_OUT | IMMEDIATE, FINAL, 0);
    b[8..16].copy_from_slice(&lun);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    put32(&mut b, 24, cmdsn);
    put32(&mut b, 28, expstatsn);
    b
}

/// Fields of a Login Request (§11.12).
#[derive(Debug, Clone, Copy)]
pub struct LoginRequest {
    pub transit: bool,
    pub csg: u8,
    pub nsg: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmdsn: u32,
    pub expstatsn: u32,
    pub data_len: u32,
}

impl LoginRequest {
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut f = ((self.csg & 3) << 2) | (self.nsg & 3);
        if self.transit {
            f |= 0x80;
        }
        let mut b = header(OP_LOGIN_REQ | IMMEDIATE, f, self.data_len);
        // Version-max and version-min are 0 (§11.12.4).
        b[8..14].copy_from_slice(&self.isid);
        b[14..16].copy_from_slice(&self.tsih.to_be_bytes());
        put32(&mut b, 16, self.itt);
        b[20..22].copy_from_slice(&self.cid.to_be_bytes());
        put32(&mut b, 24, self.cmdsn);
        put32(&mut b, 28, self.expstatsn);
        b
    }
}

/// A Logout Request closing the session (§11.14, reason code 0).
pub fn logout(itt: u32, cmdsn: u32, expstatsn: u32) -> [u8; BHS_LEN] {
    let mut b = header(OP_LOGOUT_REQ | IMMEDIATE, FINAL, 0);
    put32(&mut b, 16, itt);
    put32(&mut b, 24, cmdsn);
    put32(&mut b, 28, expstatsn);
    b
}

/// TMF function codes (§11.5.1).
pub const TMF_ABORT_TASK: u8 = 1;
pub const TMF_LUN_RESET: u8 = 5;

/// A Task Management Function Request (§11.5), sent immediate.
pub fn tmf(
    function: u8,
    lun: [u8; 8],
    itt: u32,
    ref_itt: u32,
    cmdsn: u32,
    expstatsn: u32,
    ref_cmdsn: u32,
) -> [u8; BHS_LEN] {
    let mut b = header(OP_TMF_REQ | IMMEDIATE, FINAL | function, 0);
    b[8..16].copy_from_slice(&lun);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ref_itt);
    put32(&mut b, 24, cmdsn);
    put32(&mut b, 28, expstatsn);
    put32(&mut b, 32, ref_cmdsn);
    b
}

/// Serial number arithmetic on 32-bit sequence numbers (RFC 1982, as
/// RFC 7143 §4.2.2.1 requires for CmdSN and StatSN): `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// Sense data (SPC-4 §4.5): (key, ASC, ASCQ), fixed or descriptor
/// format; `None` if too short or of an unknown format.
pub fn parse_sense(s: &[u8]) -> Option<(u8, u8, u8)> {
    match s.first()? & 0x7f {
        0x70 | 0x71 if s.len() >= 14 => Some((s[2] & 0x0f, s[12], s[13])),
        0x70 | 0x71 if s.len() >= 3 => Some((s[2] & 0x0f, 0, 0)),
        0x72 | 0x73 if s.len() >= 4 => Some((s[1] & 0x0f, s[2], s[3])),
        _ => None,
    }
}

/// The sense data in a SCSI Response's data segment (§11.4.7.2: a
/// 2-byte SenseLength, then the sense data), bounded by the segment.
pub fn response_sense(data: &[u8]) -> &[u8] {
    if data.len() < 2 {
        return &[];
    }
    let n = (be16(data, 0) as usize).min(data.len() - 2);
    &data[2..2 + n]
}

/// The ITT of a rejected PDU's header (a Reject's data segment).
pub fn rejected_itt(data: &[u8]) -> Option<u32> {
    (data.len() >= BHS_LEN).then(|| be32(data, 16))
}

/// Exercise every parser on arbitrary bytes (the `iscsi_pdu` fuzz
/// target): the header parser, sense and login text parsing, and the
/// CHAP answer.
pub fn fuzz_parsers(data: &[u8]) {
    if data.len() >= BHS_LEN {
        let mut b = [0u8; BHS_LEN];
        b.copy_from_slice(&data[..BHS_LEN]);
        if let Ok(h) = parse(&b, MAX_RECV_DATA) {
            assert!(h.data_len <= MAX_RECV_DATA);
            assert!(h.ahs_len <= 1020);
        }
        let _ = rejected_itt(data);
    }
    let _ = parse_sense(data);
    let _ = parse_sense(response_sense(data));
    if let Ok(kv) = super::login::parse_text(data) {
        let _ = super::login::negotiate_params(&kv, super::login::Offer::default());
        let _ = super::login::chap_response(&kv, b"secret");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bhs(op: u8, flags: u8, dlen: u32) -> [u8; BHS_LEN] {
        header(op, flags, dlen)
    }

    #[test]
    fn bounded_data_segment() {
        let b = bhs(OP_DATA_IN, 0x80, MAX_RECV_DATA + 1);
        assert!(parse(&b, MAX_RECV_DATA).is_err());
        let b = bhs(OP_DATA_IN, 0x80, 0xff_ffff);
        assert!(parse(&b, MAX_RECV_DATA).is_err());
        let b = bhs(OP_DATA_IN, 0x80, 4096);
        let h = parse(&b, MAX_RECV_DATA).unwrap();
        assert_eq!(h.data_len, 4096);
    }

    #[test]
    fn hostile_headers() {
        // Unknown opcode.
        assert!(parse(&bhs(0x3a, 0x80, 0), MAX_RECV_DATA).is_err());
        // An initiator opcode from the target.
        assert!(parse(&bhs(OP_SCSI_CMD, 0x80, 0), MAX_RECV_DATA).is_err());
        // Status without F.
        assert!(parse(&bhs(OP_DATA_IN, 0x01, 0), MAX_RECV_DATA).is_err());
        // R2T with data, R2T for nothing.
        assert!(parse(&bhs(OP_R2T, 0x80, 4), MAX_RECV_DATA).is_err());
        assert!(parse(&bhs(OP_R2T, 0x80, 0), MAX_RECV_DATA).is_err());
        // Login response with T and C.
        assert!(parse(&bhs(OP_LOGIN_RESP, 0xc0, 0), MAX_RECV_DATA).is_err());
        // SCSI response without F, or with over- and underflow.
        assert!(parse(&bhs(OP_SCSI_RESP, 0x00, 0), MAX_RECV_DATA).is_err());
        assert!(parse(&bhs(OP_SCSI_RESP, 0x86, 0), MAX_RECV_DATA).is_err());
        // AHS lengths are bounded by construction.
        let mut b = bhs(OP_NOP_IN, 0x80, 0);
        b[4] = 255;
        assert_eq!(parse(&b, MAX_RECV_DATA).unwrap().ahs_len, 1020);
    }

    #[test]
    fn data_in_fields() {
        let mut b = bhs(OP_DATA_IN, 0x81, 512);
        b[3] = 0;
        put32(&mut b, 16, 7);
        put32(&mut b, 24, 100);
        put32(&mut b, 28, 5);
        put32(&mut b, 32, 36);
        put32(&mut b, 36, 2);
        put32(&mut b, 40, 1024);
        let h = parse(&b, MAX_RECV_DATA).unwrap();
        assert_eq!(
            h.pdu,
            TargetPdu::DataIn {
                itt: 7,
                final_: true,
                status: Some(0),
                sn: Sn {
                    statsn: 100,
                    expcmdsn: 5,
                    maxcmdsn: 36
                },
                datasn: 2,
                offset: 1024,
                residual: (false, false, 0),
            }
        );
    }

    #[test]
    fn encoders() {
        let c = ScsiCommand {
            read: true,
            write: false,
            lun: encode_lun(1),
            itt: 9,
            expected_len: 4096,
            cmdsn: 3,
            expstatsn: 4,
            cdb: [0x88; 16],
            data_len: 0,
            more_unsolicited: false,
        }
        .encode();
        assert_eq!(c[0], 0x01);
        assert_eq!(c[1], 0xc1);
        assert_eq!(&c[8..10], &[0, 1]);
        assert_eq!(be32(&c, 20), 4096);
        assert_eq!(encode_lun(300)[..2], [0x41, 44]);
        let l = LoginRequest {
            transit: true,
            csg: 1,
            nsg: 3,
            isid: [0x80, 1, 2, 3, 4, 5],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmdsn: 1,
            expstatsn: 0,
            data_len: 10,
        }
        .encode();
        assert_eq!((l[0], l[1]), (0x43, 0x87));
        assert_eq!(l[7], 10);
    }

    #[test]
    fn serial_numbers() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(0xffff_fff0, 3));
        assert!(!sn_lt(3, 0xffff_fff0));
        assert!(sn_le(5, 5));
    }

    #[test]
    fn sense() {
        let mut f = [0u8; 18];
        f[0] = 0x70;
        f[2] = 0x06;
        f[12] = 0x29;
        assert_eq!(parse_sense(&f), Some((6, 0x29, 0)));
        assert_eq!(parse_sense(&[0x72, 0x03, 0x11, 0x00]), Some((3, 0x11, 0)));
        assert_eq!(parse_sense(&[0x70]), None);
        assert_eq!(parse_sense(&[]), None);
        // A SenseLength larger than the segment is clipped.
        assert_eq!(response_sense(&[0xff, 0xff, 0x70, 0, 6]), &[0x70, 0, 6]);
        assert_eq!(response_sense(&[0]), &[] as &[u8]);
    }

    #[test]
    fn crc32c_digest() {
        // RFC 3720 B.4: 32 bytes of zeroes give 0x8a9136aa.
        assert_eq!(digest(&[&[0u8; 32]]), 0x8a91_36aau32.to_le_bytes());
        assert_eq!(digest(&[&[0u8; 16], &[0u8; 16]]), digest(&[&[0u8; 32]]));
    }
}
