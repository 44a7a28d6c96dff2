//! The protocol comparison: socket vs gRPC, each on the memory and the
//! durable store and over TLS, against two floors measured in the same run:
//! a raw TCP echo (one message per round trip) and a minimal relay
//! (length-delimited frames forwarded by name: the least a framed chat
//! server can do). Every figure is also a ratio to rows of the same run.
//! Servers run as child processes (this binary in server mode), so their
//! CPU time and memory are theirs alone; the load runs here, and its own
//! CPU is measured too, to tell which side limited a row.
//!
//! Throughput rows come in two modes. **Pipelined** (the floor: the relay):
//! each sender keeps up to [`WINDOW`] messages in flight, a place freeing
//! when its recipient gets one, and recipients acknowledge in batches; this
//! is what the server can do. **One at a time** (the floor: the echo): each
//! send waits for its answer, as the benchmark did before pipelining; it
//! measures the round trips as much as the server.
//!
//! With `CHAT_TEST_DATABASE_URL` set (the PostgreSQL server the tests use),
//! the run adds the **PostgreSQL** rows, each on a fresh schema: one server
//! process on the database, and a cluster of three on one database, where
//! each pair's sender is on one process and its recipient on the next, so
//! that every delivery crosses processes (`NOTIFY`). Their CPU per message
//! counts the database's processes too, and every figure is also a ratio
//! to the embedded durable store's row of the same run. Then the ceiling
//! of `NOTIFY` itself, measured with sqlx alone. Without the variable those
//! rows are skipped, loudly (and under `CI`, the run fails).
//!
//! `cargo bench` at the workspace root runs it in full;
//! `cargo bench -p chat-bench --bench protocols -- --quick` (or
//! `CHAT_BENCH_QUICK=1`) runs a reduced version in a minute or two.
//! `CHAT_BENCH_ONLY=postgres` runs only the PostgreSQL rows, the durable
//! rows they are compared to and the `NOTIFY` ceiling.
//! Results: a table on stdout and `target/chat-bench/report.json`
//! (`report-postgres.json` for `CHAT_BENCH_ONLY=postgres`), which
//! `cargo xtask bench-report` turns into docs/BENCHMARKS.md.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_bench::postgres::DatabaseCpu;
use chat_bench::{
    Bytes, Connects, Latency, Logins, MESSAGE_BYTES, Machine, Passwords, Report, Served,
    ServerProcess, Sessions, Throughput, busiest_thread, cpu_seconds_of, thread_ticks,
};
use chat_conformance::pki::TestPki;
use chat_conformance::postgres::{TestDatabase, URL_VARIABLE};
use chat_core::client::{ChatClient, Push};
use chat_grpc::GrpcClient;
use chat_socket::SocketClient;
use chat_tls::ClientTls;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

// Beside this file, not in benches/benches/ itself: cargo would take it for
// a benchmark target of its own.
#[path = "protocols/postgres.rs"]
mod postgres;

struct Settings {
    samples: usize,
    window: Duration,
    /// Pair counts of the pipelined rows (the scaling curve).
    pipelined_pairs: &'static [usize],
    /// Pair counts of the one-at-a-time rows.
    one_at_a_time_pairs: &'static [usize],
    /// Idle sessions held, per row of the idle-session curve. This
    /// machine allows 20,000 descriptors per process (and no more, even to
    /// root), which bounds the largest.
    idle_sessions: &'static [usize],
    /// How long argon2id verifications are timed alone.
    hash_window: Duration,
    /// Pair counts of the pipelined rows on the SQLite store.
    sqlite_pairs: &'static [usize],
    /// Pair counts of the pipelined rows on PostgreSQL (one process, and
    /// the cluster).
    postgres_pairs: &'static [usize],
    /// Pair counts of the one-at-a-time socket rows on PostgreSQL (one
    /// process).
    postgres_one_at_a_time_pairs: &'static [usize],
}

const QUICK: Settings = Settings {
    samples: 300,
    window: Duration::from_millis(700),
    pipelined_pairs: &[1, 32, 256],
    one_at_a_time_pairs: &[32],
    idle_sessions: &[300],
    hash_window: Duration::from_millis(700),
    sqlite_pairs: &[],
    postgres_pairs: &[32],
    postgres_one_at_a_time_pairs: &[],
};
const FULL: Settings = Settings {
    samples: 5000,
    window: Duration::from_secs(3),
    pipelined_pairs: &[1, 4, 16, 32, 64, 256, 1024],
    one_at_a_time_pairs: &[1, 16, 32, 256],
    idle_sessions: &[1000, 5000, 15_000],
    hash_window: Duration::from_secs(3),
    sqlite_pairs: &[32, 256],
    postgres_pairs: &[32, 256],
    postgres_one_at_a_time_pairs: &[1, 32],
};

/// Server processes of the PostgreSQL cluster rows.
const CLUSTER_NODES: usize = 3;
/// The store of the PostgreSQL cluster rows, in the report.
const POSTGRES_CLUSTER: &str = "postgres x3";
/// The `NOTIFY` ceiling's configurations: (sending connections,
/// notifications per commit; 0 is the control, commits without one).
const NOTIFY_CONFIGURATIONS: &[(usize, usize)] =
    &[(1, 1), (4, 1), (16, 1), (4, 16), (16, 16), (16, 0)];

/// Where the load connects: a server's address, with what to trust if it
/// serves TLS.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<ClientTls>,
}

impl Target {
    fn plain(addr: SocketAddr) -> Self {
        Self { addr, tls: None }
    }

    /// The transport's name in the report: `socket`, or `socket+tls`.
    fn label<C: Dial>(&self) -> String {
        match self.tls {
            Some(_) => format!("{}+tls", C::NAME),
            None => C::NAME.to_string(),
        }
    }
}

/// A client library the benchmark can open.
trait Dial: ChatClient + Sized + Send + 'static {
    const NAME: &'static str;
    fn dial(target: &Target) -> impl Future<Output = Self> + Send;
}

impl Dial for SocketClient {
    const NAME: &'static str = "socket";
    async fn dial(target: &Target) -> Self {
        SocketClient::connect_with(target.addr, target.tls.clone())
            .await
            .expect("socket connect")
    }
}

impl Dial for GrpcClient {
    const NAME: &'static str = "grpc";
    async fn dial(target: &Target) -> Self {
        GrpcClient::connect_with(&target.addr.to_string(), target.tls.clone())
            .await
            .expect("grpc connect")
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

fn latency(transport: &str, store: &str, op: &str, h: &Histogram<u64>) -> Latency {
    Latency {
        transport: transport.into(),
        store: store.into(),
        op: op.into(),
        samples: h.len(),
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        p999_us: h.value_at_quantile(0.999) as f64,
    }
}

/// A 300-byte body that starts with `stamp` (µs since the run's epoch).
fn body(stamp: u64) -> String {
    let mut body = format!("{stamp:020}");
    while body.len() + 2 <= MESSAGE_BYTES {
        body.push('é');
    }
    body
}

fn stamp_of(body: &str) -> Option<u64> {
    body.get(..20)?.parse().ok()
}

async fn next_message<C: ChatClient>(client: &mut C) -> chat_core::Message {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), client.next_push()).await {
            Ok(Some(Push::Message(m))) => return m,
            Ok(Some(_)) => continue,
            other => panic!("no message: {other:?}"),
        }
    }
}

