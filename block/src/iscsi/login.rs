//! The iSCSI login: RFC 7143 §6 ("iSCSI Login": stages, the T/C bits
//! and CSG/NSG transitions, §6.2 the Login Phase start), §6.1 and §13 (text
//! keys: `key=value` pairs NUL-separated, §6.2 negotiation rules: the
//! "OR"/"AND"/minimum results), §12.1.3 (CHAP with MD5, RFC 1994) and
//! §11.13.5 (the Status-Class and Status-Detail of a failed login).
//!
//! A session starts in the security stage only when a user name is
//! given (CHAP); otherwise it starts in the operational stage, as RFC 7143
//! §6.3 allows when no security negotiation is wanted. The operational
//! stage offers what QEMU (libiscsi) offers and takes the target's answers.

use super::pdu::{self, PduError, TargetPdu, BHS_LEN};
use std::io::{Read, Write};

/// The largest text (all Login Response data, continuations included)
/// accepted in one login step: a target that sends more is refused.
const MAX_TEXT: usize = 64 * 1024;
/// At most this many PDUs in one login (continuations, extra rounds).
const MAX_ROUNDS: usize = 32;

/// What we offer (and the values that bound the results).
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    pub max_recv_data: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    /// The HeaderDigest values offered: an answer must be one of them
    /// (RFC 7143 §6.2 list negotiation).
    pub digest_none: bool,
    pub digest_crc32c: bool,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            max_recv_data: pdu::MAX_RECV_DATA,
            max_burst: 16 * 1024 * 1024 - 1024,
            first_burst: 256 * 1024,
            digest_none: true,
            digest_crc32c: true,
        }
    }
}

/// The session parameters negotiated in the operational stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// CRC32C header digests on every PDU after login.
    pub header_digest: bool,
    /// The target's MaxRecvDataSegmentLength: the most we send in a PDU.
    pub max_xmit_data: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
}

/// The result of a login.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub params: Params,
    pub tsih: u16,
    /// The next CmdSN, ExpStatSN and MaxCmdSN after login.
    pub cmdsn: u32,
    pub expstatsn: u32,
    pub maxcmdsn: u32,
}

/// Who logs in to what.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    pub initiator: String,
    pub target: String,
    pub user: Option<String>,
    pub password: Vec<u8>,
    /// The HeaderDigest offer ("None", "CRC32C", "CRC32C,None", ...).
    pub header_digest: String,
    pub isid: [u8; 6],
}

/// Why a login failed.
#[derive(Debug)]
pub enum LoginError {
    /// The connection broke: worth trying again.
    Io(std::io::Error),
    /// The target refused or broke the protocol (one line).
    Failed(String),
}

impl From<PduError> for LoginError {
    fn from(e: PduError) -> Self {
        LoginError::Failed(e.0)
    }
}

impl From<std::io::Error> for LoginError {
    fn from(e: std::io::Error) -> Self {
        LoginError::Io(e)
    }
}

