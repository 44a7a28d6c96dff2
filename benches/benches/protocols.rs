//! The protocol comparison: socket vs gRPC vs a raw TCP echo, on the memory
//! and the durable store, measured in one run so every figure is also a
//! ratio. Servers run as child processes (this binary in server mode), so
//! their CPU time and memory are theirs alone; the load runs here.
//!
//! `cargo bench` at the workspace root runs it in full;
//! `cargo bench -p chat-bench --bench protocols -- --quick` (or
//! `CHAT_BENCH_QUICK=1`) runs a reduced version in well under a minute.
//! Results: a table on stdout and `target/chat-bench/report.json`, which
//! `cargo xtask bench-report` turns into docs/BENCHMARKS.md.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chat_bench::{
    Bytes, Latency, Logins, MESSAGE_BYTES, Machine, Report, Served, ServerProcess, Sessions,
    Throughput,
};
use chat_conformance::pki::TestPki;
use chat_core::client::{ChatClient, Push};
use chat_grpc::GrpcClient;
use chat_socket::SocketClient;
use chat_tls::ClientTls;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Settings {
    samples: usize,
    window: Duration,
    pairs: &'static [usize],
    sessions: usize,
}

const QUICK: Settings = Settings {
    samples: 300,
    window: Duration::from_millis(700),
    pairs: &[1, 16, 32, 256],
    sessions: 1000,
};
const FULL: Settings = Settings {
    samples: 5000,
    window: Duration::from_secs(3),
    pairs: &[1, 16, 32, 256],
    sessions: 10_000,
};

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