/// Per-operation round trips, one at a time.
async fn latencies<C: Dial>(
    target: &Target,
    store: &str,
    tag: &str,
    samples: usize,
) -> Vec<Latency> {
    let name = target.label::<C>();
    let mut a = C::dial(target).await;
    let mut b = C::dial(target).await;
    let mut out = Vec::new();

    let mut h = histogram();
    for n in 0..samples {
        let t = Instant::now();
        a.create(&format!("{tag}c{n}"), "password1")
            .await
            .expect("create");
        h.record(micros(t.elapsed())).ok();
        a.logout().await.expect("logout");
    }
    out.push(latency(&name, store, "create", &h));

    let mut h = histogram();
    for _ in 0..samples {
        let t = Instant::now();
        a.login(&format!("{tag}c0"), "password1")
            .await
            .expect("login");
        h.record(micros(t.elapsed())).ok();
        a.logout().await.expect("logout");
    }
    out.push(latency(&name, store, "login", &h));

    let mut h = histogram();
    for _ in 0..samples {
        let t = Instant::now();
        a.list(&format!("^{tag}c1"), 10).await.expect("list");
        h.record(micros(t.elapsed())).ok();
    }
    out.push(latency(&name, store, "list", &h));

    a.create(&format!("{tag}alice"), "password1")
        .await
        .expect("create alice");
    let bob = format!("{tag}bob");
    b.create(&bob, "password1").await.expect("create bob");
    let (mut send, mut deliver) = (histogram(), histogram());
    let epoch = Instant::now();
    for n in 0..samples {
        let t = Instant::now();
        a.send(&bob, &body(micros(epoch.elapsed())))
            .await
            .expect("send");
        send.record(micros(t.elapsed())).ok();
        let m = next_message(&mut b).await;
        deliver.record(micros(t.elapsed())).ok();
        if n % 64 == 63 {
            b.ack(m.id).await.expect("ack");
        }
    }
    out.push(latency(&name, store, "send", &send));
    out.push(latency(&name, store, "send → delivery", &deliver));

    // The same, while other clients log in and out as fast as they can:
    // every login hashes a password (argon2id, on the blocking pool, as
    // many at once as the server allows), and delivery must not wait for
    // that.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut storm = Vec::new();
    for i in 0..LOGIN_STORM_CLIENTS {
        let mut c = C::dial(target).await;
        let name = format!("{tag}storm{i}");
        c.create(&name, "password1").await.expect("create");
        c.logout().await.expect("logout");
        let stop = std::sync::Arc::clone(&stop);
        storm.push(tokio::spawn(async move {
            let mut logins = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.login(&name, "password1").await.expect("storm login");
                c.logout().await.expect("storm logout");
                logins += 1;
            }
            logins
        }));
    }
    let mut deliver = histogram();
    let started = Instant::now();
    let mut n = 0;
    // At least `samples`, and for long enough that the storm is under way.
    while n < samples || started.elapsed() < LOGIN_STORM_MIN {
        n += 1;
        let t = Instant::now();
        a.send(&bob, &body(micros(epoch.elapsed())))
            .await
            .expect("send");
        let m = next_message(&mut b).await;
        deliver.record(micros(t.elapsed())).ok();
        if n % 64 == 63 {
            b.ack(m.id).await.expect("ack");
        }
    }
    let window = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut logins = 0;
    for task in storm {
        logins += task.await.expect("storm task");
    }
    eprintln!(
        "    {name} / {store}: {logins} logins in {:.1} s during the login-storm samples",
        window.as_secs_f64()
    );
    out.push(latency(
        &name,
        store,
        "send → delivery (login storm)",
        &deliver,
    ));
    out
}

/// Clients logging in and out in a loop while the login-storm latency is
/// measured.
const LOGIN_STORM_CLIENTS: usize = 8;
/// Shortest login-storm measurement.
const LOGIN_STORM_MIN: Duration = Duration::from_secs(2);

/// A raw TCP echo of the same payload: the physical limit.
async fn raw_latency(addr: SocketAddr, samples: usize) -> Latency {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect echo");
    stream.set_nodelay(true).ok();
    let payload = vec![b'x'; MESSAGE_BYTES];
    let mut back = vec![0u8; MESSAGE_BYTES];
    let mut h = histogram();
    for _ in 0..samples {
        let t = Instant::now();
        stream.write_all(&payload).await.expect("write");
        stream.read_exact(&mut back).await.expect("read");
        h.record(micros(t.elapsed())).ok();
    }
    latency("raw", "-", "echo round trip", &h)
}

/// Messages each pipelining sender keeps in flight: a send waits until
/// fewer than this many of its messages are still on their way to its
/// recipient.
const WINDOW: usize = 32;

/// The server processes a load runs against, and where it connects: one
/// server, or several nodes on one PostgreSQL database (pair i's sender
/// connects to node i, its recipient to node i + 1, so that every message
/// crosses processes); and whether the database's CPU is counted with
/// theirs.
struct Servers<'a> {
    processes: Vec<&'a ServerProcess>,
    targets: Vec<Target>,
    database: bool,
}

impl<'a> Servers<'a> {
    /// One server, on a store of its own.
    fn one(server: &'a ServerProcess, target: &Target) -> Self {
        Self {
            processes: vec![server],
            targets: vec![target.clone()],
            database: false,
        }
    }

    /// Nodes on one PostgreSQL database, served in plain text.
    fn on_database(nodes: &'a [ServerProcess]) -> Self {
        Self {
            processes: nodes.iter().collect(),
            targets: nodes.iter().map(|n| Target::plain(n.addr())).collect(),
            database: true,
        }
    }

    /// Where pair `i`'s sender and recipient connect.
    fn pair(&self, i: usize) -> (&Target, &Target) {
        let n = self.targets.len();
        (&self.targets[i % n], &self.targets[(i + 1) % n])
    }

    /// The transport's name in the report.
    fn label<C: Dial>(&self) -> String {
        self.targets[0].label::<C>()
    }
}

/// Reads CPU time of the servers, of this process (the load generator)
/// and, for rows on PostgreSQL, of the database, over a measured window.
struct Meter {
    started: Instant,
    server: f64,
    generator: f64,
    database: Option<DatabaseCpu>,
    threads: Vec<std::collections::HashMap<u32, (String, u64)>>,
}

