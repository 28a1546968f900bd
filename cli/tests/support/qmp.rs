//! A QMP client for the tests: a real JSON reader over the monitor's
//! socket, keeping events apart from responses.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<Box<dyn std::io::Read + Send>>,
    writer: Box<dyn Write + Send>,
    /// Events received so far, oldest first.
    pub events: VecDeque<Value>,
    pub greeting: Value,
}

impl Qmp {
    /// Connects to a Unix socket, retrying while strata starts listening.
    pub fn connect(path: &Path) -> Qmp {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(20) => {
                    panic!("connect {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let r = s.try_clone().unwrap();
        Self::over(Box::new(r), Box::new(s))
    }

    /// Speaks QMP over an already connected stream.
    pub fn over(r: Box<dyn std::io::Read + Send>, w: Box<dyn Write + Send>) -> Qmp {
        let mut q = Qmp {
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        q.greeting = q.read();
        assert!(q.greeting.get("QMP").is_some(), "greeting: {}", q.greeting);
        q
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(path: &Path) -> Qmp {
        let mut q = Self::connect(path);
        let r = q.execute("qmp_capabilities", json!({}));
        assert_eq!(r, json!({"return": {}}));
        q
    }

    /// The buffered input, for tests that read raw lines.
    #[allow(dead_code)]
    pub fn reader(&mut self) -> &mut dyn BufRead {
        &mut self.reader
    }

    /// Reads one message.
    pub fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("qmp read");
        assert!(n > 0, "strata closed the QMP connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// Sends raw text.
    pub fn send_raw(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
        self.writer.flush().unwrap();
    }

    /// Reads until a response (not an event) arrives.
    pub fn response(&mut self) -> Value {
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            return v;
        }
    }

    /// Sends raw text and returns the response.
    pub fn raw(&mut self, text: &str) -> Value {
        self.send_raw(text);
        self.response()
    }

    /// Runs a command; returns the whole response.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        self.raw(&msg.to_string())
    }

    /// Runs a command that must succeed; returns its `return` value.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let r = self.execute(cmd, args.clone());
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{cmd} {args}: {r}"),
        }
    }

    /// Runs a command that must fail; returns (class, desc).
    pub fn err(&mut self, cmd: &str, args: Value) -> (String, String) {
        let r = self.execute(cmd, args.clone());
        let e = r
            .get("error")
            .unwrap_or_else(|| panic!("{cmd} {args} succeeded: {r}"));
        (
            e["class"].as_str().unwrap().to_string(),
            e["desc"].as_str().unwrap().to_string(),
        )
    }

    /// Waits for the event `name` (taking it and the events before it).
    pub fn event(&mut self, name: &str) -> Value {
        loop {
            while let Some(e) = self.events.pop_front() {
                if e["event"] == name {
                    return e;
                }
            }
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push_back(v);
            } else {
                panic!("a response while waiting for {name}: {v}");
            }
        }
    }
}
