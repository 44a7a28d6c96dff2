//! Shared parts of the protocol comparison benchmark: the machine
//! description, servers run as child processes (so their CPU time and
//! memory can be read from `/proc`), latency summaries, and the report
//! written as JSON.
//!
//! The benchmark itself is `benches/protocols.rs` (`cargo bench` at the
//! workspace root); `cargo xtask bench-report` turns its JSON into
//! `docs/BENCHMARKS.md`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::Command;

pub use chat_conformance::process::ServerProcess;
use serde::{Deserialize, Serialize};

/// The argument that turns the benchmark binary into a server process.
pub const SERVE_ARG: &str = "--chat-bench-serve";

/// Size of the message every benchmark sends, in bytes: a 300-byte direct
/// message, the size the reference figures use.
pub const MESSAGE_BYTES: usize = 300;

/// Where the machine ran the benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Logical cores.
    pub cores: usize,
    /// CPU model, from `/proc/cpuinfo`.
    pub cpu: String,
    /// Operating system and kernel.
    pub os: String,
    /// `rustc --version`.
    pub rustc: String,
}

impl Machine {
    /// Describes this machine.
    pub fn describe() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let os = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|r| {
                r.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| {
                    l.trim_start_matches("PRETTY_NAME=")
                        .trim_matches('"')
                        .to_string()
                })
            })
            .unwrap_or_else(|| std::env::consts::OS.into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Self {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu,
            os: format!("{os}, Linux {}", kernel.trim()),
            rustc,
        }
    }
}

/// Latency percentiles of one measured operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    /// `socket`, `grpc` or `raw`.
    pub transport: String,
    /// `memory`, `durable` or `-`.
    pub store: String,
    /// The operation.
    pub op: String,
    /// How many samples.
    pub samples: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
}

/// Delivered messages per second with N sender/recipient pairs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Throughput {
    /// `socket`, `grpc` or `raw`.
    pub transport: String,
    /// `memory`, `durable` or `-`.
    pub store: String,
    /// Concurrent pairs.
    pub pairs: usize,
    /// Messages delivered (echoed, for raw) in the window.
    pub delivered: u64,
    /// Per second.
    pub per_second: f64,
    /// Delivery latency under this load: median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Server CPU time (user + system) per delivered message, µs.
    pub server_cpu_us_per_msg: f64,
}

/// Bytes on the wire for one operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bytes {
    /// `socket` or `grpc`.
    pub transport: String,
    /// The operation.
    pub op: String,
    /// Client → server.
    pub up: u64,
    /// Server → client.
    pub down: u64,
}

/// Server memory per idle logged-in session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sessions {
    /// `socket` or `grpc`.
    pub transport: String,
    /// Sessions held.
    pub sessions: usize,
    /// Server RSS growth, bytes.
    pub rss_delta: u64,
    /// Per session, bytes.
    pub per_session: f64,
}

/// Logins per second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Logins {
    /// `socket` or `grpc`.
    pub transport: String,
    /// Concurrent clients.
    pub clients: usize,
    /// Logins (each with its logout) completed.
    pub logins: u64,
    /// Per second.
    pub per_second: f64,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// When (UTC, RFC 3339 date).
    pub date: String,
    /// Where.
    pub machine: Machine,
    /// Quick mode (fewer samples, shorter windows).
    pub quick: bool,
    /// Round-trip latency per operation.
    pub latency: Vec<Latency>,
    /// Throughput with N pairs.
    pub throughput: Vec<Throughput>,
    /// Bytes per operation.
    pub bytes: Vec<Bytes>,
    /// Memory per idle session.
    pub sessions: Vec<Sessions>,
    /// Logins per second.
    pub logins: Vec<Logins>,
}

/// What a child server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The socket transport.
    Socket,
    /// gRPC.
    Grpc,
    /// A raw TCP echo (the physical limit).
    Echo,
}

impl Served {
    fn arg(self) -> &'static str {
        match self {
            Served::Socket => "socket",
            Served::Grpc => "grpc",
            Served::Echo => "echo",
        }
    }
}

