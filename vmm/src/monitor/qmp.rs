//! A QMP session on one connection (QEMU's docs/interop/qmp-spec.rst):
//! the greeting, capabilities negotiation, then requests answered in
//! order, with events in between.
//!
//! Input is untrusted bytes. [`Framer`] splits the stream into top-level
//! JSON texts by tracking strings and nesting, so one malformed message is
//! answered with an error and the next one is read normally (serde_json's
//! own stream reader cannot recover after an error). A message is limited
//! in size and nesting; what exceeds the limits is dropped up to the next
//! line end.

use std::io::{Read, Write};
use std::sync::{mpsc, Arc};

use serde_json::{Map, Value};

use super::command::{self, Command, ErrorClass, QmpError};
use super::event::{Events, Out};
use super::Request;
use crate::console::Stream;
use crate::{EventSender, VmEvent};

/// Largest message accepted (QEMU allows 64 MiB tokens; no command needs
/// more than a few KiB).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest nesting accepted (QEMU's limit).
pub const MAX_NESTING: usize = 1024;

/// Splits a byte stream into JSON texts.
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
    depth: usize,
    /// The quote that opened the string being read (QEMU also accepts
    /// single-quoted strings, which its own tests use), or 0.
    quote: u8,
    escape: bool,
    /// Dropping input up to the next newline after an oversized message.
    skipping: bool,
}

/// One framed item.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Text(Vec<u8>),
    /// The input broke a limit; the message was dropped.
    TooBig,
}

impl Framer {
    /// Feeds bytes; returns the complete texts they finish.
    pub fn push(&mut self, data: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        for &b in data {
            if self.skipping {
                if b == b'\n' {
                    self.skipping = false;
                }
                continue;
            }
            if self.quote != 0 {
                self.buf.push(b);
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == self.quote {
                    self.quote = 0;
                }
            } else {
                match b {
                    b'"' | b'\'' => {
                        self.quote = b;
                        self.buf.push(b);
                    }
                    b'{' | b'[' => {
                        self.depth += 1;
                        self.buf.push(b);
                    }
                    b'}' | b']' => {
                        self.buf.push(b);
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            out.push(Frame::Text(std::mem::take(&mut self.buf)));
                        }
                    }
                    b' ' | b'\t' | b'\r' | b'\n' => {
                        if self.depth == 0 && !self.buf.is_empty() {
                            // A bare scalar at the top level ends here.
                            out.push(Frame::Text(std::mem::take(&mut self.buf)));
                        } else if self.depth > 0 {
                            self.buf.push(b);
                        }
                    }
                    _ => self.buf.push(b),
                }
            }
            if self.buf.len() > MAX_MESSAGE || self.depth > MAX_NESTING {
                self.reset();
                self.skipping = b != b'\n';
                out.push(Frame::TooBig);
            }
        }
        out
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.quote = 0;
        self.escape = false;
    }
}

/// Parses one framed text as JSON, accepting QEMU's single-quoted strings.
pub fn parse_json(text: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice(text) {
        Ok(v) => Ok(v),
        Err(e) if text.contains(&b'\'') => {
            serde_json::from_slice(&requote(text)).map_err(|_| format!("JSON parse error, {e}"))
        }
        Err(e) => Err(format!("JSON parse error, {e}")),
    }
}

/// Rewrites single-quoted strings as double-quoted ones.
fn requote(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut open: Option<u8> = None;
    let mut esc = false;
    for &c in text {
        match open {
            Some(q) if esc => {
                esc = false;
                // `\'` inside a single-quoted string is a plain quote.
                if q == b'\'' && c == b'\'' {
                    out.pop();
                }
                out.push(c);
            }
            Some(_) if c == b'\\' => {
                esc = true;
                out.push(c);
            }
            Some(q) if c == q => {
                open = None;
                out.push(b'"');
            }
            Some(b'\'') if c == b'"' => out.extend_from_slice(b"\\\""),
            Some(_) => out.push(c),
            None if c == b'\'' || c == b'"' => {
                open = Some(c);
                out.push(b'"');
            }
            None => out.push(c),
        }
    }
    out
}