/// Text keys (§6.1): `key=value` NUL-terminated, at most [`MAX_TEXT`]
/// bytes; keys of at most 63 bytes (§6.1), values of at most 8192.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, PduError> {
    if data.len() > MAX_TEXT {
        return Err(PduError(format!("{} bytes of login text", data.len())));
    }
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item)
            .map_err(|_| PduError("login text that is not UTF-8".into()))?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| PduError(format!("login text item without '=': {:.64}", s)))?;
        if k.is_empty() || k.len() > 63 || v.len() > 8192 {
            return Err(PduError(format!("bad login key '{:.64}'", k)));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encode keys as login text.
pub fn encode_text(kv: &[(&str, String)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in kv {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

fn get<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
    // The last value wins if a key repeats; answers that are not values
    // (§6.2: NotUnderstood, Irrelevant, Reject) leave the default.
    kv.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !matches!(*v, "NotUnderstood" | "Irrelevant" | "Reject"))
}

fn num(kv: &[(String, String)], key: &str, default: u32) -> Result<u32, PduError> {
    match get(kv, key) {
        None => Ok(default),
        Some(v) => v
            .parse::<u32>()
            .map_err(|_| PduError(format!("the target answered {key}={v:.32}"))),
    }
}

fn yes(kv: &[(String, String)], key: &str, default: bool) -> Result<bool, PduError> {
    match get(kv, key) {
        None => Ok(default),
        Some("Yes") => Ok(true),
        Some("No") => Ok(false),
        Some(v) => Err(PduError(format!("the target answered {key}={v:.32}"))),
    }
}

/// The keys of the operational stage that we send.
pub fn operational_keys(offer: Offer, header_digest: &str) -> Vec<(&'static str, String)> {
    vec![
        ("HeaderDigest", header_digest.to_string()),
        ("DataDigest", "None".into()),
        ("MaxRecvDataSegmentLength", offer.max_recv_data.to_string()),
        // We can send unsolicited data and immediate data: fewer round
        // trips per write when the target agrees.
        ("InitialR2T", "No".into()),
        ("ImmediateData", "Yes".into()),
        ("MaxBurstLength", offer.max_burst.to_string()),
        ("FirstBurstLength", offer.first_burst.to_string()),
        ("MaxOutstandingR2T", "1".into()),
        ("MaxConnections", "1".into()),
        ("DataPDUInOrder", "Yes".into()),
        ("DataSequenceInOrder", "Yes".into()),
        // Level 0: any error ends the connection and we log in again.
        ("ErrorRecoveryLevel", "0".into()),
        ("DefaultTime2Wait", "2".into()),
        ("DefaultTime2Retain", "0".into()),
    ]
}

/// The negotiated parameters from the target's operational answers
/// (RFC 7143 §13: InitialR2T is an OR, ImmediateData an AND, burst
/// lengths the minimum; absent keys keep the RFC's defaults).
pub fn negotiate_params(kv: &[(String, String)], offer: Offer) -> Result<Params, PduError> {
    let header_digest = match get(kv, "HeaderDigest") {
        None if offer.digest_none => false,
        Some("None") if offer.digest_none => false,
        Some("CRC32C") if offer.digest_crc32c => true,
        v => {
            return Err(PduError(format!(
                "the target answered HeaderDigest={:.32} to {}",
                v.unwrap_or("(nothing)"),
                if offer.digest_none { "None" } else { "CRC32C" }
            )))
        }
    };
    match get(kv, "DataDigest") {
        None | Some("None") => {}
        Some(v) => return Err(PduError(format!("the target answered DataDigest={v:.32}"))),
    }
    match get(kv, "ErrorRecoveryLevel") {
        None | Some("0") => {}
        Some(v) => {
            return Err(PduError(format!(
                "the target answered ErrorRecoveryLevel={v:.32}"
            )))
        }
    }
    // §13.12: 512 to 2^24-1; we never send more than we accept.
    let max_xmit_data = num(kv, "MaxRecvDataSegmentLength", 8192)?;
    if !(512..=0xff_ffff).contains(&max_xmit_data) {
        return Err(PduError(format!(
            "the target declared MaxRecvDataSegmentLength={max_xmit_data}"
        )));
    }
    let max_burst = num(kv, "MaxBurstLength", 262_144)?.min(offer.max_burst);
    let first_burst = num(kv, "FirstBurstLength", 65_536)?
        .min(offer.first_burst)
        .min(max_burst);
    if max_burst < 512 || first_burst < 512 {
        return Err(PduError(format!(
            "the target answered MaxBurstLength={max_burst}, FirstBurstLength={first_burst}"
        )));
    }
    Ok(Params {
        header_digest,
        max_xmit_data: max_xmit_data.min(offer.max_recv_data),
        max_burst,
        first_burst,
        initial_r2t: yes(kv, "InitialR2T", true)?,
        immediate_data: yes(kv, "ImmediateData", true)?,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        // §13.1: a hex constant may have an odd number of digits.
        return unhex(&format!("0{s}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A binary value (§6.1 "binary-value": `0x` hex or `0b` base64).
fn binary(v: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        unhex(h)
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64::engine::general_purpose::STANDARD.decode(b).ok()
    } else {
        None
    }
}

/// The CHAP answer (§12.1.3, RFC 1994 §4.1): from the target's CHAP_A,
/// CHAP_I and CHAP_C, the `CHAP_R` value MD5(identifier || secret ||
/// challenge), as `0x` hex.
pub fn chap_response(kv: &[(String, String)], secret: &[u8]) -> Result<String, String> {
    use md5::{Digest, Md5};
    match get(kv, "CHAP_A") {
        Some("5") => {}
        Some(a) => {
            return Err(format!(
                "the target chose CHAP algorithm {a:.16}, not MD5 (5)"
            ))
        }
        None => return Err("the target sent no CHAP_A".into()),
    }
    let id: u8 = get(kv, "CHAP_I")
        .and_then(|i| i.parse().ok())
        .ok_or("the target sent no valid CHAP_I")?;
    let challenge = get(kv, "CHAP_C")
        .and_then(binary)
        .filter(|c| !c.is_empty() && c.len() <= 1024)
        .ok_or("the target sent no valid CHAP_C")?;
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(&challenge);
    Ok(format!("0x{}", hex(&h.finalize())))
}

/// The meaning of a failed login's status (§11.13.5).
pub fn status_text(class: u8, detail: u8) -> String {
    let t = match (class, detail) {
        (1, _) => "the target moved (redirection is not supported)",
        (2, 0x01) => "authentication failed (check user= and password=)",
        (2, 0x02) => "authorization failure (the target does not allow this initiator)",
        (2, 0x03) => "target not found",
        (2, 0x04) => "target removed",
        (2, 0x05) => "unsupported iSCSI version",
        (2, 0x06) => "too many connections",
        (2, 0x07) => "missing parameter",
        (2, 0x08) => "cannot include the connection in the session",
        (2, 0x09) => "session type not supported",
        (2, 0x0a) => "session does not exist",
        (2, 0x0b) => "invalid request during login",
        (2, _) => "initiator error",
        (3, 0x01) => "service unavailable",
        (3, 0x02) => "out of resources",
        (3, _) => "target error",
        _ => "unknown status",
    };
    format!("{t} (status {class:#04x}{detail:02x})")
}

/// Write one PDU: header, data, padding (no digests during login).
pub fn write_pdu<W: Write>(w: &mut W, bhs: &[u8; BHS_LEN], data: &[u8]) -> std::io::Result<()> {
    let mut v = Vec::with_capacity(BHS_LEN + data.len() + 3);
    v.extend_from_slice(bhs);
    v.extend_from_slice(data);
    v.resize(v.len() + pdu::pad(data.len() as u32), 0);
    w.write_all(&v)
}

/// Read one login-phase PDU (no digests): header and bounded data.
fn read_pdu<R: Read>(r: &mut R) -> Result<(TargetPdu, Vec<u8>), LoginError> {
    let mut b = [0u8; BHS_LEN];
    r.read_exact(&mut b)?;
    let h = pdu::parse(&b, pdu::MAX_RECV_DATA)?;
    let mut skip = vec![0u8; h.ahs_len];
    r.read_exact(&mut skip)?;
    let mut data = vec![0u8; h.data_len as usize + pdu::pad(h.data_len)];
    r.read_exact(&mut data)?;
    data.truncate(h.data_len as usize);
    Ok((h.pdu, data))
}

struct Exchange<'a, S> {
    s: &'a mut S,
    cfg: &'a LoginConfig,
    cmdsn: u32,
    expstatsn: u32,
    tsih: u16,
    first: bool,
}

/// What one login step answered.
struct Answer {
    transit: bool,
    nsg: u8,
    keys: Vec<(String, String)>,
    sn: pdu::Sn,
}

impl<S: Read + Write> Exchange<'_, S> {
    /// Send keys in stage `csg`, asking to move to `nsg` if `transit`;
    /// gather the response text, continuations included.
    fn step(
        &mut self,
        csg: u8,
        nsg: u8,
        transit: bool,
        keys: &[(&str, String)],
    ) -> Result<Answer, LoginError> {
        let mut all: Vec<(&str, String)> = Vec::new();
        if self.first {
            // §6.2: the first Login Request carries these.
            all.push(("InitiatorName", self.cfg.initiator.clone()));
            all.push(("SessionType", "Normal".into()));
            all.push(("TargetName", self.cfg.target.clone()));
            self.first = false;
        }
        all.extend(keys.iter().cloned());
        let mut text = encode_text(&all);
        let mut got = Vec::new();
        for _ in 0..MAX_ROUNDS {
            let req = pdu::LoginRequest {
                transit,
                csg,
                nsg: if transit { nsg } else { 0 },
                isid: self.cfg.isid,
                tsih: self.tsih,
                itt: 0,
                cid: 0,
                cmdsn: self.cmdsn,
                expstatsn: self.expstatsn,
                data_len: text.len() as u32,
            };
            write_pdu(self.s, &req.encode(), &text)?;
            text.clear();
            let (p, data) = read_pdu(self.s)?;
            let TargetPdu::LoginResponse {
                transit: t,
                cont,
                csg: rcsg,
                nsg: rnsg,
                tsih,
                sn,
                class,
                detail,
                version_active,
                ..
            } = p
            else {
                return Err(LoginError::Failed(format!(
                    "unexpected PDU during login: {p:?}"
                )));
            };
            if class != 0 {
                return Err(LoginError::Failed(status_text(class, detail)));
            }
            if version_active != 0 || rcsg != csg {
                return Err(LoginError::Failed(format!(
                    "bad Login Response (version {version_active}, stage {rcsg} for {csg})"
                )));
            }
            self.expstatsn = sn.statsn.wrapping_add(1);
            self.tsih = tsih;
            if got.len() + data.len() > MAX_TEXT {
                return Err(LoginError::Failed("too much login text".into()));
            }
            got.extend_from_slice(&data);
            if cont {
                // §6.5 text continuation: ask for the rest.
                continue;
            }
            return Ok(Answer {
                transit: t,
                nsg: rnsg,
                keys: parse_text(&got)?,
                sn,
            });
        }
        Err(LoginError::Failed("the login does not end".into()))
    }
}

const SECURITY: u8 = 0;
const OPERATIONAL: u8 = 1;
const FULL_FEATURE: u8 = 3;

/// Log in on the connected stream `s`; `cmdsn` is the session's CmdSN
/// (a new session may start anywhere).
pub fn login<S: Read + Write>(
    s: &mut S,
    cfg: &LoginConfig,
    offer: Offer,
    cmdsn: u32,
) -> Result<Session, LoginError> {
    let mut x = Exchange {
        s,
        cfg,
        cmdsn,
        expstatsn: 0,
        tsih: 0,
        first: true,
    };
    if let Some(user) = &cfg.user {
        let a = x.step(
            SECURITY,
            OPERATIONAL,
            false,
            &[("AuthMethod", "CHAP".into())],
        )?;
        match get(&a.keys, "AuthMethod") {
            Some("CHAP") => {}
            other => {
                return Err(LoginError::Failed(format!(
                    "the target does not accept CHAP authentication (AuthMethod={})",
                    other.unwrap_or("")
                )))
            }
        }
        let a = x.step(SECURITY, OPERATIONAL, false, &[("CHAP_A", "5".into())])?;
        let r = chap_response(&a.keys, &cfg.password).map_err(LoginError::Failed)?;
        let mut a = x.step(
            SECURITY,
            OPERATIONAL,
            true,
            &[("CHAP_N", user.clone()), ("CHAP_R", r)],
        )?;
        // A target that wants more rounds in the security stage (mutual
        // CHAP, which we do not ask for) is answered with nothing.
        let mut n = 0;
        while !a.transit {
            n += 1;
            if n > MAX_ROUNDS {
                return Err(LoginError::Failed("the security stage does not end".into()));
            }
            a = x.step(SECURITY, OPERATIONAL, true, &[])?;
        }
        if a.nsg != OPERATIONAL {
            return Err(LoginError::Failed(format!(
                "the target moved to login stage {} after CHAP",
                a.nsg
            )));
        }
    }
    let offer = Offer {
        digest_none: cfg.header_digest.contains("None"),
        digest_crc32c: cfg.header_digest.contains("CRC32C"),
        ..offer
    };
    let keys = operational_keys(offer, &cfg.header_digest);
    let mut a = x.step(OPERATIONAL, FULL_FEATURE, true, &keys)?;
    let mut answers = a.keys.clone();
    let mut n = 0;
    while !(a.transit && a.nsg == FULL_FEATURE) {
        n += 1;
        if n > MAX_ROUNDS {
            return Err(LoginError::Failed(
                "the operational stage does not end".into(),
            ));
        }
        a = x.step(OPERATIONAL, FULL_FEATURE, true, &[])?;
        answers.extend(a.keys.iter().cloned());
    }
    if answers
        .iter()
        .any(|(k, _)| k == "AuthMethod" || k.starts_with("CHAP_"))
    {
        return Err(LoginError::Failed(
            "the target asks for authentication (set user= and password=)".into(),
        ));
    }
    let params = negotiate_params(&answers, offer)?;
    Ok(Session {
        params,
        tsih: x.tsih,
        cmdsn: a.sn.expcmdsn,
        expstatsn: x.expstatsn,
        maxcmdsn: a.sn.maxcmdsn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn text() {
        let t = encode_text(&[("A", "1".into()), ("B", "x=y".into())]);
        assert_eq!(t, b"A=1\0B=x=y\0");
        assert_eq!(parse_text(&t).unwrap(), kv(&[("A", "1"), ("B", "x=y")]));
        assert!(parse_text(b"novalue\0").is_err());
        assert!(parse_text(b"=v\0").is_err());
        assert!(parse_text(&[0xff, b'=', 0]).is_err());
        assert!(parse_text(&vec![b'a'; MAX_TEXT + 1]).is_err());
        assert_eq!(parse_text(b"\0\0").unwrap(), vec![]);
    }

    #[test]
    fn negotiation() {
        let o = Offer::default();
        let p = negotiate_params(&[], o).unwrap();
        assert_eq!(
            p,
            Params {
                header_digest: false,
                max_xmit_data: 8192,
                max_burst: 262_144,
                first_burst: 65_536,
                initial_r2t: true,
                immediate_data: true,
            }
        );
        let p = negotiate_params(
            &kv(&[
                ("HeaderDigest", "CRC32C"),
                ("MaxRecvDataSegmentLength", "1048576"),
                ("InitialR2T", "No"),
                ("ImmediateData", "No"),
                ("FirstBurstLength", "999999999"),
                ("MaxBurstLength", "NotUnderstood"),
            ]),
            o,
        )
        .unwrap();
        assert!(p.header_digest && !p.initial_r2t && !p.immediate_data);
        assert_eq!(p.max_xmit_data, pdu::MAX_RECV_DATA);
        assert_eq!(p.first_burst, 262_144);
        // An answer outside the offered list.
        let strict = Offer {
            digest_none: false,
            ..o
        };
        assert!(negotiate_params(&kv(&[("HeaderDigest", "None")]), strict).is_err());
        assert!(negotiate_params(&[], strict).is_err());
        let p = negotiate_params(&kv(&[("HeaderDigest", "CRC32C")]), strict).unwrap();
        assert!(p.header_digest);
        for bad in [
            ("HeaderDigest", "MD5"),
            ("DataDigest", "CRC32C"),
            ("ErrorRecoveryLevel", "2"),
            ("MaxRecvDataSegmentLength", "12"),
            ("MaxRecvDataSegmentLength", "x"),
            ("InitialR2T", "Maybe"),
            ("MaxBurstLength", "0"),
        ] {
            assert!(negotiate_params(&kv(&[bad]), o).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chap() {
        // RFC 1994 answer computed independently (md5 of 0x01 "secret"
        // 0x0102...).
        let k = kv(&[("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0x0102")]);
        let r = chap_response(&k, b"secret").unwrap();
        use md5::{Digest, Md5};
        let want = Md5::digest([1u8, b's', b'e', b'c', b'r', b'e', b't', 1, 2]);
        assert_eq!(r, format!("0x{}", hex(&want)));
        let k = kv(&[("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0bAQI=")]);
        assert_eq!(chap_response(&k, b"secret").unwrap(), r);
        for bad in [
            kv(&[("CHAP_A", "7"), ("CHAP_I", "1"), ("CHAP_C", "0x01")]),
            kv(&[("CHAP_A", "5"), ("CHAP_I", "256"), ("CHAP_C", "0x01")]),
            kv(&[("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0xzz")]),
            kv(&[("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "12")]),
            kv(&[("CHAP_A", "5"), ("CHAP_I", "1")]),
        ] {
            assert!(chap_response(&bad, b"s").is_err(), "{bad:?}");
        }
    }
}