/// Starts this binary again in server mode: `served` on `store` (`memory`,
/// or a data directory for the durable store), as a child process whose CPU
/// time and memory the benchmark reads. It stops when dropped.
pub async fn start_server(served: Served, store: &str) -> anyhow::Result<ServerProcess> {
    spawn_server(&[SERVE_ARG, served.arg(), store]).await
}

/// [`start_server`] serving TLS with the PEM certificate and key at `cert`
/// and `key`.
pub async fn start_server_tls(
    served: Served,
    store: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<ServerProcess> {
    let utf8 = |path: &std::path::Path| {
        path.to_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", path.display()))
    };
    let (cert, key) = (utf8(cert)?, utf8(key)?);
    spawn_server(&[SERVE_ARG, served.arg(), store, &cert, &key]).await
}

async fn spawn_server(args: &[&str]) -> anyhow::Result<ServerProcess> {
    let exe = std::env::current_exe()?;
    let exe = exe
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("the benchmark's path is not UTF-8"))?;
    Ok(ServerProcess::start_showing_errors(exe, args, 1).await)
}

/// In server mode (the binary was started with [`SERVE_ARG`]): serves until
/// stdin closes, then exits the process. Otherwise returns.
pub fn serve_if_asked() {
    let args: Vec<String> = std::env::args().collect();
    let Some(at) = args.iter().position(|a| a == SERVE_ARG) else {
        return;
    };
    let served = args.get(at + 1).map(String::as_str).unwrap_or("socket");
    let store = args.get(at + 2).cloned().unwrap_or_else(|| "memory".into());
    let tls = args.get(at + 3).zip(args.get(at + 4));
    let tuning = chat_server::Tuning {
        tls_cert: tls.map(|(cert, _)| cert.into()),
        tls_key: tls.map(|(_, key)| key.into()),
        ..bench_tuning()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("chat-server")
        .build()
        .expect("server runtime");
    let result = runtime.block_on(async move {
        let listener_addr: SocketAddr = "127.0.0.1:0".parse()?;
        let stop = async {
            // The parent closes our stdin when it is done with us.
            let _ = tokio::task::spawn_blocking(|| {
                let mut sink = String::new();
                while std::io::stdin()
                    .read_line(&mut sink)
                    .map(|n| n > 0)
                    .unwrap_or(false)
                {}
            })
            .await;
        };
        if served == "echo" {
            let listener = tokio::net::TcpListener::bind(listener_addr).await?;
            announce(listener.local_addr()?)?;
            tokio::select! {
                _ = echo(listener) => {}
                _ = stop => {}
            }
            return anyhow::Ok(());
        }
        let storage = if store == "memory" {
            chat_server::Storage::memory()
        } else {
            chat_server::Storage::sqlite(store)
        };
        // Password checks from the one loopback address are not throttled
        // either: the login benchmark measures what hashing allows.
        let unlimited = chat_core::Rate {
            burst: u32::MAX,
            per_second: 1e9,
        };
        let mut engine = tuning.engine();
        engine.throttle.checks_per_address = unlimited;
        engine.throttle.per_address = unlimited;
        let chat = storage.open_with(engine).await?;
        let listen = if served == "grpc" {
            chat_server::Listen::Grpc(listener_addr)
        } else {
            chat_server::Listen::Socket(listener_addr)
        };
        let bound = chat_server::Bound::bind(&[listen]).await?;
        announce(bound.local_addrs()?[0])?;
        bound.serve(chat, &tuning, stop).await
    });
    if let Err(err) = result {
        eprintln!("benchmark server failed: {err:#}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// The servers' settings under benchmark: the defaults, except that every
/// connection comes from one address (loopback), so the per-address share
/// is the whole limit, and that the send, create and list rates are
/// lifted: the benchmark measures what the server can do, with a few users
/// as fast as they can.
fn bench_tuning() -> chat_server::Tuning {
    let tuning = chat_server::Tuning::default();
    chat_server::Tuning {
        max_connections_per_address: Some(tuning.max_connections),
        send_rate: 0,
        creates_per_minute: 0,
        list_rate: 0,
        ..tuning
    }
}

fn announce(addr: SocketAddr) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {addr}")?;
    stdout.flush()
}

/// The raw TCP echo: every byte read is written back.
async fn echo(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}
