//! A real web server on loopback for the `http`/`https` driver tests:
//! `tests/servers/http_range.py` (Python's http.server with byte ranges,
//! optionally over TLS with a throwaway certificate for 127.0.0.1).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A throwaway self-signed certificate for 127.0.0.1 (also its CA),
/// made in `root/../tls-NAME`, outside what is served: (cert, key).
pub fn self_signed(root: &Path) -> (PathBuf, PathBuf) {
    let dir = root.parent().unwrap().join(format!(
        "tls-{}",
        root.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));

    let st = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("run openssl (Debian package openssl; make test installs it)");
    assert!(st.success(), "openssl req failed");
    (cert, key)
}

/// A running server; killed on drop.
pub struct WebServer {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// Its certificate, when it speaks TLS (also the CA that signs it).
    pub cert: Option<PathBuf>,
}

impl WebServer {
    /// Serve `root` over HTTP, with the script's `extra` options.
    pub fn http(root: &Path, extra: &[&str]) -> WebServer {
        Self::start(root, extra, None)
    }

    /// Serve `root` over HTTPS with a self-signed certificate made in
    /// `root/../tls-<n>` (outside what is served).
    pub fn https(root: &Path, extra: &[&str]) -> WebServer {
        let (cert, key) = self_signed(root);
        Self::start(root, extra, Some((cert, key)))
    }

    fn start(root: &Path, extra: &[&str], tls: Option<(PathBuf, PathBuf)>) -> WebServer {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/servers/http_range.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).arg(root).args(extra);
        if let Some((cert, key)) = &tls {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tests/servers/http_range.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("http_range.py did not start: {line:?}"));
        WebServer {
            child,
            port,
            cert: tls.map(|(c, _)| c),
        }
    }

    /// The URL of `name` under the served directory.
    pub fn url(&self, name: &str) -> String {
        let scheme = if self.cert.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running FTP server (tests/servers/ftp.py, pyftpdlib) with one user;
/// killed on drop.
pub struct FtpServer {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
}

impl FtpServer {
    /// Serve `root` read-only to `user` with `password`.
    pub fn start(root: &Path, user: &str, password: &str) -> FtpServer {
        Self::run("ftp.py", root, &[user, password])
    }

    /// The same over implicit TLS (`ftps://`) with `cert` and `key`.
    pub fn start_tls(
        root: &Path,
        user: &str,
        password: &str,
        cert: &Path,
        key: &Path,
    ) -> FtpServer {
        Self::run(
            "ftps.py",
            root,
            &[
                user,
                password,
                cert.to_str().unwrap(),
                key.to_str().unwrap(),
            ],
        )
    }

    fn run(script: &str, root: &Path, args: &[&str]) -> FtpServer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let python = dir.join("target/qmp-venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: `make deps` makes it (with pyftpdlib)",
            python.display()
        );
        let mut child = Command::new(python)
            .arg(dir.join("tests/servers").join(script))
            .arg(root)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start an FTP server of tests/servers");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!("ftp.py did not start (pyftpdlib missing? `make deps`): {line:?}")
            });
        FtpServer { child, port }
    }
}

impl Drop for FtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
