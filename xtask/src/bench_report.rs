//! `cargo xtask bench-report [REPORT.json]`: turns the benchmark's JSON
//! (default `target/chat-bench/report.json`, written by `cargo bench`) into
//! `docs/BENCHMARKS.md` with SVG charts in `docs/bench/`, and keeps a copy
//! of the JSON there (`docs/bench/report.json`). A report of part of the
//! benchmark (`CHAT_BENCH_ONLY`) is refused: the document compares rows
//! of one whole run.

mod postgres;

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde_json::Value;

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

fn rows<'a>(report: &'a Value, key: &str) -> Vec<&'a Value> {
    report[key]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn latency<'a>(report: &'a Value, transport: &str, store: &str, op: &str) -> Option<&'a Value> {
    rows(report, "latency")
        .into_iter()
        .find(|l| s(l, "transport") == transport && s(l, "store") == store && s(l, "op") == op)
}

fn throughput<'a>(
    report: &'a Value,
    transport: &str,
    store: &str,
    mode: &str,
    pairs: u64,
) -> Option<&'a Value> {
    rows(report, "throughput").into_iter().find(|t| {
        s(t, "transport") == transport
            && s(t, "store") == store
            && s(t, "mode") == mode
            && t["pairs"].as_u64() == Some(pairs)
    })
}

/// A grouped bar chart: one group per category, one bar per series.
fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.15;
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let groups = categories.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups as f64, 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            categories.get(i).cloned().unwrap_or_default()
        })
        .y_desc(y_label)
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    for (k, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let x0 = i as f64 + 0.1 + k as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
            }))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

/// One line per series of (x, y) points, x on a log scale.
struct Lines<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x_max: f64,
}