/// A request's envelope, checked (qmp-spec.rst "Issuing Commands").
#[derive(Debug, PartialEq)]
pub struct Envelope {
    pub execute: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// Checks a message's envelope. An error keeps the `id` if there was one.
pub fn envelope(v: Value) -> Result<Envelope, (QmpError, Option<Value>)> {
    let Value::Object(mut m) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = m.remove("id");
    let fail = |s: String| Err((QmpError::generic(s), id.clone()));
    if let Some(k) = m
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "exec-oob" | "arguments"))
    {
        return fail(format!("QMP input member '{k}' is unexpected"));
    }
    if m.contains_key("exec-oob") {
        return fail("QMP input member 'exec-oob' is unexpected".into());
    }
    let execute = match m.remove("execute") {
        None => return fail("QMP input lacks member 'execute'".into()),
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into()),
    };
    let arguments = match m.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
    };
    Ok(Envelope {
        execute,
        arguments,
        id,
    })
}

/// The greeting (qmp-spec.rst "Server Greeting").
pub fn greeting() -> Value {
    let (major, minor, micro) = crate::QEMU_VERSION;
    serde_json::json!({"QMP": {
        "version": {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": crate::package_version(),
        },
        "capabilities": [],
    }})
}

/// Formats a message for the wire, with its line end.
pub fn encode(v: &Value, pretty: bool) -> String {
    let mut s = if pretty {
        serde_json::to_string_pretty(v).unwrap_or_default()
    } else {
        v.to_string()
    };
    s.push_str("\r\n");
    s
}

/// The response to a request.
pub fn response(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    let mut v = match result {
        Ok(r) => serde_json::json!({ "return": r }),
        Err(e) => serde_json::json!({ "error": e.to_json() }),
    };
    if let Some(id) = id {
        v["id"] = id;
    }
    v
}

/// Writes queued texts to the client until the queue closes.
pub fn writer_loop(mut w: Box<dyn Write + Send>, rx: mpsc::Receiver<Out>) {
    let mut broken = false;
    for item in rx {
        match item {
            Out::Line(text) if !broken => {
                broken = w
                    .write_all(text.as_bytes())
                    .and_then(|_| w.flush())
                    .is_err();
            }
            Out::Line(_) => {}
            Out::Flush(ack) => {
                let _ = ack.send(());
            }
        }
    }
}

/// Serves one QMP connection until the client goes away.
pub fn serve(stream: Stream, pretty: bool, events: Arc<Events>, vm: EventSender) {
    let Stream {
        mut read,
        write,
        shutdown,
    } = stream;
    let (tx, rx) = super::event::queue();
    let writer = std::thread::Builder::new()
        .name("qmp-out".into())
        .spawn(move || writer_loop(write, rx));
    let send = |v: &Value| {
        let _ = tx.try_send(Out::Line(encode(v, pretty)));
    };
    send(&greeting());
    let mut negotiated = false;
    let mut subscription = None;
    let mut framer = Framer::default();
    let mut buf = [0u8; 4096];
    'conn: loop {
        let n = match read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for frame in framer.push(&buf[..n]) {
            let text = match frame {
                Frame::Text(t) => t,
                Frame::TooBig => {
                    send(&response(
                        Err(QmpError::generic("JSON parse error, message too large")),
                        None,
                    ));
                    continue;
                }
            };
            let parsed = parse_json(&text).map_err(|e| (QmpError::generic(e), None));
            let env = match parsed.and_then(envelope) {
                Ok(e) => e,
                Err((e, id)) => {
                    send(&response(Err(e), id));
                    continue;
                }
            };
            let cmd = match command::parse(&env.execute, env.arguments) {
                Ok(c) => c,
                Err(e) => {
                    send(&response(Err(e), env.id));
                    continue;
                }
            };
            // Negotiation happens here: it changes only this session.
            match (&cmd, negotiated) {
                (Command::Capabilities { enable }, false) => {
                    let r = match enable.first() {
                        Some(c) => {
                            Err(QmpError::generic(format!("Capability '{c}' not available")))
                        }
                        None => {
                            negotiated = true;
                            subscription = Some(events.subscribe(tx.clone()));
                            Ok(serde_json::json!({}))
                        }
                    };
                    send(&response(r, env.id));
                    continue;
                }
                (Command::Capabilities { .. }, true) => {
                    send(&response(
                        Err(QmpError::new(
                            ErrorClass::CommandNotFound,
                            "Capabilities negotiation is already complete, command ignored",
                        )),
                        env.id,
                    ));
                    continue;
                }
                (_, false) => {
                    send(&response(
                        Err(QmpError::new(
                            ErrorClass::CommandNotFound,
                            "Expecting capabilities negotiation with 'qmp_capabilities'",
                        )),
                        env.id,
                    ));
                    continue;
                }
                _ => {}
            }
            // The main loop runs it and queues the response on `tx`; one
            // request at a time per client, so responses stay in order and
            // a client cannot queue unbounded work.
            let (done_tx, done_rx) = mpsc::channel();
            vm.send(VmEvent::Monitor(Request::Qmp {
                cmd,
                id: env.id,
                pretty,
                out: tx.clone(),
                done: done_tx,
            }));
            if done_rx.recv().is_err() {
                break 'conn;
            }
        }
    }
    if let Some(id) = subscription {
        events.unsubscribe(id);
    }
    drop(tx);
    shutdown();
    if let Ok(w) = writer {
        let _ = w.join();
    }
}

