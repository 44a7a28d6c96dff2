//! Shared parts of the protocol comparison benchmark: the machine
//! description, servers run as child processes (so their CPU time and
//! memory can be read from `/proc`), latency summaries, and the report
//! written as JSON.
//!
//! The benchmark itself is `benches/protocols.rs` (`cargo bench` at the
//! workspace root); `cargo xtask bench-report` turns its JSON into
//! `docs/BENCHMARKS.md`. [`postgres`] holds what it measures of
//! PostgreSQL: the database's CPU time, and the ceiling of `NOTIFY`.

pub mod postgres;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Command;

pub use chat_conformance::process::{ServerProcess, cpu_seconds_of};
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
    /// `socket`, `grpc`, `relay` or `raw`.
    pub transport: String,
    /// `memory`, `durable` or `-`.
    pub store: String,
    /// How the load sends: `pipelined` (each sender keeps up to `window`
    /// messages in flight, released as its recipient gets them; recipients
    /// acknowledge in batches) or `one at a time` (each send waits for its
    /// answer; recipients acknowledge every 64th message and wait for it);
    /// `ping-pong` for the raw echo.
    pub mode: String,
    /// Messages in flight per sender (pipelined).
    pub window: usize,
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
    /// Cores the server used on average (CPU seconds per second).
    pub server_cores: f64,
    /// Cores the load generator (this process) used on average.
    pub generator_cores: f64,
    /// The server's busiest thread over the row: its name and the share
    /// of one core it used.
    pub server_busiest_thread: (String, f64),
    /// Which side limited the row (see [`bottleneck`]).
    pub bottleneck: String,
    /// Server processes the load ran against: 1, or several on one
    /// PostgreSQL database (each pair's sender on one, its recipient on the
    /// next). The server figures above are their sums.
    #[serde(default = "one")]
    pub processes: usize,
    /// For rows on PostgreSQL: the database's CPU time (every `postgres`
    /// process) per delivered message, µs, beside the server's.
    #[serde(default)]
    pub database_cpu_us_per_msg: Option<f64>,
    /// For rows on PostgreSQL: cores the database used on average.
    #[serde(default)]
    pub database_cores: Option<f64>,
}

/// One server process: what a report without `processes` measured.
fn one() -> usize {
    1
}

impl Throughput {
    /// CPU per delivered message of everything that served it: the server
    /// processes and, for rows on PostgreSQL, the database, µs.
    pub fn total_cpu_us_per_msg(&self) -> f64 {
        self.server_cpu_us_per_msg + self.database_cpu_us_per_msg.unwrap_or(0.0)
    }
}

/// CPU time of each thread of process `pid` so far: thread id → (name,
/// clock ticks of 1/100 s).
pub fn thread_ticks(pid: u32) -> std::collections::HashMap<u32, (String, u64)> {
    let mut threads = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map(|(name, _)| name.to_string())
            .unwrap_or_default();
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        threads.insert(tid, (name, ticks(11) + ticks(12)));
    }
    threads
}

