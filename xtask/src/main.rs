//! Project automation, run as `cargo xtask <task>`.
//!
//! - `ci`: exactly what `.ci/run` runs — format check, clippy with warnings
//!   denied, docs with warnings denied, the benchmark in quick mode, then
//!   the README's test command.
//! - `bench-report [REPORT.json]`: turns the benchmark's JSON into
//!   `docs/BENCHMARKS.md` and its SVG charts.
//! - `fuzz [--secs N]`: runs each fuzz target (`crates/chat-socket/tests/
//!   fuzz.rs`) for N seconds (default 60).

mod bench_report;

use std::process::Command;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        Some("ci") => ci(),
        Some("bench-report") => bench_report::run(std::env::args().nth(2).as_deref()),
        Some("fuzz") => fuzz(),
        Some(other) => bail!("unknown task {other:?}; tasks: ci, bench-report, fuzz"),
        None => bail!(
            "usage: cargo xtask <task>; tasks: ci, bench-report [REPORT.json], fuzz [--secs N]"
        ),
    }
}

/// One cargo invocation: its arguments and extra environment.
type Step = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

/// The CI steps, in order; the first failure stops the run.
fn ci() -> anyhow::Result<()> {
    let steps: &[Step] = &[
        (&["fmt", "--all", "--check"], &[]),
        (
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        ),
        (
            &["doc", "--workspace", "--no-deps"],
            &[("RUSTDOCFLAGS", "-D warnings")],
        ),
        (&["bench", "--workspace"], &[("CHAT_BENCH_QUICK", "1")]),
        (
            &[
                "test",
                "-p",
                "chat-socket",
                "--test",
                "fuzz",
                "--",
                "--nocapture",
            ],
            &[("CHAT_FUZZ_SECS", "20")],
        ),
        (&["test", "--workspace"], &[]),
    ];
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (args, env) in steps {
        eprintln!("xtask ci: cargo {}", args.join(" "));
        let status = Command::new(&cargo)
            .args(*args)
            .envs(env.iter().copied())
            .status()
            .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
        if !status.success() {
            bail!("cargo {} failed ({status})", args.join(" "));
        }
    }
    eprintln!("xtask ci: all steps passed");
    Ok(())
}

/// Runs the fuzz targets for `--secs N` each (default 60).
fn fuzz() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let secs = match args.as_slice() {
        [] => "60".to_string(),
        [flag, n] if flag == "--secs" => {
            n.parse::<f64>()
                .with_context(|| format!("--secs takes a number of seconds, not {n:?}"))?;
            n.clone()
        }
        other => bail!("usage: cargo xtask fuzz [--secs N], not {other:?}"),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "test",
            "--release",
            "-p",
            "chat-socket",
            "--test",
            "fuzz",
            "--",
            "--nocapture",
        ])
        .env("CHAT_FUZZ_SECS", &secs)
        .status()
        .context("cannot run cargo test")?;
    if !status.success() {
        bail!("a fuzz target failed ({status}); its smallest failing input is printed above");
    }
    Ok(())
}