/// The fuzz harness of a QMP session's input side (fuzz target
/// `qmp_input`): bytes in chunks whose sizes the input picks, framed,
/// parsed, envelope-checked and parsed into commands, and every answer
/// encoded. Nothing runs; nothing may panic or grow without bound.
pub fn fuzz_input(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = (chunk as usize % 64) + 1;
    let mut framer = Framer::default();
    for piece in rest.chunks(chunk) {
        for frame in framer.push(piece) {
            let Frame::Text(text) = frame else { continue };
            let r = parse_json(&text)
                .map_err(|e| (QmpError::generic(e), None))
                .and_then(envelope);
            let reply = match r {
                Ok(env) => match command::parse(&env.execute, env.arguments) {
                    Ok(cmd) => response(Ok(Value::String(format!("{cmd:?}"))), env.id),
                    Err(e) => response(Err(e), env.id),
                },
                Err((e, id)) => response(Err(e), id),
            };
            let _ = encode(&reply, chunk.is_multiple_of(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn texts(f: &mut Framer, s: &str) -> Vec<String> {
        f.push(s.as_bytes())
            .into_iter()
            .map(|x| match x {
                Frame::Text(t) => String::from_utf8(t).unwrap(),
                Frame::TooBig => "TOOBIG".into(),
            })
            .collect()
    }

    #[test]
    fn framing() {
        let mut f = Framer::default();
        assert_eq!(
            texts(&mut f, "{\"a\": \"}\"}{\"b\":\n[1,"),
            vec!["{\"a\": \"}\"}"]
        );
        assert_eq!(texts(&mut f, "2]}\n"), vec!["{\"b\":\n[1,2]}"]);
        assert_eq!(texts(&mut f, "42 "), vec!["42"]);
        assert_eq!(texts(&mut f, "{'a': '\"}'}"), vec!["{'a': '\"}'}"]);
        let deep = "[".repeat(MAX_NESTING + 1);
        assert_eq!(texts(&mut f, &deep), vec!["TOOBIG"]);
        // The rest of that line is dropped; the next line parses.
        assert_eq!(texts(&mut f, "]]]\n{}"), vec!["{}"]);
    }

    #[test]
    fn single_quotes() {
        assert!(
            parse_json(b"{'execute': 'it''s'}").is_err(),
            "adjacent strings are not JSON"
        );
        assert_eq!(
            parse_json(b"{'execute': 'say \\'hi\\' \"x\"'}").unwrap(),
            json!({"execute": "say 'hi' \"x\""})
        );
    }

    #[test]
    fn envelopes() {
        assert_eq!(
            envelope(json!([1])).unwrap_err().0.desc,
            "QMP input must be a JSON object"
        );
        let (e, id) = envelope(json!({"id": 7, "arguments": {}})).unwrap_err();
        assert_eq!(e.desc, "QMP input lacks member 'execute'");
        assert_eq!(id, Some(json!(7)));
        assert_eq!(
            envelope(json!({"execute": 1})).unwrap_err().0.desc,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            envelope(json!({"execute": "x", "foo": 1}))
                .unwrap_err()
                .0
                .desc,
            "QMP input member 'foo' is unexpected"
        );
        assert_eq!(
            envelope(json!({"execute": "x", "arguments": 1}))
                .unwrap_err()
                .0
                .desc,
            "QMP input member 'arguments' must be an object"
        );
    }
}
