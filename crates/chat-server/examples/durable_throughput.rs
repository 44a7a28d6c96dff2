//! Send throughput on the default durable store (the log store: group
//! commit, one fdatasync per batch) against the
//! memory store, with 64 concurrent senders, in one run so the figures are
//! ratios: once calling the engine directly (the storage write path alone),
//! once through the socket transport with the real client library (64
//! connections over loopback, each send acknowledged after it is stored).
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
        sender
            .create(&format!("sender{i}"), "password1")
            .await
            .unwrap();
        let (recipient, _) = chat.open_session();
        recipient
            .create(&format!("recipient{i}"), "password1")
            .await
            .unwrap();
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
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
    (SENDERS * EACH) as f64 / start.elapsed().as_secs_f64()
}

/// The same load through the socket transport: 64 clients, each sending
/// to its own offline recipient.
async fn over_socket(chat: Chat) -> f64 {
    use chat_core::client::ChatClient;
    let bound =
        chat_server::Bound::bind(&[chat_server::Listen::Socket("127.0.0.1:0".parse().unwrap())])
            .await
            .unwrap();
    let addr = bound.local_addrs().unwrap()[0];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        bound
            .serve(chat, &chat_server::Tuning::default(), async {
                let _ = stopped.await;
            })
            .await
    });
    let mut clients = Vec::new();
    for i in 0..SENDERS {
        let mut recipient = chat_socket::SocketClient::connect(addr).await.unwrap();
        recipient
            .create(&format!("recipient{i}"), "password1")
            .await
            .unwrap();
        recipient.logout().await.unwrap();
        let mut sender = chat_socket::SocketClient::connect(addr).await.unwrap();
        sender
            .create(&format!("sender{i}"), "password1")
            .await
            .unwrap();
        clients.push(sender);
    }
    let start = Instant::now();
    let tasks = clients.into_iter().enumerate().map(|(i, mut sender)| {
        tokio::spawn(async move {
            for n in 0..EACH {
                sender
                    .send(&format!("recipient{i}"), &format!("message {n}"))
                    .await
                    .unwrap();
            }
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
    let rate = (SENDERS * EACH) as f64 / start.elapsed().as_secs_f64();
    let _ = stop.send(());
    let _ = server.await;
    rate
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("chat-throughput-{}", std::process::id()));
    let mut rows = Vec::new();
    for round in 0..3 {
        let memory = throughput(Storage::memory().open().await?).await;
        let durable = throughput(
            Storage::durable(data.join(format!("engine{round}")).to_string_lossy())
                .open()
                .await?,
        )
        .await;
        let socket_memory = over_socket(Storage::memory().open().await?).await;
        let socket_durable = over_socket(
            Storage::durable(data.join(format!("socket{round}")).to_string_lossy())
                .open()
                .await?,
        )
        .await;
        rows.push((memory, durable, socket_memory, socket_durable));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(&data);
    println!("{SENDERS} concurrent senders x {EACH} sends each; sends/s");
    println!(
        "| round | engine, memory | engine, durable | durable/memory | socket, memory | socket, durable | durable/memory |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (round, (m, d, sm, sd)) in rows.iter().enumerate() {
        println!(
            "| {} | {m:.0} | {d:.0} | {:.1}% | {sm:.0} | {sd:.0} | {:.0}% |",
            round + 1,
            100.0 * d / m,
            100.0 * sd / sm
        );
    }
    Ok(())
}
