//! User-creatable objects (`-object` / `--object`) that the block layer
//! uses, shared by `strata`, `strata-img` and `strata-nbd`: `secret` and
//! `tls-creds-x509` (QEMU's QOM types of those names, same properties).
//!
//! [`parse`] turns the option text into an [`ObjectSpec`] without touching
//! any file; [`add`] creates the object (reads the secret, loads and checks
//! the certificates) and registers it by id. Like QEMU's objects, they live
//! for the whole process and are found by id: `tls-creds=ID` on an `nbd`
//! node, `--tls-creds=ID` on strata-nbd, `passwordid=ID`.

use crate::keyval;
use crate::nbd::tls::{Endpoint, X509Creds};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// A parsed, not yet created, object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectSpec {
    /// `secret,id=ID,data=TEXT|file=PATH[,format=raw|base64]`.
    Secret {
        /// Id.
        id: String,
        /// Where the value comes from.
        source: SecretSource,
        /// The value is base64 text.
        base64: bool,
    },
    /// `tls-creds-x509,id=ID,dir=DIR[,endpoint=client|server]
    /// [,verify-peer=on|off][,passwordid=SECRET]`.
    TlsCredsX509 {
        /// Id.
        id: String,
        /// The directory of PEM files.
        dir: PathBuf,
        /// Client or server.
        endpoint: Endpoint,
        /// Check the peer's certificate (default on).
        verify_peer: bool,
        /// The secret that decrypts the private key.
        passwordid: Option<String>,
    },
    /// `iothread,id=ID`: the binaries handle it themselves.
    IoThread {
        /// Id.
        id: String,
    },
}

/// A secret's value: inline or in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `data=`.
    Data(String),
    /// `file=`.
    File(PathBuf),
}

impl ObjectSpec {
    /// The object's id.
    pub fn id(&self) -> &str {
        match self {
            ObjectSpec::Secret { id, .. }
            | ObjectSpec::TlsCredsX509 { id, .. }
            | ObjectSpec::IoThread { id } => id,
        }
    }
}

/// Parse the text of `opt` (`-object`, `--object`). Errors are one line
/// naming the option and what is wrong.
pub fn parse(opt: &str, text: &str) -> Result<ObjectSpec, String> {
    let pairs = keyval::Parser::new(opt)
        .implied_key("qom-type")
        .parse_flat(text)
        .map_err(|e| e.to_string())?;
    let mut props: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in pairs {
        props.insert(k, v);
    }
    let bad = |m: String| format!("{opt} {text}: {m}");
    let ty = props.remove("qom-type").unwrap_or_default();
    let id = props
        .remove("id")
        .filter(|i| !i.is_empty())
        .ok_or_else(|| bad("Parameter 'id' is missing".into()))?;
    let mut take = |k: &str| props.remove(k);
    let boolean = |k: &str, v: Option<String>, default: bool| -> Result<bool, String> {
        match v {
            None => Ok(default),
            Some(v) => keyval::parse_bool_str(&v)
                .ok_or_else(|| bad(format!("{k}={v}: expected on or off"))),
        }
    };
    let spec = match ty.as_str() {
        "secret" => {
            let source = match (take("data"), take("file")) {
                (Some(d), None) => SecretSource::Data(d),
                (None, Some(f)) => SecretSource::File(PathBuf::from(f)),
                (Some(_), Some(_)) => return Err(bad("data= and file= are exclusive".into())),
                (None, None) => return Err(bad("either data= or file= is required".into())),
            };
            let base64 = match take("format").as_deref() {
                None | Some("raw") => false,
                Some("base64") => true,
                Some(f) => return Err(bad(format!("format={f}: expected raw or base64"))),
            };
            if take("keyid").is_some() || take("iv").is_some() {
                return Err(bad(
                    "secrets encrypted with keyid=/iv= are not supported".into()
                ));
            }
            ObjectSpec::Secret { id, source, base64 }
        }
        "tls-creds-x509" => {
            let dir = take("dir").ok_or_else(|| bad("dir= is required".into()))?;
            let endpoint = match take("endpoint").as_deref() {
                None | Some("client") => Endpoint::Client,
                Some("server") => Endpoint::Server,
                Some(e) => return Err(bad(format!("endpoint={e}: expected client or server"))),
            };
            let verify_peer = boolean("verify-peer", take("verify-peer"), true)?;
            let passwordid = take("passwordid");
            // QEMU's certificate sanity check: rustls checks the
            // certificates when they are used, either way.
            boolean("sanity-check", take("sanity-check"), true)?;
            for k in ["priority", "loaded"] {
                if take(k).is_some() {
                    return Err(bad(format!("{k}= is not supported")));
                }
            }
            ObjectSpec::TlsCredsX509 {
                id,
                dir: PathBuf::from(dir),
                endpoint,
                verify_peer,
                passwordid,
            }
        }
        "iothread" => {
            for k in ["poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"] {
                take(k);
            }
            ObjectSpec::IoThread { id }
        }
        "" => return Err(bad("Parameter 'qom-type' is missing".into())),
        t => return Err(bad(format!("unsupported object type '{t}'"))),
    };
    if let Some(k) = props.keys().next() {
        return Err(bad(format!("Property '{k}' not found")));
    }
    Ok(spec)
}

/// A created object.
#[derive(Debug, Clone)]
pub enum Object {
    /// A secret's bytes.
    Secret(Arc<Vec<u8>>),
    /// Loaded x509 credentials.
    TlsCredsX509(Arc<X509Creds>),
    /// An iothread (only reserved here, run by the machine).
    IoThread,
}

