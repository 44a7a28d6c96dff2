//! The PostgreSQL rows: one server process on the database, and a cluster
//! of [`CLUSTER_NODES`] processes on one database, where each pair's
//! sender is on one process and its recipient on the next, so that every
//! delivery is committed by one process and announced to another with
//! `NOTIFY`. Each row runs on a fresh schema and new processes. Their CPU
//! per message is the servers' (all of them) and the database's, and each
//! is read as a ratio to the embedded durable store's row of the same
//! transport, mode and pairs in the same run. Then `NOTIFY`'s own ceiling
//! ([`chat_bench::postgres::measure_notify`]), which bounds what a cluster
//! can deliver across processes.

use std::time::Duration;

use anyhow::Context;
use chat_bench::postgres::{NotifyCeiling, NotifyRate};
use chat_bench::{Passwords, Report, Throughput};
use chat_conformance::postgres::{TestDatabase, URL_VARIABLE};
use chat_socket::SocketClient;

use super::{
    CLUSTER_NODES, Dial, NOTIFY_CONFIGURATIONS, POSTGRES_CLUSTER, Servers, Settings, Target,
    one_at_a_time, pipelined, served_for, store_arg,
};

/// Printed, and recorded in the report, when the rows cannot run.
pub(super) const SKIPPED: &str = "SKIPPED: PostgreSQL rows (set CHAT_TEST_DATABASE_URL)";

/// Whether the PostgreSQL rows can run (the test database is named).
/// Without it they are skipped, loudly, except under `CI`, which must run
/// them (as the PostgreSQL tests do): there it is an error.
pub(super) fn database_configured() -> anyhow::Result<bool> {
    if std::env::var_os(URL_VARIABLE).is_some() {
        return Ok(true);
    }
    if std::env::var_os("CI").is_some() {
        anyhow::bail!("{URL_VARIABLE} is not set, and CI must run the PostgreSQL rows");
    }
    eprintln!("{SKIPPED}");
    Ok(false)
}

/// How a row's senders send.
#[derive(Debug, Clone, Copy)]
enum Load {
    Pipelined,
    OneAtATime,
}

/// Every PostgreSQL row of transport `C`: pipelined at each of
/// `postgres_pairs` on one process and on the cluster, and (socket only)
/// one at a time on both (one pair, one at a time: the latency of a
/// delivery across processes without load).
pub(super) async fn rows<C: Dial>(report: &mut Report, settings: &Settings) -> anyhow::Result<()> {
    for (nodes, store) in [(1, "postgres"), (CLUSTER_NODES, POSTGRES_CLUSTER)] {
        for &pairs in settings.postgres_pairs {
            eprintln!("  {} / {store}: pipelined, {pairs} pairs", C::NAME);
            let row = row::<C>(nodes, store, Load::Pipelined, pairs, settings.window).await?;
            report.throughput.push(row);
        }
        if C::NAME == SocketClient::NAME {
            for &pairs in settings.postgres_one_at_a_time_pairs {
                eprintln!("  {} / {store}: one at a time, {pairs} pairs", C::NAME);
                let row = row::<C>(nodes, store, Load::OneAtATime, pairs, settings.window).await?;
                report.throughput.push(row);
            }
        }
    }
    Ok(())
}

/// `url` over a plaintext connection, unless it names its own `sslmode`:
/// the rows compare the stores, like the embedded store's, without TLS
/// (the driver's default, `prefer`, encrypts when the server offers it).
pub(super) fn plaintext(url: &str) -> String {
    if url.contains("sslmode=") {
        return url.to_string();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslmode=disable")
}

/// One row: a fresh schema, `nodes` server processes on it, the load.
async fn row<C: Dial>(
    nodes: usize,
    store: &str,
    load: Load,
    pairs: usize,
    window: Duration,
) -> anyhow::Result<Throughput> {
    let database = TestDatabase::create("chat-bench PostgreSQL rows")
        .await
        .with_context(|| format!("{URL_VARIABLE} is not set"))?;
    let arg = format!("postgres:{}", plaintext(&database.url));
    let mut processes = Vec::with_capacity(nodes);
    for _ in 0..nodes {
        processes.push(chat_bench::start_server(served_for::<C>(), &arg, Passwords::Cheap).await?);
    }
    let servers = Servers::on_database(&processes);
    let row = match load {
        Load::Pipelined => pipelined::<C>(&servers, store, "g", pairs, window).await,
        Load::OneAtATime => one_at_a_time::<C>(&servers, store, "g", pairs, window).await,
    };
    drop(servers);
    // Gone before their schema is dropped, so that no connection of
    // theirs holds a lock in it.
    for process in processes {
        process.kill().await;
    }
    drop(database);
    Ok(row)
}

/// The durable rows the PostgreSQL rows are compared to, alone (for
/// `CHAT_BENCH_ONLY=postgres`; a full run measures them with the rest).
pub(super) async fn durable_rows<C: Dial>(
    report: &mut Report,
    settings: &Settings,
    data: &std::path::Path,
) -> anyhow::Result<()> {
    let arg = store_arg("durable", &data.join(format!("{}-durable", C::NAME)));
    let server = chat_bench::start_server(served_for::<C>(), &arg, Passwords::Cheap).await?;
    let target = Target::plain(server.addr());
    let servers = Servers::one(&server, &target);
    for (run, &pairs) in settings.postgres_pairs.iter().enumerate() {
        eprintln!("  {} / durable: pipelined, {pairs} pairs", C::NAME);
        let tag = format!("p{run}");
        report
            .throughput
            .push(pipelined::<C>(&servers, "durable", &tag, pairs, settings.window).await);
    }
    if C::NAME == SocketClient::NAME {
        for (run, &pairs) in settings.postgres_one_at_a_time_pairs.iter().enumerate() {
            eprintln!("  {} / durable: one at a time, {pairs} pairs", C::NAME);
            let tag = format!("o{run}");
            report
                .throughput
                .push(one_at_a_time::<C>(&servers, "durable", &tag, pairs, settings.window).await);
        }
    }
    Ok(())
}

/// `NOTIFY`'s ceiling on the test database, each configuration for the
/// settings' window.
pub(super) async fn notify_ceiling(settings: &Settings) -> anyhow::Result<NotifyCeiling> {
    let database = TestDatabase::create("chat-bench NOTIFY ceiling")
        .await
        .with_context(|| format!("{URL_VARIABLE} is not set"))?;
    chat_bench::postgres::measure_notify(
        &plaintext(&database.url),
        settings.window,
        NOTIFY_CONFIGURATIONS,
    )
    .await
}

/// The embedded durable store's row a PostgreSQL row is compared to.
fn durable_of<'a>(report: &'a Report, t: &Throughput) -> Option<&'a Throughput> {
    report.throughput.iter().find(|d| {
        d.store == "durable" && d.transport == t.transport && d.mode == t.mode && d.pairs == t.pairs
    })
}

