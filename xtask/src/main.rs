//! Project automation, run as `cargo xtask <task>`.
//!
//! - `ci`: exactly what `.ci/run` runs — format check, clippy with warnings
//!   denied, docs with warnings denied, the benchmark in quick mode, then
//!   the README's test command.
//! - `bench-report [REPORT.json]`: turns the benchmark's JSON into
//!   `docs/BENCHMARKS.md` and its SVG charts.

mod bench_report;

use std::process::Command;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        Some("ci") => ci(),
        Some("bench-report") => bench_report::run(std::env::args().nth(2).as_deref()),
        Some(other) => bail!("unknown task {other:?}; tasks: ci, bench-report"),
        None => bail!("usage: cargo xtask <task>; tasks: ci, bench-report [REPORT.json]"),
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
