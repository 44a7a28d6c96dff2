//! `cargo xtask bench-report [REPORT.json]`: turns the benchmark's JSON
//! (default `target/chat-bench/report.json`, written by `cargo bench`) into
//! `docs/BENCHMARKS.md` with SVG charts in `docs/bench/`.

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
    pairs: u64,
) -> Option<&'a Value> {
    rows(report, "throughput").into_iter().find(|t| {
        s(t, "transport") == transport
            && s(t, "store") == store
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

/// Throughput against the number of pairs, one line per transport/store.
fn lines(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> anyhow::Result<()> {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.15;
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d((1.0_f64..300.0_f64).log_scale(), 0.0..max)?;
    chart
        .configure_mesh()
        .x_desc("concurrent sender/recipient pairs (log)")
        .y_desc("delivered messages / s")
        .draw()?;
    for (k, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
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

pub fn run(input: Option<&str>) -> anyhow::Result<()> {
    let input = input.unwrap_or("target/chat-bench/report.json");
    let text = std::fs::read_to_string(input).with_context(|| {
        format!("cannot read {input}; run `cargo bench -p chat-bench --bench protocols` first")
    })?;
    let report: Value = serde_json::from_str(&text).context("the report is not valid JSON")?;
    let dir = Path::new("docs/bench");
    std::fs::create_dir_all(dir)?;

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
        "Round-trip latency per operation (µs; first group: raw TCP echo)",
        "µs",
        &categories,
        &series,
    )?;

    let mut tput = Vec::new();
    for (transport, store) in [
        ("raw", "-"),
        ("socket", "memory"),
        ("socket", "durable"),
        ("grpc", "memory"),
        ("grpc", "durable"),
    ] {
        let points: Vec<(f64, f64)> = rows(&report, "throughput")
            .into_iter()
            .filter(|t| s(t, "transport") == transport && s(t, "store") == store)
            .map(|t| (f(t, "pairs"), f(t, "per_second")))
            .collect();
        let name = if transport == "raw" {
            "raw TCP echo".to_string()
        } else {
            format!("{transport} {store}")
        };
        tput.push((name, points));
    }
    lines(
        &dir.join("throughput.svg"),
        "Throughput vs concurrent pairs",
        &tput,
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
         ({} cores, {}, {}, {}). Every server ran as its own process on loopback; figures from one run are compared as \
         ratios, because absolute times on this shared machine are not stable.\n",
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

    let raw = latency(&report, "raw", "-", "echo round trip");
    let sock = latency(&report, "socket", "memory", "send → delivery");
    let grpc = latency(&report, "grpc", "memory", "send → delivery");
    writeln!(md, "## Against the targets\n")?;
    writeln!(md, "| target | measured | verdict |\n|---|---|---|")?;
    if let (Some(r), Some(sk)) = (raw, sock) {
        let (a, b) = (
            f(sk, "p50_us") / f(r, "p50_us"),
            f(sk, "p99_us") / f(r, "p99_us"),
        );
        writeln!(
            md,
            "| socket send → delivery p50 ≤ 2.2× raw RTT | {a:.2}× | {} |",
            verdict(a <= 2.2)
        )?;
        writeln!(
            md,
            "| socket send → delivery p99 ≤ 1.5× raw RTT | {b:.2}× | {} |",
            verdict(b <= 1.5)
        )?;
    }
    for pairs in [16, 32, 256] {
        if let (Some(sk), Some(r)) = (
            throughput(&report, "socket", "memory", pairs),
            throughput(&report, "raw", "-", pairs),
        ) {
            let c = f(sk, "server_cpu_us_per_msg") / f(r, "server_cpu_us_per_msg");
            writeln!(
                md,
                "| server CPU per message ≤ 1.3× raw echo ({pairs} pairs) | {c:.2}× ({:.1} µs vs {:.1} µs) | {} |",
                f(sk, "server_cpu_us_per_msg"),
                f(r, "server_cpu_us_per_msg"),
                verdict(c <= 1.3)
            )?;
        }
    }
    if let (Some(sk), Some(r)) = (
        throughput(&report, "socket", "memory", 256),
        throughput(&report, "raw", "-", 256),
    ) {
        let t = f(sk, "per_second") / f(r, "per_second");
        writeln!(
            md,
            "| socket throughput at 256 pairs ≥ 75% of raw | {:.0}% | {} |",
            t * 100.0,
            verdict(t >= 0.75)
        )?;
    }
    for l in rows(&report, "logins")
        .into_iter()
        .filter(|l| s(l, "transport") == "socket")
    {
        // The 10,000/s target was set before passwords: since then every
        // login checks an argon2id hash (tens of milliseconds of a core by
        // design), so the figure is reported, not judged against it.
        writeln!(
            md,
            "| logins/s (socket; each checks an argon2id password) | {:.0}/s | informational: the 10,000/s target predates password hashing |",
            f(l, "per_second"),
        )?;
    }
    for x in rows(&report, "sessions")
        .into_iter()
        .filter(|x| s(x, "transport") == "socket")
    {
        let kib = f(x, "per_session") / 1024.0;
        writeln!(
            md,
            "| ≤ 10 KiB RSS per idle socket session ({} sessions held) | {kib:.1} KiB | {} |",
            x["sessions"],
            verdict(kib <= 10.0)
        )?;
    }
    if let (Some(g), Some(sk)) = (grpc, sock) {
        let r = f(g, "p50_us") / f(sk, "p50_us");
        writeln!(
            md,
            "| gRPC send → delivery p50 ≤ 3× socket | {r:.2}× | {} |",
            verdict(r <= 3.0)
        )?;
    }
    if let Some(b) = rows(&report, "bytes")
        .into_iter()
        .find(|b| s(b, "transport") == "socket" && s(b, "op") == "send")
    {
        let overhead = f(b, "up") - SEND_PAYLOAD;
        writeln!(
            md,
            "| socket send ≤ 12 bytes beyond recipient and body | {overhead:.0} bytes (SEND ONCE, idempotent) | {} |",
            verdict(overhead <= 12.0)
        )?;
    }
    if let (Some(d), Some(mem)) = (
        throughput(&report, "socket", "durable", 256),
        throughput(&report, "socket", "memory", 256),
    ) {
        let r = f(d, "per_second") / f(mem, "per_second");
        writeln!(
            md,
            "| durable throughput ≥ 50% of memory (256 pairs) | {:.0}% | {} |",
            r * 100.0,
            verdict(r >= 0.5)
        )?;
    }

    writeln!(
        md,
        "\n## Round-trip latency\n\n![latency](bench/latency.svg)\n"
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
        "\n## Throughput\n\n![throughput](bench/throughput.svg)\n"
    )?;
    writeln!(
        md,
        "| transport | store | pairs | delivered/s | delivery p50 µs | p99 µs | server CPU µs/msg | ÷ raw throughput | ÷ raw CPU |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for t in rows(&report, "throughput") {
        let pairs = t["pairs"].as_u64().unwrap_or(0);
        let r = throughput(&report, "raw", "-", pairs);
        let (a, b) = r
            .map(|r| {
                (
                    f(t, "per_second") / f(r, "per_second"),
                    f(t, "server_cpu_us_per_msg") / f(r, "server_cpu_us_per_msg"),
                )
            })
            .unwrap_or((0.0, 0.0));
        writeln!(
            md,
            "| {} | {} | {pairs} | {:.0} | {:.0} | {:.0} | {:.1} | {a:.2}× | {b:.2}× |",
            s(t, "transport"),
            s(t, "store"),
            f(t, "per_second"),
            f(t, "p50_us"),
            f(t, "p99_us"),
            f(t, "server_cpu_us_per_msg")
        )?;
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
    writeln!(
        md,
        "\n## Idle sessions and logins\n\n| transport | idle sessions held | server RSS per session | logins/s (16 clients) |\n|---|---:|---:|---:|"
    )?;
    for t in ["socket", "grpc"] {
        let x = rows(&report, "sessions")
            .into_iter()
            .find(|x| s(x, "transport") == t);
        let l = rows(&report, "logins")
            .into_iter()
            .find(|l| s(l, "transport") == t);
        writeln!(
            md,
            "| {t} | {} | {:.1} KiB | {:.0} |",
            x.map(|x| x["sessions"].to_string()).unwrap_or_default(),
            x.map(|x| f(x, "per_session") / 1024.0).unwrap_or(0.0),
            l.map(|l| f(l, "per_second")).unwrap_or(0.0)
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