fn lines(
    path: &Path,
    chart: Lines<'_>,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.15;
    let min_x = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.0))
        .fold(f64::MAX, f64::min)
        .clamp(1.0, chart.x_max);
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut plot = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d((min_x * 0.8..chart.x_max * 1.2).log_scale(), 0.0..max)?;
    plot.configure_mesh()
        .x_desc(chart.x_desc)
        .y_desc(chart.y_desc)
        .draw()?;
    for (k, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        plot.draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))?
        .label(name.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        plot.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    plot.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Recipient and body bytes of the measured send: a 3-byte name and a
/// 41-byte body (`chat_conformance::wire::{RECIPIENT, BODY}`).
const SEND_PAYLOAD: f64 = 44.0;

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

/// One target's row: what it asks, what was measured, and whether it holds.
struct Target {
    what: String,
    measured: String,
    met: bool,
}

fn target(targets: &mut Vec<Target>, what: impl Into<String>, measured: String, met: bool) {
    targets.push(Target {
        what: what.into(),
        measured,
        met,
    });
}

/// The targets of the performance issue, judged on this report's rows.
fn targets(report: &Value) -> Vec<Target> {
    let mut out = Vec::new();
    let p = "pipelined";
    for pairs in [256] {
        if let (Some(d), Some(m)) = (
            throughput(report, "socket", "durable", p, pairs),
            throughput(report, "socket", "memory", p, pairs),
        ) {
            let t = f(d, "per_second") / f(m, "per_second");
            let c = f(d, "server_cpu_us_per_msg") / f(m, "server_cpu_us_per_msg");
            target(
                &mut out,
                format!("durable ≥ 50% of memory's delivered msg/s ({pairs} pairs)"),
                format!(
                    "{:.0}% ({:.0} vs {:.0}/s)",
                    t * 100.0,
                    f(d, "per_second"),
                    f(m, "per_second")
                ),
                t >= 0.5,
            );
            target(
                &mut out,
                format!("durable server CPU per message ≤ 2× memory's ({pairs} pairs)"),
                format!(
                    "{c:.2}× ({:.1} vs {:.1} µs)",
                    f(d, "server_cpu_us_per_msg"),
                    f(m, "server_cpu_us_per_msg")
                ),
                c <= 2.0,
            );
        }
    }
    if let (Some(d), Some(m), Some(sync)) = (
        latency(report, "socket", "durable", "send → delivery"),
        latency(report, "socket", "memory", "send → delivery"),
        report["sync_us"].as_f64(),
    ) {
        let limit = f(m, "p50_us") + sync;
        target(
            &mut out,
            "durable idle send → delivery p50 ≤ memory's plus one fsync",
            format!(
                "{:.0} µs ≤ {:.0} + {sync:.0} µs",
                f(d, "p50_us"),
                f(m, "p50_us")
            ),
            f(d, "p50_us") <= limit,
        );
    }
    for pairs in [32, 256] {
        if let (Some(g), Some(sk)) = (
            throughput(report, "grpc", "memory", p, pairs),
            throughput(report, "socket", "memory", p, pairs),
        ) {
            let c = f(g, "server_cpu_us_per_msg") / f(sk, "server_cpu_us_per_msg");
            let t = f(g, "per_second") / f(sk, "per_second");
            target(
                &mut out,
                format!("gRPC server CPU per message ≤ 3× socket's ({pairs} pairs)"),
                format!(
                    "{c:.2}× ({:.1} vs {:.1} µs)",
                    f(g, "server_cpu_us_per_msg"),
                    f(sk, "server_cpu_us_per_msg")
                ),
                c <= 3.0,
            );
            target(
                &mut out,
                format!("gRPC throughput ≥ 35% of socket's ({pairs} pairs)"),
                format!("{:.0}%", t * 100.0),
                t >= 0.35,
            );
        }
    }
    if let (Some(g), Some(sk)) = (
        latency(report, "grpc", "memory", "send → delivery"),
        latency(report, "socket", "memory", "send → delivery"),
    ) {
        let r = f(g, "p50_us") / f(sk, "p50_us");
        target(
            &mut out,
            "gRPC idle send → delivery p50 ≤ 3× socket's",
            format!("{r:.2}×"),
            r <= 3.0,
        );
    }
    let largest = |transport: &str| {
        rows(report, "sessions")
            .into_iter()
            .filter(|x| s(x, "transport") == transport && s(x, "store") == "memory")
            .max_by_key(|x| x["sessions"].as_u64().unwrap_or(0))
    };
    for (transport, limit) in [("grpc", 16.0), ("socket", 4.0)] {
        if let Some(x) = largest(transport) {
            let kib = f(x, "per_session") / 1024.0;
            target(
                &mut out,
                format!("{transport} RSS per idle session ≤ {limit:.0} KiB"),
                format!("{kib:.1} KiB ({} sessions held)", x["sessions"]),
                kib <= limit,
            );
        }
    }
    let connects = |t: &str| {
        rows(report, "connects")
            .into_iter()
            .find(|c| s(c, "transport") == t)
            .map(|c| f(c, "per_second"))
    };
    let logins = |t: &str| {
        rows(report, "logins")
            .into_iter()
            .find(|l| s(l, "transport") == t)
            .map(|l| f(l, "per_second"))
    };
    if let (Some(g), Some(sk)) = (connects("grpc"), connects("socket")) {
        target(
            &mut out,
            "gRPC connects+handshakes/s ≥ half of socket's",
            format!("{:.0}% ({g:.0} vs {sk:.0}/s)", 100.0 * g / sk),
            g >= 0.5 * sk,
        );
    }
    if let (Some(g), Some(sk)) = (logins("grpc"), logins("socket")) {
        target(
            &mut out,
            "gRPC logins/s ≥ half of socket's",
            format!("{:.0}% ({g:.0} vs {sk:.0}/s)", 100.0 * g / sk),
            g >= 0.5 * sk,
        );
    }
    for pairs in [32, 256] {
        if let (Some(sk), Some(r)) = (
            throughput(report, "socket", "memory", p, pairs),
            throughput(report, "relay", "-", p, pairs),
        ) {
            let c = f(sk, "server_cpu_us_per_msg") / f(r, "server_cpu_us_per_msg");
            target(
                &mut out,
                format!("socket server CPU per message ≤ 1.2× the relay's ({pairs} pairs)"),
                format!(
                    "{c:.2}× ({:.1} vs {:.1} µs)",
                    f(sk, "server_cpu_us_per_msg"),
                    f(r, "server_cpu_us_per_msg")
                ),
                c <= 1.2,
            );
        }
    }
    for (transport, how) in [
        ("socket", "with the client library"),
        (
            "socket (bare hello)",
            "with a generator as lean as the relay's",
        ),
    ] {
        if let (Some(sk), Some(r)) = (connects(transport), connects("relay")) {
            target(
                &mut out,
                format!("socket connects+handshakes/s ≥ 80% of the relay's ({how})"),
                format!("{:.0}% ({sk:.0} vs {r:.0}/s)", 100.0 * sk / r),
                sk >= 0.8 * r,
            );
        }
    }
    if let (Some(l), Some(h)) = (logins("socket"), report["hash_cost"].as_object()) {
        let configured = h
            .get("configured_per_second")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let all = h
            .get("all_cores_per_second")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let concurrent = h.get("concurrent").and_then(Value::as_u64).unwrap_or(0);
        target(
            &mut out,
            "socket logins/s ≥ 90% of what argon2 allows on every core",
            format!("{:.0}% ({l:.0} vs {all:.0}/s)", 100.0 * l / all),
            l >= 0.9 * all,
        );
        target(
            &mut out,
            format!(
                "socket logins/s ≥ 90% of what argon2 allows at the server's {concurrent} hash(es) at a time"
            ),
            format!(
                "{:.0}% ({l:.0} vs {configured:.0}/s)",
                100.0 * l / configured
            ),
            l >= 0.9 * configured,
        );
    }
    if let Some(b) = rows(report, "bytes")
        .into_iter()
        .find(|b| s(b, "transport") == "socket" && s(b, "op") == "send")
    {
        let overhead = f(b, "up") - SEND_PAYLOAD;
        target(
            &mut out,
            "socket send ≤ 12 bytes beyond recipient and body (an earlier issue's)",
            format!("{overhead:.0} bytes (SEND ONCE, idempotent)"),
            overhead <= 12.0,
        );
    }
    out
}

pub fn run(input: Option<&str>) -> anyhow::Result<()> {
    let input = input.unwrap_or("target/chat-bench/report.json");
    let text = std::fs::read_to_string(input).with_context(|| {
        format!("cannot read {input}; run `cargo bench -p chat-bench --bench protocols` first")
    })?;
    let report: Value = serde_json::from_str(&text).context("the report is not valid JSON")?;
    if let Some(only) = report["only"].as_str() {
        anyhow::bail!(
            "{input} measured only part of the benchmark (CHAT_BENCH_ONLY={only}); \
             docs/BENCHMARKS.md is made from a whole run"
        );
    }
    let dir = Path::new("docs/bench");
    std::fs::create_dir_all(dir)?;
    // The run itself goes with the document made from it.
    std::fs::write(dir.join("report.json"), &text)?;

    // Charts.
    let ops = ["create", "login", "list", "send", "send → delivery"];
    let mut categories: Vec<String> = vec!["raw echo".into()];
    categories.extend(ops.iter().map(|o| o.to_string()));
    let mut series = Vec::new();
    for (transport, store) in [
        ("socket", "memory"),
        ("grpc", "memory"),
        ("socket", "durable"),
        ("grpc", "durable"),
    ] {
        for (q, key) in [("p50", "p50_us"), ("p99", "p99_us")] {
            let mut values = vec![
                latency(&report, "raw", "-", "echo round trip")
                    .map(|l| f(l, key))
                    .unwrap_or(0.0),
            ];
            values.extend(ops.iter().map(|op| {
                latency(&report, transport, store, op)
                    .map(|l| f(l, key))
                    .unwrap_or(0.0)
            }));
            series.push((format!("{transport} {store} {q}"), values));
        }
    }
    bars(
        &dir.join("latency.svg"),
        "Idle round-trip latency per operation (µs; first group: raw TCP echo)",
        "µs",
        &categories,
        &series,
    )?;

    let curve = |key: &str, scale: f64| {
        let mut out = Vec::new();
        for (transport, store) in [
            ("relay", "-"),
            ("socket", "memory"),
            ("socket", "durable"),
            ("grpc", "memory"),
            ("grpc", "durable"),
            ("socket", "sqlite"),
        ] {
            let points: Vec<(f64, f64)> = rows(&report, "throughput")
                .into_iter()
                .filter(|t| {
                    s(t, "transport") == transport
                        && s(t, "store") == store
                        && s(t, "mode") == "pipelined"
                })
                .map(|t| (f(t, "pairs"), f(t, key) * scale))
                .collect();
            if points.is_empty() {
                continue;
            }
            let name = if transport == "relay" {
                "minimal relay".to_string()
            } else {
                format!("{transport} {store}")
            };
            out.push((name, points));
        }
        out
    };
    let max_pairs = rows(&report, "throughput")
        .into_iter()
        .map(|t| f(t, "pairs"))
        .fold(1.0, f64::max);
    lines(
        &dir.join("throughput.svg"),
        Lines {
            title: "Delivered messages/s vs concurrent pairs (pipelined)",
            x_desc: "sender/recipient pairs (log)",
            y_desc: "delivered messages / s",
            x_max: max_pairs,
        },
        &curve("per_second", 1.0),
    )?;
    lines(
        &dir.join("p99.svg"),
        Lines {
            title: "Send → delivery p99 under load vs concurrent pairs (pipelined, window 32)",
            x_desc: "sender/recipient pairs (log)",
            y_desc: "p99, ms",
            x_max: max_pairs,
        },
        &curve("p99_us", 1e-3),
    )?;
    let held = |key: &str, scale: f64| {
        let mut out = Vec::new();
        for (transport, store) in [
            ("socket", "memory"),
            ("socket", "durable"),
            ("grpc", "memory"),
            ("grpc", "durable"),
        ] {
            let points: Vec<(f64, f64)> = rows(&report, "sessions")
                .into_iter()
                .filter(|x| s(x, "transport") == transport && s(x, "store") == store)
                .map(|x| (f(x, "sessions"), f(x, key) * scale))
                .collect();
            out.push((format!("{transport} {store}"), points));
        }
        out
    };
    let max_sessions = rows(&report, "sessions")
        .into_iter()
        .map(|x| f(x, "sessions"))
        .fold(1.0, f64::max);
    lines(
        &dir.join("sessions.svg"),
        Lines {
            title: "A 16-pair load's delivered messages/s vs idle sessions held",
            x_desc: "idle sessions held (log)",
            y_desc: "delivered messages / s",
            x_max: max_sessions,
        },
        &held("load_per_second", 1.0),
    )?;
    lines(
        &dir.join("sessions_p99.svg"),
        Lines {
            title: "That load's send → delivery p99 vs idle sessions held",
            x_desc: "idle sessions held (log)",
            y_desc: "p99, ms",
            x_max: max_sessions,
        },
        &held("load_p99_us", 1e-3),
    )?;

    let byte_ops: Vec<String> = rows(&report, "bytes")
        .into_iter()
        .filter(|b| s(b, "transport") == "socket")
        .map(|b| s(b, "op").to_string())
        .collect();
    let byte_series: Vec<(String, Vec<f64>)> = ["socket", "grpc"]
        .iter()
        .map(|t| {
            let values = byte_ops
                .iter()
                .map(|op| {
                    rows(&report, "bytes")
                        .into_iter()
                        .find(|b| s(b, "transport") == *t && s(b, "op") == op)
                        .map(|b| f(b, "up") + f(b, "down"))
                        .unwrap_or(0.0)
                })
                .collect();
            (t.to_string(), values)
        })
        .collect();
    let short: Vec<String> = byte_ops
        .iter()
        .map(|o| o.split(' ').next().unwrap_or(o).to_string())
        .collect();
    bars(
        &dir.join("bytes.svg"),
        "Bytes on the wire per operation (up + down)",
        "bytes",
        &short,
        &byte_series,
    )?;

    // The document.
    let m = &report["machine"];
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Generated by `cargo xtask bench-report` from a real run of `cargo bench -p chat-bench --bench protocols`{} on {} \
         ({} cores, {}, {}, {}). Every server ran as its own process on loopback, the load generator in the benchmark's \
         process; figures from one run are compared as ratios, because absolute times on this shared machine are not \
         stable. The run's JSON is [bench/report.json](bench/report.json). The durable store is the default (the log store, `chat-store-log`); `sqlite` rows are the SQLite store \
         it replaced as the default. Unless a row says `login`, servers hash passwords with argon2's cheapest parameters, \
         so that no other row measures hashing.\n",
        if report["quick"].as_bool() == Some(true) {
            " (quick mode)"
        } else {
            ""
        },
        s(&report, "date"),
        m["cores"],
        s(m, "cpu"),
        s(m, "os"),
        s(m, "rustc"),
    )?;

    writeln!(md, "## Against the targets\n")?;
    writeln!(md, "| target | measured | verdict |\n|---|---|---|")?;
    for t in targets(&report) {
        writeln!(md, "| {} | {} | {} |", t.what, t.measured, verdict(t.met))?;
    }
    writeln!(
        md,
        "\nWhy the unmet ones are unmet, with their profiles and next steps, is in the notes at the end."
    )?;

    writeln!(
        md,
        "\n## Throughput and the scaling curve\n\n\
         Pipelined rows: each sender keeps up to `window` messages in flight (a place frees when its recipient \
         gets one) and reads its receipts as they come; recipients acknowledge in batches (every 64 messages or \
         50 ms). The minimal relay (length-delimited frames forwarded by name, no accounts, no acknowledgements, no \
         storage) is run the same way, pipelined. One-at-a-time rows: each send waits for its answer, recipients \
         acknowledge every 64th message and wait for it, as the raw echo ping-pongs. Every row is shown as a ratio \
         to both floors at the same pairs where the run measured them (the relay at every pipelined pair count, the \
         echo at the one-at-a-time ones); the pipelined rows compare like with like against the relay, the \
         one-at-a-time rows against the echo. `srv` and `gen`: cores used by the server \
         and by the load generator; `limit`: `server thread` when one server thread was busy ≥ 90%, else the side \
         using more cores when together they used ≥ 85% of the machine, else `waiting`.\n\n\
         ![throughput](bench/throughput.svg)\n\n![p99](bench/p99.svg)\n"
    )?;
    writeln!(
        md,
        "| transport | store | mode | pairs | delivered/s | p50 µs | p99 µs | server CPU µs/msg | srv | gen | limit | ÷ relay msgs/s | ÷ relay CPU | ÷ echo msgs/s | ÷ echo CPU |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    )?;
    // The PostgreSQL rows have a section of their own, with the database's
    // CPU.
    for t in rows(&report, "throughput")
        .into_iter()
        .filter(|t| !postgres::on_database(t))
    {
        let pairs = t["pairs"].as_u64().unwrap_or(0);
        // Both floors for every row (same pairs), when the run has them.
        let ratios = |floor: Option<&Value>| {
            floor
                .map(|r| {
                    format!(
                        "{:.2}× | {:.2}×",
                        f(t, "per_second") / f(r, "per_second"),
                        f(t, "server_cpu_us_per_msg") / f(r, "server_cpu_us_per_msg"),
                    )
                })
                .unwrap_or_else(|| "– | –".into())
        };
        let relay = ratios(throughput(&report, "relay", "-", "pipelined", pairs));
        let echo = ratios(throughput(&report, "raw", "-", "ping-pong", pairs));
        writeln!(
            md,
            "| {} | {} | {} | {pairs} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {relay} | {echo} |",
            s(t, "transport"),
            s(t, "store"),
            s(t, "mode"),
            f(t, "per_second"),
            f(t, "p50_us"),
            f(t, "p99_us"),
            f(t, "server_cpu_us_per_msg"),
            f(t, "server_cores"),
            f(t, "generator_cores"),
            s(t, "bottleneck"),
        )?;
    }

    postgres::section(&mut md, &report)?;

    let raw = latency(&report, "raw", "-", "echo round trip");
    writeln!(
        md,
        "\n## Idle round-trip latency\n\nOne request at a time on an idle server.{}\n\n![latency](bench/latency.svg)\n",
        report["sync_us"]
            .as_f64()
            .map(|sync| format!(
                " One 400-byte append and `fdatasync` on the same disk, alone: {sync:.0} µs."
            ))
            .unwrap_or_default()
    )?;
    writeln!(
        md,
        "| transport | store | operation | samples | p50 µs | p99 µs | p99.9 µs | p50 ÷ raw | p99 ÷ raw |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
    )?;
    for l in rows(&report, "latency") {
        let (a, b) = raw
            .map(|r| {
                (
                    f(l, "p50_us") / f(r, "p50_us"),
                    f(l, "p99_us") / f(r, "p99_us"),
                )
            })
            .unwrap_or((0.0, 0.0));
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {a:.2}× | {b:.2}× |",
            s(l, "transport"),
            s(l, "store"),
            s(l, "op"),
            l["samples"],
            f(l, "p50_us"),
            f(l, "p99_us"),
            f(l, "p999_us")
        )?;
    }

    writeln!(
        md,
        "\n## Idle sessions\n\nA fresh server per row: the accounts are created (and logged out) first, then the sessions \
         log in and stay idle; RSS per session is the growth from opening them. A pipelined 16-pair load then runs while \
         they are held. This machine allows 20,000 descriptors per process (even to root), which bounds the largest row.\n\n\
         ![sessions](bench/sessions.svg)\n\n![sessions p99](bench/sessions_p99.svg)\n"
    )?;
    writeln!(
        md,
        "| transport | store | sessions held | server RSS per session | load delivered/s | load p99 µs |\n|---|---|---:|---:|---:|---:|"
    )?;
    for x in rows(&report, "sessions") {
        writeln!(
            md,
            "| {} | {} | {} | {:.1} KiB | {:.0} | {:.0} |",
            s(x, "transport"),
            s(x, "store"),
            x["sessions"],
            f(x, "per_session") / 1024.0,
            f(x, "load_per_second"),
            f(x, "load_p99_us"),
        )?;
    }

    writeln!(
        md,
        "\n## Connections and logins\n\nEight clients connecting, completing the handshake and closing, for the window. `bare hello`: \
         a generator that only connects, sends HELLO and reads WELCOME, as lean as the relay's.\n\n\
         | transport | connects+handshakes/s | server CPU µs per connection | srv | gen |\n|---|---:|---:|---:|---:|"
    )?;
    for c in rows(&report, "connects") {
        writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} |",
            s(c, "transport"),
            f(c, "per_second"),
            f(c, "server_cpu_us_per_connect"),
            f(c, "server_cores"),
            f(c, "generator_cores")
        )?;
    }
    if let Some(h) = report["hash_cost"].as_object() {
        let g = |k: &str| h.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        writeln!(
            md,
            "\nLogins with the server's real password hashing (argon2id, 19 MiB, 2 passes), 16 clients logging in and out. \
             One verification alone took {:.1} ms: at the server's {} at a time that allows {:.0} logins/s, on every core {:.0}/s.\n",
            g("verify_us") / 1000.0,
            h.get("concurrent").and_then(Value::as_u64).unwrap_or(0),
            g("configured_per_second"),
            g("all_cores_per_second")
        )?;
    }
    writeln!(md, "| transport | logins/s |\n|---|---:|")?;
    for l in rows(&report, "logins") {
        writeln!(md, "| {} | {:.0} |", s(l, "transport"), f(l, "per_second"))?;
    }

    writeln!(
        md,
        "\n## Bytes on the wire\n\nCounted at the TCP layer through a forwarding proxy; sends carry a 3-byte recipient and a 41-byte body.\n\n![bytes](bench/bytes.svg)\n"
    )?;
    writeln!(
        md,
        "| transport | operation | up | down |\n|---|---|---:|---:|"
    )?;
    for b in rows(&report, "bytes") {
        writeln!(
            md,
            "| {} | {} | {} | {} |",
            s(b, "transport"),
            s(b, "op"),
            b["up"],
            b["down"]
        )?;
    }
    let notes = Path::new("docs/BENCHMARKS-notes.md");
    if let Ok(extra) = std::fs::read_to_string(notes) {
        writeln!(md, "\n{}", extra.trim_end())?;
    }
    std::fs::write("docs/BENCHMARKS.md", md)?;
    eprintln!("wrote docs/BENCHMARKS.md and docs/bench/*.svg from {input}");
    Ok(())
}
