//! The PostgreSQL section of docs/BENCHMARKS.md: the rows on the
//! PostgreSQL store (one server process, and a cluster of three on one
//! database) as ratios to the embedded durable store's rows of the same
//! run; the ceiling of `NOTIFY`, the cluster's path between processes; and
//! what replaces `NOTIFY` past that ceiling, reasoned from the run's
//! figures (the prose is generated with them, so that it cannot disagree
//! with the tables above it).

use std::fmt::Write as _;

use serde_json::Value;

use super::{f, rows, s};

/// The store of the cluster rows.
const CLUSTER: &str = "postgres x3";

/// Whether a throughput row ran on PostgreSQL (it counts the database's
/// CPU).
pub(super) fn on_database(t: &Value) -> bool {
    t["database_cpu_us_per_msg"].is_number()
}

/// Servers' and database's CPU per delivered message, µs.
fn total_cpu(t: &Value) -> f64 {
    f(t, "server_cpu_us_per_msg") + f(t, "database_cpu_us_per_msg")
}

/// The embedded durable store's row of the same transport, mode and pairs.
fn durable_of<'a>(report: &'a Value, t: &Value) -> Option<&'a Value> {
    rows(report, "throughput").into_iter().find(|d| {
        s(d, "store") == "durable"
            && s(d, "transport") == s(t, "transport")
            && s(d, "mode") == s(t, "mode")
            && d["pairs"] == t["pairs"]
    })
}

/// The row of `store` with the same transport, mode and pairs as `t`.
fn same_load<'a>(report: &'a Value, t: &Value, store: &str) -> Option<&'a Value> {
    rows(report, "throughput").into_iter().find(|d| {
        s(d, "store") == store
            && s(d, "transport") == s(t, "transport")
            && s(d, "mode") == s(t, "mode")
            && d["pairs"] == t["pairs"]
    })
}

/// Database CPU per notification received (per commit for the control),
/// µs.
fn database_us_per_notification(r: &Value) -> f64 {
    let per_second = if r["per_commit"].as_u64() == Some(0) {
        f(r, "commits_per_second")
    } else {
        f(r, "received_per_second")
    };
    if per_second > 0.0 {
        f(r, "database_cores") * 1e6 / per_second
    } else {
        0.0
    }
}

/// The configuration with the most notifications received per second
/// among those `keep` accepts.
fn best<'a>(rates: &[&'a Value], keep: impl Fn(u64) -> bool) -> Option<&'a Value> {
    rates
        .iter()
        .copied()
        .filter(|r| keep(r["per_commit"].as_u64().unwrap_or(0)))
        .max_by(|a, b| f(a, "received_per_second").total_cmp(&f(b, "received_per_second")))
}