impl Meter {
    fn start(servers: &[&ServerProcess], database: bool) -> Self {
        Self {
            started: Instant::now(),
            server: servers.iter().map(|s| s.cpu_seconds()).sum(),
            generator: cpu_seconds_of(std::process::id()),
            database: database.then(DatabaseCpu::now),
            threads: servers.iter().map(|s| thread_ticks(s.pid())).collect(),
        }
    }

    /// What the window used (see [`Used`]).
    fn read(&self, servers: &[&ServerProcess]) -> Used {
        let seconds = self.started.elapsed().as_secs_f64();
        let busiest = servers
            .iter()
            .zip(&self.threads)
            .map(|(s, before)| busiest_thread(before, &thread_ticks(s.pid()), seconds))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or_default();
        Used {
            seconds,
            server: servers.iter().map(|s| s.cpu_seconds()).sum::<f64>() - self.server,
            generator: cpu_seconds_of(std::process::id()) - self.generator,
            database: self.database.as_ref().map(DatabaseCpu::seconds_since),
            processes: servers.len(),
            busiest,
        }
    }
}

/// Wall seconds of a measured window, the CPU seconds the servers (all of
/// them), the generator and the database (when counted) used in it, and
/// the servers' busiest thread.
struct Used {
    seconds: f64,
    server: f64,
    generator: f64,
    database: Option<f64>,
    processes: usize,
    busiest: (String, f64),
}

/// One throughput row's figures.
struct Row<'a> {
    transport: String,
    store: &'a str,
    mode: &'a str,
    window: usize,
    pairs: usize,
    delivered: u64,
    latency: Histogram<u64>,
    meter: Used,
}

impl Row<'_> {
    fn finish(self) -> Throughput {
        let Used {
            seconds,
            server,
            generator,
            database,
            processes,
            busiest,
        } = self.meter;
        let seconds = seconds.max(1e-9);
        let (server_cores, generator_cores) = (server / seconds, generator / seconds);
        let database_cores = database.map(|d| d / seconds);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let per_message = |cpu: f64| {
            if self.delivered > 0 {
                cpu * 1e6 / self.delivered as f64
            } else {
                0.0
            }
        };
        Throughput {
            transport: self.transport,
            store: self.store.into(),
            mode: self.mode.into(),
            window: self.window,
            pairs: self.pairs,
            delivered: self.delivered,
            per_second: self.delivered as f64 / seconds,
            p50_us: self.latency.value_at_quantile(0.5) as f64,
            p99_us: self.latency.value_at_quantile(0.99) as f64,
            server_cpu_us_per_msg: per_message(server),
            server_cores,
            generator_cores,
            bottleneck: chat_bench::bottleneck(
                server_cores,
                generator_cores,
                database_cores.unwrap_or(0.0),
                busiest.1,
                cores,
            )
            .into(),
            server_busiest_thread: busiest,
            processes,
            database_cpu_us_per_msg: database.map(per_message),
            database_cores,
        }
    }
}

/// Logged-in senders and recipients for `pairs` pairs (sender i writes to
/// recipient i, `{tag}r{i}`; each connected where [`Servers::pair`] says).
async fn pair_up<C: Dial>(servers: &Servers<'_>, tag: &str, pairs: usize) -> (Vec<C>, Vec<C>) {
    let mut senders = Vec::new();
    let mut recipients = Vec::new();
    for i in 0..pairs {
        let (sender_at, recipient_at) = servers.pair(i);
        let mut r = C::dial(recipient_at).await;
        r.create(&format!("{tag}r{i}"), "password1")
            .await
            .expect("create recipient");
        recipients.push(r);
        let mut s = C::dial(sender_at).await;
        s.create(&format!("{tag}s{i}"), "password1")
            .await
            .expect("create sender");
        senders.push(s);
    }
    (senders, recipients)
}

/// N pairs for the window, pipelined: each sender keeps up to [`WINDOW`]
/// messages in flight (a place frees when its recipient gets one), reading
/// its receipts as they come; recipients acknowledge in batches
/// (`ack_later`). Delivered messages per second, delivery latency, and
/// both sides' CPU.
async fn pipelined<C: Dial>(
    servers: &Servers<'_>,
    store: &str,
    tag: &str,
    pairs: usize,
    window: Duration,
) -> Throughput {
    let (senders, recipients) = pair_up::<C>(servers, tag, pairs).await;
    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let meter = Meter::start(&servers.processes, servers.database);
    let deadline = Instant::now() + window;
    let mut receivers = Vec::new();
    let mut tasks = Vec::new();
    for (i, (mut s, mut r)) in senders.into_iter().zip(recipients).enumerate() {
        let places = Arc::new(tokio::sync::Semaphore::new(WINDOW));
        let delivered = Arc::clone(&delivered);
        let freed = Arc::clone(&places);
        receivers.push(tokio::spawn(async move {
            let mut h = histogram();
            while let Ok(Some(push)) = tokio::time::timeout_at(deadline.into(), r.next_push()).await
            {
                if let Push::Message(m) = push {
                    arrived(&mut h, epoch, m.body.as_str(), &delivered);
                    freed.add_permits(1);
                    let _ = r.ack_later(m.id).await;
                }
            }
            let _ = r.flush_acks().await;
            h
        }));
        let to = format!("{tag}r{i}");
        tasks.push(tokio::spawn(async move {
            while let Ok(Ok(place)) =
                tokio::time::timeout_at(deadline.into(), places.acquire()).await
            {
                place.forget();
                let stamp = micros(epoch.elapsed());
                if s.send_pipelined(&to, &body(stamp)).await.is_err() {
                    break;
                }
                while s.in_flight() >= WINDOW {
                    if s.next_receipt().await.is_err() {
                        return;
                    }
                }
            }
        }));
    }
    let (count, meter, latency) = end_of_window(
        &servers.processes,
        &meter,
        deadline,
        &delivered,
        receivers,
        tasks,
    )
    .await;
    Row {
        transport: servers.label::<C>(),
        store,
        mode: "pipelined",
        window: WINDOW,
        pairs,
        delivered: count,
        latency,
        meter,
    }
    .finish()
}

/// N pairs for the window, one send at a time: each send waits for its
/// answer; recipients acknowledge every 64th message and wait for that.
/// (The load generator of earlier reports: it measures round trips as
/// much as the server.)
async fn one_at_a_time<C: Dial>(
    servers: &Servers<'_>,
    store: &str,
    tag: &str,
    pairs: usize,
    window: Duration,
) -> Throughput {
    let (senders, recipients) = pair_up::<C>(servers, tag, pairs).await;
    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let meter = Meter::start(&servers.processes, servers.database);
    let deadline = Instant::now() + window;
    let mut receivers = Vec::new();
    for mut r in recipients {
        let delivered = Arc::clone(&delivered);
        receivers.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut last = 0;
            while let Ok(Some(push)) = tokio::time::timeout_at(deadline.into(), r.next_push()).await
            {
                if let Push::Message(m) = push {
                    arrived(&mut h, epoch, m.body.as_str(), &delivered);
                    last = m.id;
                    if last % 64 == 0 {
                        let _ = r.ack(last).await;
                    }
                }
            }
            if last > 0 {
                let _ = r.ack(last).await;
            }
            h
        }));
    }
    let mut tasks = Vec::new();
    for (i, mut s) in senders.into_iter().enumerate() {
        let to = format!("{tag}r{i}");
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if s.send(&to, &body(micros(epoch.elapsed()))).await.is_err() {
                    break;
                }
            }
        }));
    }
    let (count, meter, latency) = end_of_window(
        &servers.processes,
        &meter,
        deadline,
        &delivered,
        receivers,
        tasks,
    )
    .await;
    Row {
        transport: servers.label::<C>(),
        store,
        mode: "one at a time",
        window: 1,
        pairs,
        delivered: count,
        latency,
        meter,
    }
    .finish()
}

