//! Server binaries as real child processes, for tests and benchmarks that
//! exercise what a user runs: the one helper that starts a server, reads
//! the addresses it announces, and reads its CPU time and memory from
//! `/proc`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const PATIENCE: Duration = Duration::from_secs(30);

/// A running server binary and the addresses it printed.
pub struct ServerProcess {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Held open while the process runs: a server that stops when its
    /// standard input closes (the benchmark's) stops when this is dropped.
    _stdin: Option<ChildStdin>,
    /// One per `listening on ADDRESS` line, in the order printed.
    pub addrs: Vec<String>,
}

impl ServerProcess {
    /// Starts `binary` with `args` and reads its `listening` lines (one per
    /// listener it was asked for). Its standard error is discarded. Killed
    /// if dropped.
    pub async fn start(binary: &str, args: &[&str], listeners: usize) -> Self {
        Self::spawn(binary, args, listeners, Stdio::null()).await
    }

    /// [`ServerProcess::start`], with the server's standard error passed
    /// through (to see why a server failed to start).
    pub async fn start_showing_errors(binary: &str, args: &[&str], listeners: usize) -> Self {
        Self::spawn(binary, args, listeners, Stdio::inherit()).await
    }

    async fn spawn(binary: &str, args: &[&str], listeners: usize, stderr: Stdio) -> Self {
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start the server binary");
        let stdin = child.stdin.take();
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
            _stdin: stdin,
            addrs,
        }
    }

    /// The next line the server prints on stdout after its `listening`
    /// lines (`metrics on ADDRESS`), waiting for it.
    pub async fn next_line(&mut self) -> String {
        tokio::time::timeout(PATIENCE, self.stdout.next_line())
            .await
            .expect("the server printed a line in time")
            .expect("readable stdout")
            .expect("a line")
    }

    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
            .parse()
            .expect("the server printed a socket address")
    }

    /// The server's process id (to attach a profiler); 0 once it exited.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// CPU time (user + system) the server has used so far, seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(self.pid())
    }

    /// Resident memory now, bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
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

/// CPU time (user + system) process `pid` has used so far, seconds (0 if
/// it cannot be read). `std::process::id()` gives this process's own.
pub fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are
    // the 14th and 15th fields overall, in clock ticks (100 per second).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
