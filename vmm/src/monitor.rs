//! A small human monitor (QEMU's HMP), reached with Ctrl-A c on a `mon:`
//! console: `info status`, `info block`, `stop`, `cont`, `system_reset`,
//! `quit`, `help`. It is what resumes a guest that an I/O error policy
//! (`rerror/werror=stop`) paused. QMP will share these operations.

use crate::VmEvent;

pub const BANNER: &str = "Strata monitor - type 'help' for more information";
pub const PROMPT: &str = "(strata) ";

const HELP: &str = "\
cont|c              resume the guest (and retry requests an I/O error stopped)
help|?              show this help
info block          list the drives
info status         show the run state
quit|q              exit Strata
stop                pause the guest
system_reset        reset the machine
";

/// Why the guest is not running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// `-S` before the first `cont`.
    Prelaunch,
    Paused,
    /// An I/O error policy stopped the guest.
    IoError,
}

impl RunState {
    pub fn describe(&self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Prelaunch => "paused (prelaunch)",
            RunState::Paused => "paused",
            RunState::IoError => "paused (io-error)",
        }
    }
}

/// What a command asks of the machine.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Pause,
    Resume,
    End(VmEvent),
}

/// The machine state the monitor reads.
pub struct View<'a> {
    pub state: &'a RunState,
    /// One line per drive, as `info block` prints it.
    pub drives: Vec<String>,
}

/// Runs one command line; returns the text to print and the action.
pub fn execute(line: &str, view: &View) -> (String, Action) {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [] => (String::new(), Action::None),
        ["help"] | ["?"] => (HELP.to_string(), Action::None),
        ["info", "status"] => (
            format!("VM status: {}\n", view.state.describe()),
            Action::None,
        ),
        ["info", "block"] => {
            let mut out = view.drives.join("\n");
            if !out.is_empty() {
                out.push('\n');
            }
            (out, Action::None)
        }
        ["stop"] => (String::new(), Action::Pause),
        ["cont"] | ["c"] => (String::new(), Action::Resume),
        ["system_reset"] => (String::new(), Action::End(VmEvent::Reset)),
        ["quit"] | ["q"] => (String::new(), Action::End(VmEvent::Quit)),
        [cmd, ..] => (format!("unknown command: '{cmd}'\n"), Action::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let v = View {
            state: &RunState::IoError,
            drives: vec!["d0: disk.img (raw)".into()],
        };
        assert_eq!(
            execute("info status", &v).0,
            "VM status: paused (io-error)\n"
        );
        assert_eq!(execute("info block", &v).0, "d0: disk.img (raw)\n");
        assert_eq!(execute("  cont ", &v).1, Action::Resume);
        assert_eq!(execute("q", &v).1, Action::End(VmEvent::Quit));
        assert_eq!(execute("frob 1", &v).0, "unknown command: 'frob'\n");
        assert_eq!(execute("", &v), (String::new(), Action::None));
    }
}