/// Counts a delivered message and records its send → delivery latency
/// from the stamp its body starts with.
fn arrived(latency: &mut Histogram<u64>, epoch: Instant, body: &str, delivered: &AtomicU64) {
    if let Some(sent) = stamp_of(body) {
        latency
            .record(micros(epoch.elapsed()).saturating_sub(sent).max(1))
            .ok();
    }
    delivered.fetch_add(1, Ordering::Relaxed);
}

/// Waits out a load's window and reads what it counted: messages delivered
/// and what the server and the generator used, both at the deadline; then
/// every recipient's latency histogram (receivers and senders stop by
/// themselves at the deadline).
async fn end_of_window(
    servers: &[&ServerProcess],
    meter: &Meter,
    deadline: Instant,
    delivered: &AtomicU64,
    receivers: Vec<tokio::task::JoinHandle<Histogram<u64>>>,
    senders: Vec<tokio::task::JoinHandle<()>>,
) -> (u64, Used, Histogram<u64>) {
    tokio::time::sleep_until(deadline.into()).await;
    let count = delivered.load(Ordering::Relaxed);
    let used = meter.read(servers);
    let mut latency = histogram();
    for r in receivers {
        latency.add(r.await.expect("receiver")).ok();
    }
    for s in senders {
        s.await.ok();
    }
    (count, used, latency)
}

/// A connection to the minimal relay ([`chat_bench::relay`]), named and
/// answered.
async fn relay_connect(
    addr: SocketAddr,
    name: &str,
) -> Framed<tokio::net::TcpStream, LengthDelimitedCodec> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect relay");
    stream.set_nodelay(true).ok();
    // As `bare_hello`: no TIME_WAIT left behind.
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .ok();
    let mut framed = Framed::new(stream, LengthDelimitedCodec::new());
    framed
        .send(bytes::Bytes::copy_from_slice(name.as_bytes()))
        .await
        .expect("name");
    framed
        .next()
        .await
        .expect("relay answer")
        .expect("relay answer");
    framed
}

/// The pipelined load on the minimal relay: the floor for every
/// transport's pipelined rows.
async fn relay_throughput(server: &ServerProcess, pairs: usize, window: Duration) -> Throughput {
    let addr = server.addr();
    let mut conns = Vec::new();
    for i in 0..pairs {
        let r = relay_connect(addr, &format!("r{i}")).await;
        let s = relay_connect(addr, &format!("s{i}")).await;
        conns.push((s, r));
    }
    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let meter = Meter::start(&[server], false);
    let deadline = Instant::now() + window;
    let mut receivers = Vec::new();
    let mut tasks = Vec::new();
    for (i, (mut s, mut r)) in conns.into_iter().enumerate() {
        let places = Arc::new(tokio::sync::Semaphore::new(WINDOW));
        let freed = Arc::clone(&places);
        let delivered = Arc::clone(&delivered);
        receivers.push(tokio::spawn(async move {
            let mut h = histogram();
            while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline.into(), r.next()).await
            {
                arrived(
                    &mut h,
                    epoch,
                    std::str::from_utf8(&frame).unwrap_or_default(),
                    &delivered,
                );
                freed.add_permits(1);
            }
            h
        }));
        let to = format!("r{i}");
        tasks.push(tokio::spawn(async move {
            loop {
                let place = match places.try_acquire() {
                    Ok(place) => place,
                    Err(_) => {
                        // Out of places: what is written goes out while
                        // this sender waits.
                        if SinkExt::<bytes::Bytes>::flush(&mut s).await.is_err() {
                            return;
                        }
                        match tokio::time::timeout_at(deadline.into(), places.acquire()).await {
                            Ok(Ok(place)) => place,
                            _ => return,
                        }
                    }
                };
                place.forget();
                let text = body(micros(epoch.elapsed()));
                let mut frame = Vec::with_capacity(1 + to.len() + text.len());
                frame.push(to.len() as u8);
                frame.extend_from_slice(to.as_bytes());
                frame.extend_from_slice(text.as_bytes());
                if s.feed(bytes::Bytes::from(frame)).await.is_err() {
                    return;
                }
            }
        }));
    }
    let (count, meter, latency) =
        end_of_window(&[server], &meter, deadline, &delivered, receivers, tasks).await;
    Row {
        transport: "relay".into(),
        store: "-",
        mode: "pipelined",
        window: WINDOW,
        pairs,
        delivered: count,
        latency,
        meter,
    }
    .finish()
}

/// The raw echo: N connections ping-ponging the payload (the floor for
/// the one-at-a-time rows).
async fn raw_throughput(server: &ServerProcess, pairs: usize, window: Duration) -> Throughput {
    let meter = Meter::start(&[server], false);
    let deadline = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..pairs {
        let addr = server.addr();
        tasks.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr)
                .await
                .expect("connect echo");
            stream.set_nodelay(true).ok();
            let payload = vec![b'x'; MESSAGE_BYTES];
            let mut back = vec![0u8; MESSAGE_BYTES];
            let mut h = histogram();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                if stream.write_all(&payload).await.is_err()
                    || stream.read_exact(&mut back).await.is_err()
                {
                    break;
                }
                h.record(micros(t.elapsed())).ok();
                n += 1;
            }
            (n, h)
        }));
    }
    let mut count = 0;
    let mut latency = histogram();
    for t in tasks {
        let (n, th) = t.await.expect("echo task");
        count += n;
        latency.add(th).ok();
    }
    Row {
        transport: "raw".into(),
        store: "-",
        mode: "ping-pong",
        window: 1,
        pairs,
        delivered: count,
        latency,
        meter: meter.read(&[server]),
    }
    .finish()
}