/// The ceiling the cluster's deliveries meet: the most notifications per
/// second one listener received when each was committed alone, as the
/// server routes a message.
fn autocommit_ceiling(notify: &NotifyCeiling) -> Option<&NotifyRate> {
    notify
        .rates
        .iter()
        .filter(|r| r.per_commit == 1)
        .max_by(|a, b| a.received_per_second.total_cmp(&b.received_per_second))
}

/// The PostgreSQL rows with their ratios, and the `NOTIFY` ceiling.
pub(super) fn print(report: &Report) {
    println!(
        "\n## PostgreSQL (CPU µs per delivered message: servers, database, both; cores used by the \
         servers, the database and the generator; ÷ durable: this row ÷ the durable store's of the \
         same transport, mode and pairs, CPU as both ÷ the durable server's)"
    );
    for skipped in &report.skipped {
        println!("{skipped}");
    }
    println!(
        "{:<9} {:<11} {:<13} {:>5} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>5} {:>5} {:>5} {:<9} {:>7} {:>6} {:>6} {:>6}",
        "transport",
        "store",
        "mode",
        "pairs",
        "msgs/s",
        "p50",
        "p99",
        "srv/msg",
        "db/msg",
        "all/msg",
        "srv",
        "db",
        "gen",
        "limit",
        "÷ msg/s",
        "÷ p50",
        "÷ p99",
        "÷ cpu"
    );
    for t in report
        .throughput
        .iter()
        .filter(|t| t.database_cpu_us_per_msg.is_some())
    {
        let ratios = durable_of(report, t)
            .map(|d| {
                format!(
                    "{:>6.2}× {:>5.2}× {:>5.2}× {:>5.2}×",
                    t.per_second / d.per_second,
                    t.p50_us / d.p50_us,
                    t.p99_us / d.p99_us,
                    t.total_cpu_us_per_msg() / d.server_cpu_us_per_msg
                )
            })
            .unwrap_or_else(|| "(no durable row)".into());
        println!(
            "{:<9} {:<11} {:<13} {:>5} {:>8.0} {:>7.0} {:>7.0} {:>7.1} {:>7.1} {:>7.1} {:>5.2} {:>5.2} {:>5.2} {:<9} {ratios}",
            t.transport,
            t.store,
            t.mode,
            t.pairs,
            t.per_second,
            t.p50_us,
            t.p99_us,
            t.server_cpu_us_per_msg,
            t.database_cpu_us_per_msg.unwrap_or(0.0),
            t.total_cpu_us_per_msg(),
            t.server_cores,
            t.database_cores.unwrap_or(0.0),
            t.generator_cores,
            t.bottleneck,
        );
    }
    let Some(notify) = &report.notify else {
        return;
    };
    println!(
        "\n## NOTIFY's ceiling (one listener; {}-byte payloads; {:.1} s per row; per commit 0: commits \
         that notify nothing, the control)",
        notify.payload_bytes, notify.window_s
    );
    println!(
        "{:>5} {:>10} {:>9} {:>9} {:>10} {:>7} {:>5} {:>5} {:>5} {:<9}",
        "conns",
        "per commit",
        "commits/s",
        "sent/s",
        "received/s",
        "lag",
        "all",
        "db",
        "gen",
        "limit"
    );
    for r in &notify.rates {
        println!(
            "{:>5} {:>10} {:>9.0} {:>9.0} {:>10.0} {:>7} {:>5} {:>5.2} {:>5.2} {:<9}",
            r.connections,
            r.per_commit,
            r.commits_per_second,
            r.sent_per_second,
            r.received_per_second,
            r.lag,
            if r.all_received { "yes" } else { "no" },
            r.database_cores,
            r.generator_cores,
            r.bottleneck
        );
    }
    if let Some(ceiling) = autocommit_ceiling(notify) {
        for t in report
            .throughput
            .iter()
            .filter(|t| t.store == POSTGRES_CLUSTER)
        {
            println!(
                "{} {} {}, {} pairs: {:.0} msgs/s delivered across processes, {:.0}% of the ceiling \
                 ({:.0}/s, {} connections notifying in autocommit)",
                t.transport,
                t.store,
                t.mode,
                t.pairs,
                t.per_second,
                100.0 * t.per_second / ceiling.received_per_second,
                ceiling.received_per_second,
                ceiling.connections
            );
        }
    }
}