/// The thread that used the most CPU between two [`thread_ticks`]
/// readings `seconds` apart: its name and cores used.
pub fn busiest_thread(
    before: &std::collections::HashMap<u32, (String, u64)>,
    after: &std::collections::HashMap<u32, (String, u64)>,
    seconds: f64,
) -> (String, f64) {
    after
        .iter()
        .map(|(tid, (name, ticks))| {
            let start = before.get(tid).map_or(0, |(_, t)| *t);
            (
                name.clone(),
                ticks.saturating_sub(start) as f64 / 100.0 / seconds.max(1e-9),
            )
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default()
}

/// Which side limited a load, from the cores each used on a machine with
/// `cores` cores (the database's is 0 for a store without one) and the
/// share of a core the server's busiest thread used: a server thread busy
/// at least 90% of the time is the bottleneck (`server thread`: work that
/// one thread does, whatever the cores); else, when the sides together
/// used nearly all the cores (at least 85%), the one using the most is
/// (`server`, `generator` or `database`: on one machine they share its
/// cores); otherwise none was short of CPU and the load waited (for round
/// trips, or for the disk, or for a lock).
pub fn bottleneck(
    server_cores: f64,
    generator_cores: f64,
    database_cores: f64,
    busiest_server_thread: f64,
    cores: usize,
) -> &'static str {
    if busiest_server_thread >= 0.9 {
        "server thread"
    } else if server_cores + generator_cores + database_cores < 0.85 * cores as f64 {
        "waiting"
    } else if server_cores >= generator_cores && server_cores >= database_cores {
        "server"
    } else if database_cores >= generator_cores {
        "database"
    } else {
        "generator"
    }
}

/// New connections per second, each completing the transport's handshake
/// (socket: HELLO and WELCOME; gRPC: HTTP/2 and a health call; relay: the
/// name and its empty answer; over TLS, the TLS handshake first).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connects {
    /// `socket`, `grpc`, `relay`, or with `+tls`.
    pub transport: String,
    /// Concurrent connecting clients.
    pub clients: usize,
    /// Connections completed.
    pub connects: u64,
    /// Per second.
    pub per_second: f64,
    /// Server CPU per connection, µs.
    pub server_cpu_us_per_connect: f64,
    /// Cores the server used on average.
    pub server_cores: f64,
    /// Cores the generator (this process) used on average.
    pub generator_cores: f64,
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

/// Server memory per idle logged-in session, and a small load's figures
/// while they are held.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sessions {
    /// `socket` or `grpc`.
    pub transport: String,
    /// `memory` or `durable`.
    pub store: String,
    /// Sessions held.
    pub sessions: usize,
    /// Server RSS growth from opening them (the accounts existed before),
    /// bytes.
    pub rss_delta: u64,
    /// Per session, bytes.
    pub per_session: f64,
    /// Delivered messages per second of a pipelined 16-pair load run while
    /// the sessions are held.
    pub load_per_second: f64,
    /// That load's delivery latency, 99th percentile, µs.
    pub load_p99_us: f64,
}

/// Logins per second, with the server's real password hashing.
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

/// What the password hash alone allows, measured in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HashCost {
    /// One argon2id verification with the server's default parameters,
    /// alone on an idle machine, µs (from the rate below).
    pub verify_us: f64,
    /// Hashes the server runs at once (its default).
    pub concurrent: usize,
    /// Logins per second that allows: `concurrent` verifications at a time.
    pub configured_per_second: f64,
    /// Logins per second with every core hashing.
    pub all_cores_per_second: f64,
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
    /// What hashing alone allows.
    pub hash_cost: Option<HashCost>,
    /// Connections per second.
    pub connects: Vec<Connects>,
    /// One small append and `fdatasync` on the data directory's disk,
    /// alone, µs (median): what one durable commit costs at least.
    pub sync_us: Option<f64>,
    /// What PostgreSQL's `NOTIFY` carries at most on this machine (the
    /// cluster's cross-process delivery), when the run had a database.
    #[serde(default)]
    pub notify: Option<postgres::NotifyCeiling>,
    /// Parts of the benchmark this run skipped, and why (e.g. the
    /// PostgreSQL rows without a database to run them on).
    #[serde(default)]
    pub skipped: Vec<String>,
    /// Set when the run measured only part of the benchmark
    /// (`CHAT_BENCH_ONLY`): such a report is not turned into
    /// docs/BENCHMARKS.md.
    #[serde(default)]
    pub only: Option<String>,
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
    /// The minimal relay (see [`relay`]).
    Relay,
}

impl Served {
    fn arg(self) -> &'static str {
        match self {
            Served::Socket => "socket",
            Served::Grpc => "grpc",
            Served::Echo => "echo",
            Served::Relay => "relay",
        }
    }
}

