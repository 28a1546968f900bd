//! iSCSI file names: `iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN`,
//! the URI form QEMU (libiscsi's `iscsi_parse_full_url`) accepts, with
//! the port defaulting to 3260 (RFC 7143 §13.2 "well-known port"; IPv6
//! hosts in brackets, RFC 3986). The user and password are percent-decoded.

/// The iSCSI well-known port.
pub const DEFAULT_PORT: u16 = 3260;

/// A parsed `iscsi://` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiUri {
    pub user: Option<String>,
    pub password: Option<String>,
    /// `HOST:PORT` (IPv6 hosts keep their brackets), the `portal` option.
    pub portal: String,
    pub target: String,
    pub lun: u16,
}

fn percent_decode(s: &str, name: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let v = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{name}: bad percent escape"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{name}: not UTF-8"))
}

/// True if `name` is meant as an iSCSI file name.
pub fn is_iscsi(name: &str) -> bool {
    name.starts_with("iscsi://")
}

/// Split a `HOST[:PORT]` portal into a host (brackets removed) and port.
pub fn split_portal(portal: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = portal.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| format!("portal '{portal}': unterminated '['"))?;
        match tail.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if tail.is_empty() => (h, None),
            None => return Err(format!("portal '{portal}': bad host")),
        }
    } else {
        match portal.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (portal, None),
        }
    };
    if host.is_empty() {
        return Err(format!("portal '{portal}': no host"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("portal '{portal}': invalid port '{p}'"))?,
    };
    Ok((host.to_string(), port))
}

/// Parse an `iscsi://` URI.
pub fn parse(name: &str) -> Result<IscsiUri, String> {
    let rest = name
        .strip_prefix("iscsi://")
        .ok_or_else(|| format!("{name}: not an iscsi:// URI"))?;
    let (auth, path) = rest.split_once('/').ok_or_else(|| {
        format!("{name}: expected iscsi://[user[%password]@]host[:port]/target-iqn/lun")
    })?;
    if path.contains('?') || path.contains('#') {
        return Err(format!("{name}: an iSCSI URI takes no query"));
    }
    let (userinfo, hostport) = match auth.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, auth),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            // libiscsi's form: USER%PASSWORD (the '%' that does not start
            // an escape separates them), or RFC 3986's USER:PASSWORD.
            let (user, pass) = match u.split_once(':') {
                Some((a, b)) => (a, Some(b)),
                None => match u.find('%').filter(|&i| {
                    u.get(i + 1..i + 3)
                        .is_none_or(|h| u8::from_str_radix(h, 16).is_err())
                }) {
                    Some(i) => (&u[..i], Some(&u[i + 1..])),
                    None => (u, None),
                },
            };
            if user.is_empty() {
                return Err(format!("{name}: empty user name"));
            }
            (
                Some(percent_decode(user, name)?),
                pass.map(|p| percent_decode(p, name)).transpose()?,
            )
        }
    };
    let (host, port) = split_portal(hostport).map_err(|e| format!("{name}: {e}"))?;
    let portal = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let (target, lun) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("{name}: missing the LUN (iscsi://host/target-iqn/lun)"))?;
    if target.is_empty() {
        return Err(format!("{name}: missing the target name"));
    }
    let lun = lun
        .parse::<u16>()
        .ok()
        .filter(|&l| l < 16384)
        .ok_or_else(|| format!("{name}: invalid LUN '{lun}'"))?;
    Ok(IscsiUri {
        user,
        password,
        portal,
        target: percent_decode(target, name)?,
        lun,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let u = parse("iscsi://127.0.0.1/iqn.2024-01.test:t1/1").unwrap();
        assert_eq!(
            u,
            IscsiUri {
                user: None,
                password: None,
                portal: "127.0.0.1:3260".into(),
                target: "iqn.2024-01.test:t1".into(),
                lun: 1,
            }
        );
        let u = parse("iscsi://bob%secret@host:3261/iqn.x:y/0").unwrap();
        assert_eq!(u.user.as_deref(), Some("bob"));
        assert_eq!(u.password.as_deref(), Some("secret"));
        assert_eq!(u.portal, "host:3261");
        let u = parse("iscsi://bob:p%40ss@[::1]:99/t/3").unwrap();
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.portal, "[::1]:99");
        let u = parse("iscsi://bob@h/t/3").unwrap();
        assert_eq!((u.user.as_deref(), u.password), (Some("bob"), None));
        for bad in [
            "iscsi://",
            "iscsi://h",
            "iscsi://h/t",
            "iscsi://h/t/x",
            "iscsi://h/t/70000",
            "iscsi://h:0/t/1",
            "iscsi://h/t/1?x=y",
            "iscsi://@h/t/1",
            "iscsi:///t/1",
            "iscsi://[::1/t/1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