/// N sender/recipient pairs for the window: delivered messages per second,
/// delivery latency, and server CPU per delivered message.
async fn throughput<C: Dial>(
    server: &ServerProcess,
    target: &Target,
    store: &str,
    tag: &str,
    pairs: usize,
    window: Duration,
) -> Throughput {
    let mut senders = Vec::new();
    let mut recipients = Vec::new();
    for i in 0..pairs {
        let mut r = C::dial(target).await;
        r.create(&format!("{tag}r{i}"), "password1")
            .await
            .expect("create recipient");
        recipients.push(r);
        let mut s = C::dial(target).await;
        s.create(&format!("{tag}s{i}"), "password1")
            .await
            .expect("create sender");
        senders.push(s);
    }
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let cpu_before = server.cpu_seconds();
    let start = Instant::now();
    let deadline = start + window;
    let mut receivers = Vec::new();
    for mut r in recipients {
        let delivered = Arc::clone(&delivered);
        receivers.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut last = 0;
            loop {
                let Ok(Some(push)) = tokio::time::timeout_at(deadline.into(), r.next_push()).await
                else {
                    break;
                };
                if let Push::Message(m) = push {
                    if let Some(sent) = stamp_of(m.body.as_str()) {
                        h.record(micros(epoch.elapsed()).saturating_sub(sent).max(1))
                            .ok();
                    }
                    delivered.fetch_add(1, Ordering::Relaxed);
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
        let stop = Arc::clone(&stop);
        let to = format!("{tag}r{i}");
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if s.send(&to, &body(micros(epoch.elapsed()))).await.is_err() {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep_until(deadline.into()).await;
    let count = delivered.load(Ordering::Relaxed);
    let cpu = server.cpu_seconds() - cpu_before;
    stop.store(true, Ordering::Relaxed);
    let mut h = histogram();
    for r in receivers {
        h.add(r.await.expect("receiver")).ok();
    }
    for t in tasks {
        t.await.ok();
    }
    let seconds = start.elapsed().min(window).as_secs_f64();
    Throughput {
        transport: target.label::<C>(),
        store: store.into(),
        pairs,
        delivered: count,
        per_second: count as f64 / seconds,
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        server_cpu_us_per_msg: if count > 0 {
            cpu * 1e6 / count as f64
        } else {
            0.0
        },
    }
}

/// The same for the raw echo: N connections ping-ponging the payload.
async fn raw_throughput(server: &ServerProcess, pairs: usize, window: Duration) -> Throughput {
    let cpu_before = server.cpu_seconds();
    let start = Instant::now();
    let deadline = start + window;
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
    let mut h = histogram();
    for t in tasks {
        let (n, th) = t.await.expect("echo task");
        count += n;
        h.add(th).ok();
    }
    let cpu = server.cpu_seconds() - cpu_before;
    let seconds = start.elapsed().as_secs_f64();
    Throughput {
        transport: "raw".into(),
        store: "-".into(),
        pairs,
        delivered: count,
        per_second: count as f64 / seconds,
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        server_cpu_us_per_msg: if count > 0 {
            cpu * 1e6 / count as f64
        } else {
            0.0
        },
    }
}

/// Server RSS per idle logged-in session.
async fn sessions<C: Dial>(server: &ServerProcess, count: usize) -> Sessions {
    let before = server.rss_bytes();
    let mut clients = Vec::with_capacity(count);
    for i in 0..count {
        let mut c = C::dial(&Target::plain(server.addr())).await;
        c.create(&format!("idle{i}"), "password1")
            .await
            .expect("create idle");
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_bytes();
    drop(clients);
    let delta = after.saturating_sub(before);
    Sessions {
        transport: C::NAME.into(),
        sessions: count,
        rss_delta: delta,
        per_session: delta as f64 / count as f64,
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

async fn transport<C: Dial>(
    report: &mut Report,
    settings: &Settings,
    data: &std::path::Path,
) -> anyhow::Result<()> {
    for store in ["memory", "durable"] {
        let dir = data.join(format!("{}-{store}", C::NAME));
        let arg = if store == "memory" {
            "memory".to_string()
        } else {
            dir.to_string_lossy().to_string()
        };
        let served = if C::NAME == "grpc" {
            Served::Grpc
        } else {
            Served::Socket
        };
        let server = chat_bench::start_server(served, &arg).await?;
        let target = Target::plain(server.addr());
        loads::<C>(report, settings, &server, &target, store).await;
        if store == "memory" {
            drop(server);
            tls_rows::<C>(report, settings, served).await?;
            // Fresh servers, so nothing earlier is in the lists or the RSS.
            eprintln!("  {}: bytes per operation", C::NAME);
            let fresh = chat_bench::start_server(served, "memory").await?;
            report.bytes.extend(wire::<C>(fresh.addr()).await);
            drop(fresh);
            eprintln!("  {}: {} idle sessions", C::NAME, settings.sessions);
            let fresh = chat_bench::start_server(served, "memory").await?;
            report
                .sessions
                .push(sessions::<C>(&fresh, settings.sessions).await);
        }
    }
    Ok(())
}

/// Latencies, throughput at every pair count and (memory store only)
/// logins against one running server.
async fn loads<C: Dial>(
    report: &mut Report,
    settings: &Settings,
    server: &ServerProcess,
    target: &Target,
    store: &str,
) {
    let name = target.label::<C>();
    eprintln!("  {name} / {store}: latency");
    report
        .latency
        .extend(latencies::<C>(target, store, "l", settings.samples).await);
    for (run, &pairs) in settings.pairs.iter().enumerate() {
        eprintln!("  {name} / {store}: throughput, {pairs} pairs");
        report.throughput.push(
            throughput::<C>(
                server,
                target,
                store,
                &format!("t{run}"),
                pairs,
                settings.window,
            )
            .await,
        );
    }
    if store == "memory" {
        eprintln!("  {name}: logins");
        report
            .logins
            .push(logins::<C>(target, settings.window).await);
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
    let server =
        chat_bench::start_server_tls(served, "memory", &pki.cert_path(), &pki.key_path()).await?;
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
    println!("\n## Round-trip latency, µs (p50 / p99 / p99.9)");
    println!(
        "{:<10} {:<8} {:<16} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "transport", "store", "op", "p50", "p99", "p99.9", "p50 ÷ raw", "p99 ÷ raw"
    );
    for l in &report.latency {
        let (r50, r99) = raw
            .map(|r| (l.p50_us / r.p50_us, l.p99_us / r.p99_us))
            .unwrap_or((0.0, 0.0));
        println!(
            "{:<10} {:<8} {:<16} {:>10.0} {:>10.0} {:>10.0} {:>11.2}× {:>11.2}×",
            l.transport, l.store, l.op, l.p50_us, l.p99_us, l.p999_us, r50, r99
        );
    }
    for store in ["memory", "durable"] {
        if let (Some(g), Some(s)) = (
            find(report, "grpc", store, "send → delivery"),
            find(report, "socket", store, "send → delivery"),
        ) {
            println!(
                "gRPC ÷ socket, send → delivery p50 ({store}): {:.2}×",
                g.p50_us / s.p50_us
            );
        }
    }
    println!(
        "\n## Throughput (delivered messages/s; delivery latency under load, µs; server CPU µs per message)"
    );
    println!(
        "{:<10} {:<8} {:>6} {:>12} {:>9} {:>9} {:>10} {:>11} {:>11}",
        "transport", "store", "pairs", "msgs/s", "p50", "p99", "cpu/msg", "÷ raw tput", "÷ raw cpu"
    );
    for t in &report.throughput {
        let raw = report
            .throughput
            .iter()
            .find(|r| r.transport == "raw" && r.pairs == t.pairs);
        let (rt, rc) = raw
            .map(|r| {
                (
                    t.per_second / r.per_second,
                    t.server_cpu_us_per_msg / r.server_cpu_us_per_msg,
                )
            })
            .unwrap_or((0.0, 0.0));
        println!(
            "{:<10} {:<8} {:>6} {:>12.0} {:>9.0} {:>9.0} {:>10.2} {:>10.2}× {:>10.2}×",
            t.transport,
            t.store,
            t.pairs,
            t.per_second,
            t.p50_us,
            t.p99_us,
            t.server_cpu_us_per_msg,
            rt,
            rc
        );
    }
    println!("\n## TLS ÷ plaintext (memory store, same run)");
    for transport in ["socket", "grpc"] {
        let tls = format!("{transport}+tls");
        for op in ["send → delivery", "login", "create"] {
            if let (Some(t), Some(p)) = (
                find(report, &tls, "memory", op),
                find(report, transport, "memory", op),
            ) {
                println!(
                    "{transport:<8} {op:<16} p50 {:.2}×  p99 {:.2}×",
                    t.p50_us / p.p50_us,
                    t.p99_us / p.p99_us
                );
            }
        }
        for pairs in settings_pairs(report) {
            let row = |name: &str| {
                report
                    .throughput
                    .iter()
                    .find(|r| r.transport == name && r.store == "memory" && r.pairs == pairs)
            };
            if let (Some(t), Some(p)) = (row(&tls), row(transport)) {
                println!(
                    "{transport:<8} {pairs:>3} pairs        msgs/s {:.2}×  cpu/msg {:.2}×",
                    t.per_second / p.per_second,
                    t.server_cpu_us_per_msg / p.server_cpu_us_per_msg
                );
            }
        }
    }
    println!("\n## Bytes on the wire per operation (up / down)");
    for b in &report.bytes {
        println!("{:<8} {:<28} {:>6} {:>6}", b.transport, b.op, b.up, b.down);
    }
    println!("\n## Idle sessions and logins");
    for s in &report.sessions {
        println!(
            "{:<8} {} sessions: {:.0} bytes of server RSS each",
            s.transport, s.sessions, s.per_session
        );
    }
    for l in &report.logins {
        println!(
            "{:<8} {:.0} logins/s with {} clients",
            l.transport, l.per_second, l.clients
        );
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

/// `CHAT_BENCH_PROFILE=<raw|socket|grpc>/<memory|durable>/<pairs>/<seconds>`:
/// runs that one throughput load alone, for a profiler. It prints the
/// server's pid, waits two seconds (attach now, e.g. `perf record -p PID`
/// or `perf stat -e 'syscalls:sys_enter_*' -p PID`), runs the load, and
/// prints its figures.
async fn profile(spec: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = spec.split('/').collect();
    let [transport, store, pairs, seconds] = parts[..] else {
        anyhow::bail!(
            "CHAT_BENCH_PROFILE is transport/store/pairs/seconds, e.g. socket/memory/256/10"
        );
    };
    let pairs: usize = pairs.parse()?;
    let window = Duration::from_secs_f64(seconds.parse()?);
    let data = std::env::temp_dir().join(format!("chat-bench-profile-{}", std::process::id()));
    let store_arg = match store {
        "memory" => "memory".to_string(),
        "durable" => data.to_string_lossy().to_string(),
        other => anyhow::bail!("unknown store {other:?} (memory or durable)"),
    };
    let served = match transport {
        "raw" => Served::Echo,
        "socket" => Served::Socket,
        "grpc" => Served::Grpc,
        other => anyhow::bail!("unknown transport {other:?} (raw, socket or grpc)"),
    };
    let server = chat_bench::start_server(served, &store_arg).await?;
    println!(
        "server pid {} ({transport}/{store}, {pairs} pairs, {seconds} s)",
        server.pid()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = match served {
        Served::Echo => raw_throughput(&server, pairs, window).await,
        Served::Socket => {
            let target = Target::plain(server.addr());
            throughput::<SocketClient>(&server, &target, store, "p", pairs, window).await
        }
        Served::Grpc => {
            let target = Target::plain(server.addr());
            throughput::<GrpcClient>(&server, &target, store, "p", pairs, window).await
        }
    };
    println!(
        "{} messages, {:.0}/s, delivery p50 {:.0} µs p99 {:.0} µs, server CPU {:.2} µs/message",
        t.delivered, t.per_second, t.p50_us, t.p99_us, t.server_cpu_us_per_msg
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("chat-bench-load")
        .build()?;
    if let Ok(spec) = std::env::var("CHAT_BENCH_PROFILE") {
        return runtime.block_on(profile(&spec));
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
    };
    runtime.block_on(async {
        eprintln!("raw TCP echo");
        let echo = chat_bench::start_server(Served::Echo, "-").await?;
        report
            .latency
            .push(raw_latency(echo.addr(), settings.samples).await);
        for &pairs in settings.pairs {
            report
                .throughput
                .push(raw_throughput(&echo, pairs, settings.window).await);
        }
        drop(echo);
        eprintln!("socket transport");
        transport::<SocketClient>(&mut report, settings, &data).await?;
        eprintln!("gRPC transport");
        transport::<GrpcClient>(&mut report, settings, &data).await?;
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_dir_all(&data);
    print(&report);
    let out = std::env::var("CHAT_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/chat-bench/report.json")
        });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("\nreport written to {}", out.display());
    Ok(())
}