/// How a benchmark server hashes passwords.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passwords {
    /// The server's defaults (argon2id, 19 MiB, 2 passes): for the rows
    /// that measure logins.
    Real,
    /// argon2's cheapest parameters: for every other row, which would
    /// otherwise measure hashing (and the allocator's memory of it).
    Cheap,
}

impl Passwords {
    fn arg(self) -> &'static str {
        match self {
            Passwords::Real => "real",
            Passwords::Cheap => "cheap",
        }
    }
}

/// Starts this binary again in server mode: `served` on `store` (`memory`,
/// a data directory for the durable store, the default log store,
/// `sqlite:` and a data directory for the SQLite store, or `postgres:` and
/// a database URL: one node of the cluster on that database), as a child
/// process whose CPU time and memory the benchmark reads. It stops when
/// dropped.
pub async fn start_server(
    served: Served,
    store: &str,
    passwords: Passwords,
) -> anyhow::Result<ServerProcess> {
    spawn_server(&[SERVE_ARG, served.arg(), store, passwords.arg()]).await
}

/// [`start_server`] serving TLS with the PEM certificate and key at `cert`
/// and `key`.
pub async fn start_server_tls(
    served: Served,
    store: &str,
    passwords: Passwords,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<ServerProcess> {
    let utf8 = |path: &std::path::Path| {
        path.to_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", path.display()))
    };
    let (cert, key) = (utf8(cert)?, utf8(key)?);
    spawn_server(&[SERVE_ARG, served.arg(), store, passwords.arg(), &cert, &key]).await
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
    let cheap = args.get(at + 3).is_some_and(|p| p == "cheap");
    let tls = args.get(at + 4).zip(args.get(at + 5));
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
        if served == "echo" || served == "relay" {
            let listener = tokio::net::TcpListener::bind(listener_addr).await?;
            announce(listener.local_addr()?)?;
            if served == "echo" {
                tokio::select! {
                    _ = echo(listener) => {}
                    _ = stop => {}
                }
            } else {
                tokio::select! {
                    _ = relay(listener) => {}
                    _ = stop => {}
                }
            }
            return anyhow::Ok(());
        }
        let storage = if store == "memory" {
            chat_server::Storage::memory()
        } else if let Some(dir) = store.strip_prefix("sqlite:") {
            chat_server::Storage::sqlite(dir)
        } else if let Some(url) = store.strip_prefix("postgres:") {
            // A node of the cluster on that database: it joins, listens for
            // its deliveries and beats its heartbeat itself.
            chat_server::Storage {
                store: chat_server::StoreKind::Postgres.into(),
                database_url: Some(url.to_string()),
                ..chat_server::Storage::default()
            }
        } else {
            chat_server::Storage::durable(store)
        };
        // Password checks from the one loopback address are not throttled
        // either: the login benchmark measures what hashing allows.
        let unlimited = chat_core::Rate {
            burst: u32::MAX,
            per_second: 1e9,
        };
        let mut engine = tuning.engine();
        if cheap {
            engine.hashing = chat_core::HashingConfig::cheap_for_tests();
        }
        engine.throttle.checks_per_address = unlimited;
        engine.throttle.per_address = unlimited;
        // `CHAT_BENCH_TELEMETRY=1`: run as an operator would, with info
        // logs and metrics recorded and served (their cost is then in
        // every figure). Off by default, like an embedded engine.
        if std::env::var_os("CHAT_BENCH_TELEMETRY").is_some() {
            chat_server::telemetry::init_logging(chat_server::LogFormat::Text, "info")?;
            let handle = chat_server::telemetry::install_metrics()?;
            let endpoint =
                chat_server::telemetry::MetricsEndpoint::bind(listener_addr, handle).await?;
            tokio::spawn(endpoint.serve(tokio_util::sync::CancellationToken::new()));
        }
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

/// The minimal relay: the least any framed chat server can do. Frames are
/// length-delimited (a 4-byte big-endian length, as tokio-util's
/// `LengthDelimitedCodec`). A connection's first frame is its name, answered
/// with an empty frame once the name is taken; every later frame is
/// `[recipient name length: u8][recipient name][body]`, and the body alone
/// is forwarded to the connection of that name (dropped if there is none).
/// No accounts, no acknowledgements, no storage.
pub async fn relay(listener: tokio::net::TcpListener) {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use futures::{SinkExt, StreamExt};
    use tokio::sync::mpsc;
    use tokio_util::codec::{Framed, LengthDelimitedCodec};

    type Routes = Arc<Mutex<HashMap<bytes::Bytes, mpsc::Sender<bytes::Bytes>>>>;
    let routes: Routes = Arc::default();
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let routes = Arc::clone(&routes);
        tokio::spawn(async move {
            let mut framed = Framed::new(stream, LengthDelimitedCodec::new());
            let Some(Ok(name)) = framed.next().await else {
                return;
            };
            let name = name.freeze();
            let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(1024);
            if let Ok(mut routes) = routes.lock() {
                routes.insert(name.clone(), tx);
            }
            if framed.send(bytes::Bytes::new()).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    frame = framed.next() => {
                        let Some(Ok(frame)) = frame else { break };
                        let frame = frame.freeze();
                        let Some((&len, rest)) = frame.split_first() else { continue };
                        let len = usize::from(len).min(rest.len());
                        let to = frame.slice(1..1 + len);
                        let body = frame.slice(1 + len..);
                        let peer = routes.lock().ok().and_then(|r| r.get(&to).cloned());
                        if let Some(peer) = peer {
                            let _ = peer.send(body).await;
                        }
                    }
                    body = rx.recv() => {
                        let Some(body) = body else { break };
                        if framed.feed(body).await.is_err() {
                            break;
                        }
                        let mut failed = false;
                        while let Ok(body) = rx.try_recv() {
                            failed |= framed.feed(body).await.is_err();
                        }
                        if failed || SinkExt::<bytes::Bytes>::flush(&mut framed).await.is_err() {
                            break;
                        }
                    }
                }
            }
            if let Ok(mut routes) = routes.lock() {
                routes.remove(&name);
            }
        });
    }
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