/// The section: rows, ratios, the ceiling and what replaces it.
pub(super) fn section(md: &mut String, report: &Value) -> anyhow::Result<()> {
    writeln!(
        md,
        "\n## PostgreSQL: one process, and three on one database\n"
    )?;
    let on_pg: Vec<&Value> = rows(report, "throughput")
        .into_iter()
        .filter(|t| on_database(t))
        .collect();
    if on_pg.is_empty() {
        let skipped: Vec<&str> = report["skipped"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if skipped.is_empty() {
            writeln!(md, "This run had no PostgreSQL rows.")?;
        } else {
            for line in skipped {
                writeln!(md, "**{line}**: this run had no database.")?;
            }
        }
        return Ok(());
    }
    writeln!(
        md,
        "The pipelined loads above (and, for the socket transport, one at a time) on the PostgreSQL \
         store (`chat-store-pg`), each row on a fresh schema of a PostgreSQL server on this machine{}. \
         `postgres`: one server process. `{CLUSTER}`: three server processes on one database, each \
         pair's sender on one process and its recipient on the next, so that every message is \
         committed by one process and announced to the other with `NOTIFY` (the recipient's \
         process then takes it from the table). CPU per delivered message is counted for the server \
         processes (summed), for the database (every `postgres` process: the backends of the servers' \
         connections, the WAL writer and the rest), and both together; `srv`, `db`, `gen`: cores used \
         by the servers, the database and the load generator, which share this machine's {} cores. \
         `limit` counts the database as a side: `database` when the three together used ≥ 85% of the \
         machine and the database the most. Every row is also a ratio to the embedded durable \
         store's row (the log store) of the same transport, mode and pairs in this run; CPU as \
         servers and database together ÷ the durable server's.\n",
        report["notify"]["database"]
            .as_str()
            .filter(|d| !d.is_empty())
            .map(|d| format!(" ({d})"))
            .unwrap_or_default(),
        report["machine"]["cores"],
    )?;
    writeln!(
        md,
        "| transport | store | processes | mode | pairs | delivered/s | p50 µs | p99 µs | CPU µs/msg: servers | database | both | srv | db | gen | limit | ÷ durable msgs/s | ÷ durable p50 | ÷ durable p99 | ÷ durable CPU |\n\
         |---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    )?;
    for t in &on_pg {
        let ratios = durable_of(report, t)
            .map(|d| {
                format!(
                    "{:.3}× | {:.1}× | {:.1}× | {:.1}×",
                    f(t, "per_second") / f(d, "per_second"),
                    f(t, "p50_us") / f(d, "p50_us"),
                    f(t, "p99_us") / f(d, "p99_us"),
                    total_cpu(t) / f(d, "server_cpu_us_per_msg"),
                )
            })
            .unwrap_or_else(|| "– | – | – | –".into());
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {ratios} |",
            s(t, "transport"),
            s(t, "store"),
            t["processes"].as_u64().unwrap_or(1),
            s(t, "mode"),
            t["pairs"],
            f(t, "per_second"),
            f(t, "p50_us"),
            f(t, "p99_us"),
            f(t, "server_cpu_us_per_msg"),
            f(t, "database_cpu_us_per_msg"),
            total_cpu(t),
            f(t, "server_cores"),
            f(t, "database_cores"),
            f(t, "generator_cores"),
            s(t, "bottleneck"),
        )?;
    }
    notify(md, report, &on_pg)
}

/// `NOTIFY`'s ceiling, the cluster rows against it, and what replaces it.
fn notify(md: &mut String, report: &Value, on_pg: &[&Value]) -> anyhow::Result<()> {
    let n = &report["notify"];
    let rates: Vec<&Value> = n["rates"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    if rates.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "\n### NOTIFY's ceiling\n\n\
         Measured with sqlx alone, no chat server: one `PgListener` on a channel, and connections \
         sending to it as fast as they can for {:.1} s per row, each notification a {}-byte payload \
         (a recipient's name and a message id, as the server sends). `per commit` 1 is `SELECT \
         pg_notify($1, $2)` in autocommit, as the server routes each message; 16 is that many in one \
         transaction; 0 is the control, commits that notify nothing (`SELECT txid_current()`, so \
         that each is a real commit). `received/s` counts what the listener received in the \
         window, which is what bounds delivery; `lag`, what was sent but not yet received when it \
         ended (a notification can arrive before its sender sees the commit return, so received \
         may pass sent); `all`: whether everything sent arrived within two seconds after.\n",
        f(n, "window_s"),
        n["payload_bytes"],
    )?;
    writeln!(
        md,
        "| connections | per commit | commits/s | sent/s | received/s | lag | all | database µs per notification | db | gen | limit |\n\
         |---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"
    )?;
    for r in &rates {
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {:.1} | {:.2} | {:.2} | {} |",
            r["connections"],
            r["per_commit"],
            f(r, "commits_per_second"),
            f(r, "sent_per_second"),
            f(r, "received_per_second"),
            r["lag"],
            if r["all_received"].as_bool() == Some(true) {
                "yes"
            } else {
                "**no**"
            },
            database_us_per_notification(r),
            f(r, "database_cores"),
            f(r, "generator_cores"),
            s(r, "bottleneck"),
        )?;
    }
    let Some(ceiling) = best(&rates, |per| per == 1) else {
        return Ok(());
    };
    let ceiling_rate = f(ceiling, "received_per_second");
    let cluster: Vec<&Value> = on_pg
        .iter()
        .copied()
        .filter(|t| s(t, "store") == CLUSTER)
        .collect();
    writeln!(md)?;
    for t in &cluster {
        writeln!(
            md,
            "- {} {} {}, {} pairs: {:.0} messages/s delivered across processes, **{:.0}%** of the ceiling ({:.0} notifications/s received with {} connections in autocommit).",
            s(t, "transport"),
            s(t, "store"),
            s(t, "mode"),
            t["pairs"],
            f(t, "per_second"),
            100.0 * f(t, "per_second") / ceiling_rate,
            ceiling_rate,
            ceiling["connections"],
        )?;
    }

    // What limits it, from the figures.
    let single = rates
        .iter()
        .find(|r| r["per_commit"].as_u64() == Some(1) && r["connections"].as_u64() == Some(1));
    let batched = best(&rates, |per| per > 1);
    let control = rates.iter().find(|r| r["per_commit"].as_u64() == Some(0));
    let saturated = match s(ceiling, "bottleneck") {
        "database" => format!(
            "the database used the most of the machine's cores ({:.2}, with {:.2} for the sender and \
             listener): on {} shared cores this ceiling is the database's CPU as much as the lock",
            f(ceiling, "database_cores"),
            f(ceiling, "generator_cores"),
            report["machine"]["cores"],
        ),
        "generator" => format!(
            "the sender and listener used the most cores ({:.2}, the database {:.2}): the ceiling is \
             at least this",
            f(ceiling, "generator_cores"),
            f(ceiling, "database_cores"),
        ),
        _ => format!(
            "together the database ({:.2} cores) and the sender and listener ({:.2}) left part of the \
             machine idle: the serialized commits limited it, not the CPU",
            f(ceiling, "database_cores"),
            f(ceiling, "generator_cores"),
        ),
    };
    write!(
        md,
        "\n**What limits it.** A transaction that notifies takes a transaction id, so its commit is \
         written and flushed even if it does nothing else, and before committing it takes one lock \
         for the whole PostgreSQL server (`PreCommit_Notify` in `src/backend/commands/async.c`, the \
         \"database 0\" lock), held until after the commit, so that notifications enter the one \
         queue in commit order: notifying commits run one at a time, whatever the cores. Here"
    )?;
    if let Some(single) = single {
        write!(
            md,
            " one connection notifying in autocommit reached {:.0}/s, and",
            f(single, "received_per_second")
        )?;
    }
    write!(
        md,
        " {} connections {ceiling_rate:.0}/s, at {:.0} µs of database CPU per notification; {saturated}.",
        ceiling["connections"],
        database_us_per_notification(ceiling),
    )?;
    if let Some(control) = control {
        write!(
            md,
            " Commits that notify nothing ran at {:.0}/s with {} connections.",
            f(control, "commits_per_second"),
            control["connections"]
        )?;
    }
    if let Some(batched) = batched {
        write!(
            md,
            " {} notifications per commit carried {:.0}/s ({:.1}× the autocommit ceiling): the \
             per-commit cost dominates, not the payloads.",
            batched["per_commit"],
            f(batched, "received_per_second"),
            f(batched, "received_per_second") / ceiling_rate,
        )?;
    }
    writeln!(md)?;

    // The cluster rows against it.
    if !cluster.is_empty() {
        let shares: Vec<f64> = cluster
            .iter()
            .map(|t| 100.0 * f(t, "per_second") / ceiling_rate)
            .collect();
        let low = shares.iter().copied().fold(f64::MAX, f64::min);
        let high = shares.iter().copied().fold(0.0, f64::max);
        let extra: Vec<String> = cluster
            .iter()
            .filter_map(|t| {
                let one = same_load(report, t, "postgres")?;
                Some(format!(
                    "{:.0} µs ({} {} pairs)",
                    f(t, "database_cpu_us_per_msg") - f(one, "database_cpu_us_per_msg"),
                    s(t, "transport"),
                    t["pairs"]
                ))
            })
            .collect();
        write!(
            md,
            "\n**Against the cluster rows.** They delivered {low:.0}–{high:.0}% of that ceiling \
             across processes: on this machine a cluster is limited by the store's own statements \
             per message (the database CPU per message in the table above) long before `NOTIFY`, \
             whose share is about {:.0} µs of database CPU per message.",
            database_us_per_notification(ceiling),
        )?;
        if !extra.is_empty() {
            write!(
                md,
                " Crossing processes cost the database {} more per message than one process does: \
                 the notification, the recipient's process taking the message from the table, and \
                 the lookup of the recipient's lease.",
                extra.join(", ")
            )?;
        }
        writeln!(md)?;
    }

    // What replaces it.
    // The relay at the cluster rows' first pair count: a frame forwarded
    // on an open connection.
    let relay = cluster.first().and_then(|t| {
        rows(report, "throughput")
            .into_iter()
            .find(|r| s(r, "transport") == "relay" && r["pairs"] == t["pairs"])
    });
    let frame_cost = relay
        .map(|r| {
            format!(
                ", about what the minimal relay costs ({:.1} µs of server CPU per message at {} pairs in this run)",
                f(r, "server_cpu_us_per_msg"),
                r["pairs"]
            )
        })
        .unwrap_or_default();
    writeln!(
        md,
        "\n**Past the ceiling (documented, not built).** The first step keeps `NOTIFY` and sends \
         fewer: one notification per recipient while one is outstanding (the recipient's process \
         takes what is queued for that user at each one), or one per destination process per \
         batch of commits, naming several users{}. Past that, what replaces `NOTIFY` is a direct push \
         between processes: each process listens on an internal address recorded in its `nodes` \
         row beside its heartbeat; a process that commits a message for a user whose lease names \
         another node sends that node the message itself (or its id) over one persistent stream \
         per pair of processes, frames batched as the socket transport batches them, and the node \
         pushes it to the session. That costs no commit and no server-wide lock per message, and \
         the receiving node does not read the message back from the table: a frame on an open \
         connection{frame_cost}, against {:.0} µs of database CPU and a serialized commit. The \
         database stays the source of truth and the catch-up path: a message is committed before \
         it is pushed and stays queued until acknowledged; a node that loses a peer's stream, \
         restarts, or sees a gap takes what is queued for its logged-in users from the table, as \
         the listener does today after a lost connection; the lease (and its generation, the \
         fencing token) still decides which node may push to a user. Logical replication (a slot \
         per node decoding the messages table) would also spare the extra commit, but every node \
         would decode every write; a broker (NATS, Redis pub/sub) is one more system to run and to \
         lose. Neither is needed before the direct stream is.",
        batched
            .map(|b| format!(
                " (measured above: {:.1}× the autocommit rate with {} per commit)",
                f(b, "received_per_second") / ceiling_rate,
                b["per_commit"]
            ))
            .unwrap_or_default(),
        database_us_per_notification(ceiling),
    )?;
    Ok(())
}