/// Connections per second: `CONNECTORS` clients opening a connection,
/// completing its handshake and dropping it, for the window.
async fn connects<F, Fut>(
    server: &ServerProcess,
    transport: String,
    window: Duration,
    open: F,
) -> Connects
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    const CONNECTORS: usize = 8;
    let meter = Meter::start(&[server], false);
    let deadline = Instant::now() + window;
    let tasks: Vec<_> = (0..CONNECTORS)
        .map(|_| {
            let open = open.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    open().await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("connector");
    }
    let Used {
        seconds,
        server: server_cpu,
        generator,
        ..
    } = meter.read(&[server]);
    Connects {
        server_cores: server_cpu / seconds,
        generator_cores: generator / seconds,
        transport,
        clients: CONNECTORS,
        connects: total,
        per_second: total as f64 / seconds,
        server_cpu_us_per_connect: if total > 0 {
            server_cpu * 1e6 / total as f64
        } else {
            0.0
        },
    }
}

/// A socket-protocol handshake with nothing else: connect, HELLO with a send
/// key, read the WELCOME.
async fn bare_hello(addr: SocketAddr) {
    use chat_socket::codec::ClientCodec;
    use chat_socket::frame::{OLDEST_VERSION, feature};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect socket");
    stream.set_nodelay(true).ok();
    // Closed with a reset: thousands of connections in TIME_WAIT would make
    // every later connect search longer for a free port.
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .ok();
    let mut framed = Framed::new(stream, ClientCodec::new(1 << 16));
    framed
        .send(chat_socket::ClientFrame::Hello {
            highest: chat_socket::PROTOCOL_VERSION,
            lowest: OLDEST_VERSION,
            features: feature::IDEMPOTENT_SEND,
            send_key: Some([7; 12]),
        })
        .await
        .expect("hello");
    match framed.next().await {
        Some(Ok(chat_socket::ServerFrame::Welcome { .. })) => {}
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// [`connects`] with a transport's client library.
async fn client_connects<C: Dial>(
    server: &ServerProcess,
    target: &Target,
    window: Duration,
) -> Connects {
    let target = target.clone();
    let label = target.label::<C>();
    connects(server, label, window, move || {
        let target = target.clone();
        async move {
            drop(C::dial(&target).await);
        }
    })
    .await
}

/// Server RSS per idle logged-in session on a fresh server, and a small
/// pipelined load's figures while they are held. The accounts are created
/// (and logged out) first, so the RSS growth is the sessions' alone.
async fn sessions<C: Dial>(
    served: Served,
    store: &str,
    data: &std::path::Path,
    count: usize,
) -> Sessions {
    let arg = store_arg(store, &data.join(format!("{}-idle-{count}", C::NAME)));
    let server = chat_bench::start_server(served, &arg, Passwords::Cheap)
        .await
        .expect("start server");
    let target = Target::plain(server.addr());
    // Accounts first, from a few connections at once.
    const MAKERS: usize = 16;
    let makers: Vec<_> = (0..MAKERS)
        .map(|m| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut c = C::dial(&target).await;
                for i in (m..count).step_by(MAKERS) {
                    c.create(&format!("idle{i}"), "password1")
                        .await
                        .expect("create idle");
                    c.logout().await.expect("logout");
                }
            })
        })
        .collect();
    for maker in makers {
        maker.await.expect("account maker");
    }
    // Let the store's writes and the allocator settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_bytes();
    let opening = Arc::new(tokio::sync::Semaphore::new(64));
    let opened: Vec<_> = (0..count)
        .map(|i| {
            let target = target.clone();
            let opening = Arc::clone(&opening);
            tokio::spawn(async move {
                let _turn = opening.acquire().await.expect("semaphore");
                let mut c = C::dial(&target).await;
                c.login(&format!("idle{i}"), "password1")
                    .await
                    .expect("login idle");
                c
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(count);
    for c in opened {
        clients.push(c.await.expect("idle session"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_bytes();
    let servers = Servers::one(&server, &target);
    let load = pipelined::<C>(&servers, store, "held", 16, Duration::from_secs(1)).await;
    drop(clients);
    let delta = after.saturating_sub(before);
    Sessions {
        transport: C::NAME.into(),
        store: store.into(),
        sessions: count,
        rss_delta: delta,
        per_session: delta as f64 / count as f64,
        load_per_second: load.per_second,
        load_p99_us: load.p99_us,
    }
}

/// The server's store argument: `memory`, a data directory (`durable`:
/// the default log store) or `sqlite:` and one.
fn store_arg(store: &str, dir: &std::path::Path) -> String {
    match store {
        "memory" => "memory".to_string(),
        "sqlite" => format!("sqlite:{}", dir.to_string_lossy()),
        _ => dir.to_string_lossy().to_string(),
    }
}

/// Logins per second (each checks a password: an argon2id hash), 16
/// concurrent clients for the window.
async fn logins<C: Dial>(target: &Target, window: Duration) -> Logins {
    const CLIENTS: usize = 16;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut c = C::dial(target).await;
        c.create(&format!("login{i}"), "password1")
            .await
            .expect("create");
        c.logout().await.expect("logout");
        clients.push(c);
    }
    let start = Instant::now();
    let deadline = start + window;
    let tasks = clients.into_iter().enumerate().map(|(i, mut c)| {
        tokio::spawn(async move {
            let name = format!("login{i}");
            let mut n = 0u64;
            while Instant::now() < deadline {
                c.login(&name, "password1").await.expect("login");
                c.logout().await.expect("logout");
                n += 1;
            }
            n
        })
    });
    let mut total = 0;
    for t in futures::future::join_all(tasks).await {
        total += t.expect("login task");
    }
    Logins {
        transport: target.label::<C>(),
        clients: CLIENTS,
        logins: total,
        per_second: total as f64 / start.elapsed().as_secs_f64(),
    }
}

async fn wire<C: Dial>(addr: SocketAddr) -> Vec<Bytes> {
    chat_conformance::wire::measure(addr, |a| {
        let target = Target::plain(a);
        async move { C::dial(&target).await }
    })
    .await
    .into_iter()
    .map(|c| Bytes {
        transport: C::NAME.into(),
        op: c.operation.into(),
        up: c.up,
        down: c.down,
    })
    .collect()
}

fn served_for<C: Dial>() -> Served {
    if C::NAME == "grpc" {
        Served::Grpc
    } else {
        Served::Socket
    }
}

async fn transport<C: Dial>(
    report: &mut Report,
    settings: &Settings,
    data: &std::path::Path,
) -> anyhow::Result<()> {
    let served = served_for::<C>();
    for store in ["memory", "durable"] {
        let arg = store_arg(store, &data.join(format!("{}-{store}", C::NAME)));
        let server = chat_bench::start_server(served, &arg, Passwords::Cheap).await?;
        let target = Target::plain(server.addr());
        loads::<C>(report, settings, &server, &target, store).await;
        drop(server);
        if store == "durable" && !settings.sqlite_pairs.is_empty() {
            // The SQLite store (the durable default before the log store),
            // pipelined, for comparison.
            let arg = store_arg("sqlite", &data.join(format!("{}-sqlite", C::NAME)));
            let server = chat_bench::start_server(served, &arg, Passwords::Cheap).await?;
            let target = Target::plain(server.addr());
            let servers = Servers::one(&server, &target);
            for (run, &pairs) in settings.sqlite_pairs.iter().enumerate() {
                eprintln!("  {} / sqlite: pipelined, {pairs} pairs", C::NAME);
                let tag = format!("q{run}");
                report
                    .throughput
                    .push(pipelined::<C>(&servers, "sqlite", &tag, pairs, settings.window).await);
            }
        }
        for &count in settings.idle_sessions {
            eprintln!("  {} / {store}: {count} idle sessions", C::NAME);
            report
                .sessions
                .push(sessions::<C>(served, store, data, count).await);
        }
    }
    tls_rows::<C>(report, settings, served).await?;
    // Fresh servers, so nothing earlier is in the lists.
    eprintln!("  {}: bytes per operation", C::NAME);
    let fresh = chat_bench::start_server(served, "memory", Passwords::Cheap).await?;
    report.bytes.extend(wire::<C>(fresh.addr()).await);
    drop(fresh);
    // Logins with the server's real password hashing.
    eprintln!("  {}: logins", C::NAME);
    let real = chat_bench::start_server(served, "memory", Passwords::Real).await?;
    report
        .logins
        .push(logins::<C>(&Target::plain(real.addr()), settings.window).await);
    Ok(())
}

/// Latencies, throughput at every pair count in both modes and (memory
/// store only) connections per second against one running server.
async fn loads<C: Dial>(
    report: &mut Report,
    settings: &Settings,
    server: &ServerProcess,
    target: &Target,
    store: &str,
) {
    let name = target.label::<C>();
    let servers = Servers::one(server, target);
    eprintln!("  {name} / {store}: latency");
    report
        .latency
        .extend(latencies::<C>(target, store, "l", settings.samples).await);
    for (run, &pairs) in settings.pipelined_pairs.iter().enumerate() {
        eprintln!("  {name} / {store}: pipelined, {pairs} pairs");
        let tag = format!("p{run}");
        report
            .throughput
            .push(pipelined::<C>(&servers, store, &tag, pairs, settings.window).await);
    }
    for (run, &pairs) in settings.one_at_a_time_pairs.iter().enumerate() {
        eprintln!("  {name} / {store}: one at a time, {pairs} pairs");
        let tag = format!("o{run}");
        report
            .throughput
            .push(one_at_a_time::<C>(&servers, store, &tag, pairs, settings.window).await);
    }
    if store == "memory" {
        eprintln!("  {name}: connects");
        report
            .connects
            .push(client_connects::<C>(server, target, settings.window).await);
    }
}

/// The memory-store rows again over TLS (certificates made now), to be
/// read as ratios to the plaintext rows of the same run.
async fn tls_rows<C: Dial>(
    report: &mut Report,
    settings: &Settings,
    served: Served,
) -> anyhow::Result<()> {
    let pki = TestPki::new();
    let server = chat_bench::start_server_tls(
        served,
        "memory",
        Passwords::Cheap,
        &pki.cert_path(),
        &pki.key_path(),
    )
    .await?;
    let target = Target {
        addr: server.addr(),
        tls: Some(pki.client()),
    };
    loads::<C>(report, settings, &server, &target, "memory").await;
    Ok(())
}

fn find<'a>(report: &'a Report, transport: &str, store: &str, op: &str) -> Option<&'a Latency> {
    report
        .latency
        .iter()
        .find(|l| l.transport == transport && l.store == store && l.op == op)
}

fn print(report: &Report) {
    println!(
        "\n# Protocol comparison ({} mode) on {} × {}",
        if report.quick { "quick" } else { "full" },
        report.machine.cores,
        report.machine.cpu
    );
    let raw = find(report, "raw", "-", "echo round trip");
    println!("\n## Round-trip latency, idle, µs (p50 / p99 / p99.9)");
    println!(
        "{:<11} {:<8} {:<30} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "transport", "store", "op", "p50", "p99", "p99.9", "p50 ÷ raw", "p99 ÷ raw"
    );
    for l in &report.latency {
        let (r50, r99) = raw
            .map(|r| (l.p50_us / r.p50_us, l.p99_us / r.p99_us))
            .unwrap_or((0.0, 0.0));
        println!(
            "{:<11} {:<8} {:<30} {:>8.0} {:>8.0} {:>8.0} {:>9.2}× {:>9.2}×",
            l.transport, l.store, l.op, l.p50_us, l.p99_us, l.p999_us, r50, r99
        );
    }
    println!(
        "\n## Throughput (delivered messages/s; delivery latency under load, µs; server CPU µs per \
         delivered message; cores used by the server and by the load generator)"
    );
    println!(
        "{:<11} {:<8} {:<13} {:>5} {:>9} {:>7} {:>7} {:>8} {:>6} {:>6} {:<9} {:>9} {:>9}",
        "transport",
        "store",
        "mode",
        "pairs",
        "msgs/s",
        "p50",
        "p99",
        "cpu/msg",
        "srv",
        "gen",
        "limit",
        "÷ floor",
        "cpu ÷"
    );
    // The PostgreSQL rows have a table of their own (below), with the
    // database's CPU.
    for t in report
        .throughput
        .iter()
        .filter(|t| t.database_cpu_us_per_msg.is_none())
    {
        // Pipelined rows against the relay, the others against the echo.
        let floor_name = if t.mode == "pipelined" {
            "relay"
        } else {
            "raw"
        };
        let floor = report
            .throughput
            .iter()
            .find(|r| r.transport == floor_name && r.pairs == t.pairs);
        let (ft, fc) = floor
            .map(|r| {
                (
                    t.per_second / r.per_second,
                    t.server_cpu_us_per_msg / r.server_cpu_us_per_msg,
                )
            })
            .unwrap_or((0.0, 0.0));
        println!(
            "{:<11} {:<8} {:<13} {:>5} {:>9.0} {:>7.0} {:>7.0} {:>8.2} {:>6.2} {:>6.2} {:<9} {:>8.2}× {:>8.2}×",
            t.transport,
            t.store,
            t.mode,
            t.pairs,
            t.per_second,
            t.p50_us,
            t.p99_us,
            t.server_cpu_us_per_msg,
            t.server_cores,
            t.generator_cores,
            t.bottleneck,
            ft,
            fc
        );
    }
    println!("(÷ floor: pipelined rows ÷ the relay's, others ÷ the raw echo's, same pairs)");
    postgres::print(report);
    print_ratios(report);
    println!("\n## Bytes on the wire per operation (up / down)");
    for b in &report.bytes {
        println!("{:<8} {:<28} {:>6} {:>6}", b.transport, b.op, b.up, b.down);
    }
    println!("\n## Idle sessions (RSS per session; a 16-pair pipelined load while held)");
    for s in &report.sessions {
        println!(
            "{:<8} {:<8} {:>6} sessions: {:>6.0} bytes each; load {:>8.0} msgs/s, p99 {:>7.0} µs",
            s.transport, s.store, s.sessions, s.per_session, s.load_per_second, s.load_p99_us
        );
    }
    println!("\n## Connections per second (connect and handshake)");
    for c in &report.connects {
        println!(
            "{:<20} {:>8.0}/s with {} clients, server CPU {:.0} µs each; cores: server {:.2}, generator {:.2}",
            c.transport,
            c.per_second,
            c.clients,
            c.server_cpu_us_per_connect,
            c.server_cores,
            c.generator_cores
        );
    }
    if let Some(sync) = report.sync_us {
        println!("\none 400-byte append and fdatasync alone: {sync:.0} µs");
    }
    println!("\n## Logins with the server's password hashing");
    if let Some(h) = &report.hash_cost {
        println!(
            "argon2id verification alone: {:.0} µs; at the server's {} at a time {:.0}/s, on every core {:.0}/s",
            h.verify_us, h.concurrent, h.configured_per_second, h.all_cores_per_second
        );
    }
    for l in &report.logins {
        let of = report
            .hash_cost
            .as_ref()
            .map(|h| {
                format!(
                    " ({:.0}% of the configured hashing, {:.0}% of every core's)",
                    100.0 * l.per_second / h.configured_per_second,
                    100.0 * l.per_second / h.all_cores_per_second
                )
            })
            .unwrap_or_default();
        println!(
            "{:<8} {:.0} logins/s with {} clients{of}",
            l.transport, l.per_second, l.clients
        );
    }
}

/// The ratios the targets are stated in, from rows of this run.
fn print_ratios(report: &Report) {
    let row = |transport: &str, store: &str, mode: &str, pairs: usize| {
        report.throughput.iter().find(|r| {
            r.transport == transport && r.store == store && r.mode == mode && r.pairs == pairs
        })
    };
    println!("\n## Ratios (pipelined rows, same run)");
    for pairs in settings_pairs(report) {
        let p = "pipelined";
        if let (Some(d), Some(m)) = (
            row("socket", "durable", p, pairs),
            row("socket", "memory", p, pairs),
        ) {
            println!(
                "socket durable ÷ memory, {pairs:>4} pairs: msgs/s {:.2}×, cpu/msg {:.2}×",
                d.per_second / m.per_second,
                d.server_cpu_us_per_msg / m.server_cpu_us_per_msg
            );
        }
        for store in ["memory", "durable"] {
            if let (Some(g), Some(s)) =
                (row("grpc", store, p, pairs), row("socket", store, p, pairs))
            {
                println!(
                    "gRPC ÷ socket ({store}), {pairs:>4} pairs: msgs/s {:.2}×, cpu/msg {:.2}×",
                    g.per_second / s.per_second,
                    g.server_cpu_us_per_msg / s.server_cpu_us_per_msg
                );
            }
        }
        for transport in ["socket", "grpc"] {
            if let (Some(t), Some(r)) = (
                row(transport, "memory", p, pairs),
                row("relay", "-", p, pairs),
            ) {
                println!(
                    "{transport} memory ÷ relay, {pairs:>4} pairs: msgs/s {:.2}×, cpu/msg {:.2}×",
                    t.per_second / r.per_second,
                    t.server_cpu_us_per_msg / r.server_cpu_us_per_msg
                );
            }
            let tls = format!("{transport}+tls");
            if let (Some(t), Some(r)) = (
                row(&tls, "memory", p, pairs),
                row(transport, "memory", p, pairs),
            ) {
                println!(
                    "{tls} ÷ {transport}, {pairs:>4} pairs: msgs/s {:.2}×, cpu/msg {:.2}×",
                    t.per_second / r.per_second,
                    t.server_cpu_us_per_msg / r.server_cpu_us_per_msg
                );
            }
        }
    }
    for store in ["memory", "durable"] {
        if let (Some(g), Some(s)) = (
            find(report, "grpc", store, "send → delivery"),
            find(report, "socket", store, "send → delivery"),
        ) {
            println!(
                "gRPC ÷ socket, idle send → delivery p50 ({store}): {:.2}×",
                g.p50_us / s.p50_us
            );
        }
    }
    let connects = |t: &str| report.connects.iter().find(|c| c.transport == t);
    if let Some(relay) = connects("relay") {
        for t in ["socket", "grpc", "socket+tls", "grpc+tls"] {
            if let Some(c) = connects(t) {
                println!(
                    "{t} connects ÷ relay's: {:.2}×",
                    c.per_second / relay.per_second
                );
            }
        }
    }
}

/// The pair counts the throughput rows were measured at, in order.
fn settings_pairs(report: &Report) -> Vec<usize> {
    let mut pairs: Vec<usize> = report.throughput.iter().map(|t| t.pairs).collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `CHAT_BENCH_PROFILE=<relay|raw|socket|grpc>/<memory|durable|sqlite|postgres>/<pairs>/<seconds>[/once]`:
/// runs that one throughput load alone (pipelined, or one at a time with
/// `/once`), for a profiler. It prints the server's pid, waits two seconds
/// (attach now, e.g. `perf record -p PID` or
/// `perf stat -e 'syscalls:sys_enter_*' -p PID`), runs the load, and prints
/// its figures. `postgres` is one server process on a fresh schema of
/// `CHAT_TEST_DATABASE_URL`'s database.
async fn profile(spec: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = spec.split('/').collect();
    let (transport, store, pairs, seconds, once) = match parts[..] {
        [t, st, p, s] => (t, st, p, s, false),
        [t, st, p, s, "once"] => (t, st, p, s, true),
        _ => anyhow::bail!(
            "CHAT_BENCH_PROFILE is transport/store/pairs/seconds[/once], e.g. socket/memory/256/10"
        ),
    };
    let pairs: usize = pairs.parse()?;
    let window = Duration::from_secs_f64(seconds.parse()?);
    let data = std::env::temp_dir().join(format!("chat-bench-profile-{}", std::process::id()));
    // Held until the end: the schema is dropped with it.
    let mut database = None;
    let store_arg = match store {
        "memory" | "durable" | "sqlite" => store_arg(store, &data),
        "postgres" => {
            let db = TestDatabase::create("CHAT_BENCH_PROFILE")
                .await
                .with_context(|| format!("the postgres store needs {URL_VARIABLE}"))?;
            let arg = format!("postgres:{}", postgres::plaintext(&db.url));
            database = Some(db);
            arg
        }
        other => anyhow::bail!("unknown store {other:?} (memory, durable, sqlite or postgres)"),
    };
    let served = match transport {
        "raw" => Served::Echo,
        "relay" => Served::Relay,
        "socket" => Served::Socket,
        "grpc" => Served::Grpc,
        other => anyhow::bail!("unknown transport {other:?} (relay, raw, socket or grpc)"),
    };
    let server = chat_bench::start_server(served, &store_arg, Passwords::Cheap).await?;
    println!(
        "server pid {} ({transport}/{store}, {pairs} pairs, {seconds} s)",
        server.pid()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let target = Target::plain(server.addr());
    let servers = Servers {
        database: database.is_some(),
        ..Servers::one(&server, &target)
    };
    let t = match (served, once) {
        (Served::Echo, _) => raw_throughput(&server, pairs, window).await,
        (Served::Relay, _) => relay_throughput(&server, pairs, window).await,
        (Served::Socket, false) => {
            pipelined::<SocketClient>(&servers, store, "p", pairs, window).await
        }
        (Served::Socket, true) => {
            one_at_a_time::<SocketClient>(&servers, store, "p", pairs, window).await
        }
        (Served::Grpc, false) => pipelined::<GrpcClient>(&servers, store, "p", pairs, window).await,
        (Served::Grpc, true) => {
            one_at_a_time::<GrpcClient>(&servers, store, "p", pairs, window).await
        }
    };
    let database_cpu = match (t.database_cpu_us_per_msg, t.database_cores) {
        (Some(per_message), Some(cores)) => {
            format!(", database CPU {per_message:.2} µs/message ({cores:.2} cores)")
        }
        _ => String::new(),
    };
    println!(
        "{} messages, {:.0}/s, delivery p50 {:.0} µs p99 {:.0} µs, server CPU {:.2} µs/message{database_cpu}, \
         cores: server {:.2} (busiest thread {} {:.2}), generator {:.2} ({})",
        t.delivered,
        t.per_second,
        t.p50_us,
        t.p99_us,
        t.server_cpu_us_per_msg,
        t.server_cores,
        t.server_busiest_thread.0,
        t.server_busiest_thread.1,
        t.generator_cores,
        t.bottleneck
    );
    drop(servers);
    server.kill().await;
    drop(database);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// `CHAT_BENCH_ONLY`: the part of the benchmark to run alone, if set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Only {
    /// The PostgreSQL rows, the durable rows they are compared to, and the
    /// `NOTIFY` ceiling.
    Postgres,
}

impl Only {
    fn from_env() -> anyhow::Result<Option<Self>> {
        match std::env::var("CHAT_BENCH_ONLY").ok().as_deref() {
            None | Some("") => Ok(None),
            Some("postgres") => Ok(Some(Only::Postgres)),
            Some(other) => anyhow::bail!("CHAT_BENCH_ONLY={other:?}: the one part is `postgres`"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    chat_bench::serve_if_asked();
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` runs every bench target with its arguments; a plain
    // `--bench` is cargo's, a `--list` is libtest's discovery: nothing to do.
    if args.iter().any(|a| a == "--list") {
        return Ok(());
    }
    let quick =
        args.iter().any(|a| a == "--quick") || std::env::var_os("CHAT_BENCH_QUICK").is_some();
    let settings = if quick { &QUICK } else { &FULL };
    let only = Only::from_env()?;
    // Thousands of idle sessions need as many descriptors on this side too.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("chat-bench-load")
        .build()?;
    if let Ok(spec) = std::env::var("CHAT_BENCH_PROFILE") {
        return runtime.block_on(profile(&spec));
    }
    let with_database = postgres::database_configured()?;
    if only == Some(Only::Postgres) && !with_database {
        anyhow::bail!("CHAT_BENCH_ONLY=postgres needs {URL_VARIABLE}");
    }
    let data = std::env::temp_dir().join(format!("chat-bench-{}", std::process::id()));
    let mut report = Report {
        date: today(),
        machine: Machine::describe(),
        quick,
        latency: Vec::new(),
        throughput: Vec::new(),
        bytes: Vec::new(),
        sessions: Vec::new(),
        logins: Vec::new(),
        hash_cost: None,
        connects: Vec::new(),
        sync_us: Some(chat_bench::measure_sync(&data, 200)?),
        notify: None,
        skipped: Vec::new(),
        only: only.map(|_| "postgres".to_string()),
    };
    if !with_database {
        report.skipped.push(postgres::SKIPPED.into());
    }
    if only.is_none() {
        eprintln!("argon2id alone");
        report.hash_cost = Some(chat_bench::measure_hash_cost(settings.hash_window)?);
    }
    runtime.block_on(async {
        if only.is_none() {
            floors_and_transports(&mut report, settings, &data).await?;
        } else {
            eprintln!("durable rows to compare the PostgreSQL rows with");
            postgres::durable_rows::<SocketClient>(&mut report, settings, &data).await?;
            postgres::durable_rows::<GrpcClient>(&mut report, settings, &data).await?;
        }
        if with_database {
            eprintln!("PostgreSQL");
            postgres::rows::<SocketClient>(&mut report, settings).await?;
            postgres::rows::<GrpcClient>(&mut report, settings).await?;
            eprintln!("  NOTIFY's ceiling");
            report.notify = Some(postgres::notify_ceiling(settings).await?);
        }
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_dir_all(&data);
    print(&report);
    let file = if only.is_some() {
        "report-postgres.json"
    } else {
        "report.json"
    };
    let out = std::env::var("CHAT_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/chat-bench")
                .join(file)
        });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("\nreport written to {}", out.display());
    Ok(())
}

/// The floors (raw echo, minimal relay), then every row of both
/// transports on the embedded stores.
async fn floors_and_transports(
    report: &mut Report,
    settings: &Settings,
    data: &std::path::Path,
) -> anyhow::Result<()> {
    eprintln!("raw TCP echo");
    let echo = chat_bench::start_server(Served::Echo, "-", Passwords::Cheap).await?;
    report
        .latency
        .push(raw_latency(echo.addr(), settings.samples).await);
    for &pairs in settings.one_at_a_time_pairs {
        report
            .throughput
            .push(raw_throughput(&echo, pairs, settings.window).await);
    }
    drop(echo);
    eprintln!("minimal relay");
    let relay = chat_bench::start_server(Served::Relay, "-", Passwords::Cheap).await?;
    for &pairs in settings.pipelined_pairs {
        report
            .throughput
            .push(relay_throughput(&relay, pairs, settings.window).await);
    }
    let addr = relay.addr();
    report.connects.push(
        connects(
            &relay,
            "relay".into(),
            settings.window,
            move || async move {
                drop(relay_connect(addr, "c").await);
            },
        )
        .await,
    );
    drop(relay);
    // The socket server's handshake with a generator as lean as the
    // relay's, right after it (the client library's rows come with
    // each transport).
    let socket = chat_bench::start_server(Served::Socket, "memory", Passwords::Cheap).await?;
    let addr = socket.addr();
    report.connects.push(
        connects(
            &socket,
            "socket (bare hello)".into(),
            settings.window,
            move || bare_hello(addr),
        )
        .await,
    );
    drop(socket);
    eprintln!("socket transport");
    transport::<SocketClient>(report, settings, data).await?;
    eprintln!("gRPC transport");
    transport::<GrpcClient>(report, settings, data).await?;
    Ok(())
}