/// Measures what argon2id verifications with the server's default
/// parameters ([`chat_core::HashingConfig::default`]) allow on this
/// machine, alone: verifications per second for `window` with as many
/// threads verifying at once as the server allows, and with one per core.
pub fn measure_hash_cost(window: std::time::Duration) -> anyhow::Result<HashCost> {
    use argon2::password_hash::PasswordHasher;
    use argon2::{Algorithm, Argon2, Params, PasswordVerifier, Version};

    let config = chat_core::HashingConfig::default();
    let params = Params::new(
        config.memory_kib,
        config.iterations,
        config.parallelism,
        None,
    )
    .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let hash = argon
        .hash_password(b"password1")
        .map_err(|e| anyhow::anyhow!("hash: {e}"))?
        .to_string();
    let rate = |threads: usize| -> f64 {
        let deadline = std::time::Instant::now() + window;
        let started = std::time::Instant::now();
        let done: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    scope.spawn(|| {
                        let mut n = 0;
                        while std::time::Instant::now() < deadline {
                            let _ = argon.verify_password(b"password1", hash.as_str());
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
        });
        done as f64 / started.elapsed().as_secs_f64()
    };
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let configured = rate(config.max_concurrent);
    let all = rate(cores);
    Ok(HashCost {
        verify_us: config.max_concurrent as f64 * 1e6 / configured.max(1e-9),
        concurrent: config.max_concurrent,
        configured_per_second: configured,
        all_cores_per_second: all,
    })
}

/// Times appending 400 bytes and `fdatasync` to a file in `dir`, `samples`
/// times; the median, µs.
pub fn measure_sync(dir: &std::path::Path, samples: usize) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("sync-probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let record = [b'x'; 400];
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        let started = std::time::Instant::now();
        file.write_all(&record)?;
        file.sync_data()?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
