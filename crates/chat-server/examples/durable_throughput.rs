//! Send throughput of the engine on the durable SQLite store (group commit)
//! against the memory store, with 64 concurrent senders, in one run so the
//! figure is a ratio. No network: this isolates the storage write path.
//!
//! Run it with `cargo run --release -p chat-server --example durable_throughput`.

use std::time::{Duration, Instant};

use chat_core::Chat;
use chat_server::Storage;

const SENDERS: usize = 64;
const EACH: usize = 200;

async fn throughput(chat: Chat) -> f64 {
    let mut pairs = Vec::new();
    for i in 0..SENDERS {
        let (sender, _) = chat.open_session();
        sender.create(&format!("sender{i}")).await.unwrap();
        let (recipient, _) = chat.open_session();
        recipient.create(&format!("recipient{i}")).await.unwrap();
        recipient.logout().await.unwrap();
        pairs.push(sender);
    }
    let start = Instant::now();
    let tasks = pairs.into_iter().enumerate().map(|(i, sender)| {
        tokio::spawn(async move {
            for n in 0..EACH {
                sender
                    .send(&format!("recipient{i}"), &format!("message {n}"))
                    .await
                    .unwrap();
            }
        })
    });
    for task in futures_join(tasks).await {
        task.unwrap();
    }
    (SENDERS * EACH) as f64 / start.elapsed().as_secs_f64()
}

async fn futures_join<T>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        out.push(task.await);
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("chat-throughput-{}", std::process::id()));
    let mut rows = Vec::new();
    for round in 0..3 {
        let memory = throughput(Storage::memory().open().await?).await;
        let dir = data.join(format!("round{round}"));
        let durable = throughput(Storage::sqlite(dir.to_string_lossy()).open().await?).await;
        rows.push((memory, durable));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(&data);
    println!("{SENDERS} concurrent senders x {EACH} sends each, engine only (no network)");
    println!(
        "| round | memory sends/s | durable (SQLite, group commit) sends/s | durable/memory |"
    );
    println!("|---|---:|---:|---:|");
    for (round, (memory, durable)) in rows.iter().enumerate() {
        println!(
            "| {} | {memory:.0} | {durable:.0} | {:.0}% |",
            round + 1,
            100.0 * durable / memory
        );
    }
    Ok(())
}
