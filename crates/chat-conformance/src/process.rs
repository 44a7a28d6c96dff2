//! Server binaries as real child processes, for tests that exercise what a
//! user runs.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const PATIENCE: Duration = Duration::from_secs(30);

/// A running server binary and the addresses it printed.
pub struct ServerProcess {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    /// One per `listening on ADDRESS` line, in the order printed.
    pub addrs: Vec<String>,
}

impl ServerProcess {
    /// Starts `binary` with `args` and reads its `listening` lines (one per
    /// listener it was asked for). Killed if dropped.
    pub async fn start(binary: &str, args: &[&str], listeners: usize) -> Self {
        let mut child = Command::new(binary)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the server binary");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut addrs = Vec::new();
        for _ in 0..listeners {
            let line = tokio::time::timeout(PATIENCE, stdout.next_line())
                .await
                .expect("the server printed its address in time")
                .expect("readable stdout")
                .expect("a line");
            let addr = line
                .strip_prefix("listening on ")
                .unwrap_or_else(|| panic!("unexpected line {line:?}"));
            assert!(!addr.ends_with(":0"), "the actual port is printed: {addr}");
            addrs.push(addr.to_string());
        }
        Self {
            child,
            stdout,
            addrs,
        }
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits for
    /// it to be gone.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("SIGKILL the server");
    }

    /// Sends SIGTERM and waits for the exit; asserts it was clean and that
    /// nothing else was printed to stdout.
    pub async fn terminate(mut self) {
        let pid = self.child.id().expect("still running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success());
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait");
        assert!(status.success(), "clean exit on SIGTERM: {status}");
        let rest = self.stdout.next_line().await.expect("readable stdout");
        assert_eq!(rest, None, "nothing on stdout but the listening lines");
    }
}