fn registry() -> MutexGuard<'static, BTreeMap<String, Object>> {
    static R: Mutex<BTreeMap<String, Object>> = Mutex::new(BTreeMap::new());
    R.lock().unwrap_or_else(|e| e.into_inner())
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let t: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(t).ok()
}

/// Create the object `spec` and register it. Errors name the object and
/// what is wrong in one line.
pub fn add(spec: &ObjectSpec) -> Result<(), String> {
    let id = spec.id().to_string();
    if registry().contains_key(&id) {
        return Err(format!(
            "object '{id}': an object with this id already exists"
        ));
    }
    let obj = match spec {
        ObjectSpec::Secret { source, base64, .. } => {
            let raw = match source {
                SecretSource::Data(d) => d.as_bytes().to_vec(),
                SecretSource::File(p) => std::fs::read(p)
                    .map_err(|e| format!("secret '{id}': cannot read '{}': {e}", p.display()))?,
            };
            let bytes = if *base64 {
                decode_base64(&String::from_utf8_lossy(&raw))
                    .ok_or_else(|| format!("secret '{id}': the data is not valid base64"))?
            } else {
                raw
            };
            Object::Secret(Arc::new(bytes))
        }
        ObjectSpec::TlsCredsX509 {
            dir,
            endpoint,
            verify_peer,
            passwordid,
            ..
        } => {
            let password = match passwordid {
                Some(p) => {
                    Some(secret(p).map_err(|e| format!("tls-creds-x509 '{id}': passwordid: {e}"))?)
                }
                None => None,
            };
            let creds = X509Creds::load(
                &id,
                dir,
                *endpoint,
                *verify_peer,
                password.as_deref().map(|v| &v[..]),
            )
            .map_err(|e| format!("tls-creds-x509 '{id}': {e}"))?;
            Object::TlsCredsX509(Arc::new(creds))
        }
        ObjectSpec::IoThread { .. } => Object::IoThread,
    };
    // Checked again: another thread may have added the id meanwhile.
    let mut r = registry();
    if r.contains_key(&id) {
        return Err(format!(
            "object '{id}': an object with this id already exists"
        ));
    }
    r.insert(id, obj);
    Ok(())
}

/// Parse and create in one step (the `--object` of the tools).
pub fn add_str(opt: &str, text: &str) -> Result<ObjectSpec, String> {
    let spec = parse(opt, text)?;
    add(&spec)?;
    Ok(spec)
}

/// The value of secret `id`.
pub fn secret(id: &str) -> Result<Arc<Vec<u8>>, String> {
    match registry().get(id) {
        Some(Object::Secret(s)) => Ok(s.clone()),
        Some(_) => Err(format!("object '{id}' is not a secret")),
        None => Err(format!("no secret with id '{id}'")),
    }
}

/// The TLS credentials `id`, which must be for `endpoint`.
pub fn tls_creds(id: &str, endpoint: Endpoint) -> Result<Arc<X509Creds>, String> {
    let c = match registry().get(id) {
        Some(Object::TlsCredsX509(c)) => c.clone(),
        Some(_) => return Err(format!("object '{id}' is not TLS credentials")),
        None => {
            return Err(format!(
                "no TLS credentials with id '{id}' (add --object tls-creds-x509,id={id},...)"
            ))
        }
    };
    if c.endpoint != endpoint {
        let want = match endpoint {
            Endpoint::Client => "client",
            Endpoint::Server => "server",
        };
        return Err(format!(
            "TLS credentials '{id}' are not for a {want} (use endpoint={want})"
        ));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        assert_eq!(
            parse("-object", "secret,id=s0,data=abc").unwrap(),
            ObjectSpec::Secret {
                id: "s0".into(),
                source: SecretSource::Data("abc".into()),
                base64: false
            }
        );
        assert_eq!(
            parse(
                "--object",
                "tls-creds-x509,id=t,dir=/d,endpoint=server,verify-peer=off"
            )
            .unwrap(),
            ObjectSpec::TlsCredsX509 {
                id: "t".into(),
                dir: "/d".into(),
                endpoint: Endpoint::Server,
                verify_peer: false,
                passwordid: None
            }
        );
        for bad in [
            "secret,data=x",
            "secret,id=a",
            "secret,id=a,data=x,file=y",
            "secret,id=a,data=x,format=hex",
            "tls-creds-x509,id=t",
            "tls-creds-x509,id=t,dir=/d,endpoint=both",
            "tls-creds-x509,id=t,dir=/d,verify-peer=maybe",
            "tls-creds-x509,id=t,dir=/d,bogus=1",
            "tls-creds-psk,id=t,dir=/d",
        ] {
            let e = parse("--object", bad).unwrap_err();
            assert!(e.starts_with("--object "), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn secrets() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert!(decode_base64("a$==").is_none());
        add_str("--object", "secret,id=objtest-s,data=aGk=,format=base64").unwrap();
        assert_eq!(&**secret("objtest-s").unwrap(), b"hi");
        assert!(add_str("--object", "secret,id=objtest-s,data=x").is_err());
        assert!(tls_creds("objtest-s", Endpoint::Client).is_err());
        let e = add_str(
            "--object",
            "tls-creds-x509,id=objtest-t,dir=/nonexistent,endpoint=server",
        )
        .unwrap_err();
        assert!(e.contains("server-cert.pem"), "{e}");
    }
}
