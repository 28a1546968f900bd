//! Network storage URIs (`ssh://`, `nfs://`) as QEMU's `util/uri.c`
//! splits them (RFC 3986 generic syntax): `SCHEME://[USER@]HOST[:PORT]/PATH[?QUERY]`.
//!
//! Only what the protocol drivers need: the host is a registered name, an
//! IPv4 address or a bracketed IPv6 literal; user, host and path are
//! percent-decoded; the query is `NAME=VALUE` pairs separated by `&` (or
//! `;`, as QEMU's `query_params_parse` accepts). A password in the user
//! part and fragments are refused rather than silently dropped, since
//! neither driver could use them. Nothing is allocated beyond the size of
//! the input.

/// A parsed network URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetUri {
    /// The scheme, as written before `://`.
    pub scheme: String,
    /// The decoded user name, if the URI has `USER@`.
    pub user: Option<String>,
    /// The decoded host (an IPv6 literal without its brackets).
    pub host: String,
    /// The port, if given.
    pub port: Option<u16>,
    /// The decoded path, with its leading `/` (empty if none).
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
}

/// Decode `%XX` escapes; the result must be UTF-8.
pub fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let v = s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in '{s}'"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' does not decode to UTF-8"))
}

/// Split `name` as a `scheme://` URI. Errors say what is wrong with the
/// URI, which they quote.
pub fn parse(name: &str, scheme: &str) -> Result<NetUri, String> {
    let rest = name
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
        .ok_or_else(|| format!("{name}: URI scheme must be '{scheme}'"))?;
    if rest.contains('#') {
        return Err(format!(
            "{name}: a fragment ('#') is not allowed in the URI"
        ));
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (user, hostport) = match auth.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, auth),
    };
    let user = match user {
        Some(u) if u.contains(':') => {
            return Err(format!("{name}: a password in the URI is not supported"))
        }
        Some(u) => Some(percent_decode(u).map_err(|e| format!("{name}: user: {e}"))?),
        None => None,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| format!("{name}: unterminated '[' in the host"))?;
        if h.is_empty()
            || !h
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return Err(format!("{name}: '[{h}]' is not an IPv6 address"));
        }
        match tail.strip_prefix(':') {
            Some(p) => (h.to_string(), Some(p)),
            None if tail.is_empty() => (h.to_string(), None),
            None => return Err(format!("{name}: unexpected '{tail}' after the host")),
        }
    } else {
        let (h, p) = match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        };
        let h = percent_decode(h).map_err(|e| format!("{name}: host: {e}"))?;
        if h.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(format!("{name}: invalid host '{h}'"));
        }
        (h, p)
    };
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&v| v != 0 && p.bytes().all(|c| c.is_ascii_digit()))
                .ok_or_else(|| format!("{name}: invalid port '{p}'"))?,
        ),
    };
    let path = percent_decode(path).map_err(|e| format!("{name}: path: {e}"))?;
    let mut params = Vec::new();
    for pair in query.unwrap_or("").split(['&', ';']) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k).map_err(|e| format!("{name}: query: {e}"))?;
        let v = percent_decode(v).map_err(|e| format!("{name}: query: {e}"))?;
        params.push((k, v));
    }
    Ok(NetUri {
        scheme: scheme.to_string(),
        user,
        host,
        port,
        path,
        query: params,
    })
}

/// The `net_uri` fuzz target: `data` as a file name through the URI
/// splitter and each network driver's file name parser and option
/// checks (nothing connects). Properties: no input panics; a parsed
/// path is empty or absolute; a port is never 0.
pub fn fuzz_uri(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for scheme in ["ssh", "nfs"] {
        let name = if text.contains("://") {
            text.to_string()
        } else {
            format!("{scheme}://{text}")
        };
        if let Ok(u) = parse(&name, scheme) {
            assert!(u.path.is_empty() || u.path.starts_with('/'));
            assert_ne!(u.port, Some(0));
        }
    }
    let name = if text.starts_with("ssh://") {
        text.to_string()
    } else {
        format!("ssh://{text}")
    };
    if let Ok(m) = crate::ssh::uri_options(&name) {
        let mut o = crate::keyval::Options::new("file", m);
        let _ = o.take_str("driver");
        if crate::ssh::parse_options(&mut o).is_ok() {
            assert!(o.finish().is_ok(), "{name}: options left over");
        }
    }
    let name = if text.starts_with("nfs://") {
        text.to_string()
    } else {
        format!("nfs://{text}")
    };
    if let Ok(m) = crate::nfs::uri_options(&name) {
        let mut o = crate::keyval::Options::new("file", m);
        let _ = o.take_str("driver");
        if crate::nfs::parse_options(&mut o).is_ok() {
            assert!(o.finish().is_ok(), "{name}: options left over");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_form() {
        let u = parse(
            "ssh://bob@example.org:2222/var/img%20a.qcow2?host_key_check=no",
            "ssh",
        )
        .unwrap();
        assert_eq!(u.user.as_deref(), Some("bob"));
        assert_eq!(u.host, "example.org");
        assert_eq!(u.port, Some(2222));
        assert_eq!(u.path, "/var/img a.qcow2");
        assert_eq!(u.query, vec![("host_key_check".into(), "no".into())]);
    }

    #[test]
    fn minimal_and_v6() {
        let u = parse("nfs://srv/export/x", "nfs").unwrap();
        assert_eq!((u.user, u.port, u.path.as_str()), (None, None, "/export/x"));
        let u = parse("nfs://[::1]:2049/e?uid=0&gid=0;debug=2", "nfs").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.port, Some(2049));
        assert_eq!(u.query.len(), 3);
        let u = parse("ssh://h:/p", "ssh").unwrap();
        assert_eq!(u.port, None);
        let u = parse("ssh://h", "ssh").unwrap();
        assert_eq!(u.path, "");
    }

    #[test]
    fn refused() {
        for bad in [
            "ssh:/h/p",
            "nfs://h/p",
            "ssh://a:b@h/p",
            "ssh://h:0/p",
            "ssh://h:65536/p",
            "ssh://h:+22/p",
            "ssh://h:x/p",
            "ssh://[::1/p",
            "ssh://[::1]x/p",
            "ssh://[zz]/p",
            "ssh://h/p%2",
            "ssh://h/p%zz",
            "ssh://h/p%ff",
            "ssh://h/p#frag",
            "ssh://h%20x/p",
        ] {
            assert!(parse(bad, "ssh").is_err(), "{bad}");
        }
    }
}
