//! Criterion micro-benchmarks: the socket codec and the engine's send path.
//! `cargo bench -p chat-bench --bench micro` (`CHAT_BENCH_QUICK=1` or
//! `-- --quick` for a short run).

use std::hint::black_box;

use bytes::BytesMut;
use chat_core::{Chat, Message, MessageBody, Username};
use chat_socket::codec::{ClientCodec, ServerCodec};
use chat_socket::{ClientFrame, ServerFrame};
use criterion::{Criterion, criterion_group, criterion_main};
use tokio_util::codec::{Decoder, Encoder};

fn codec(c: &mut Criterion) {
    let send = ClientFrame::SendOnce {
        id: 7,
        to: "bob".into(),
        body: "x".repeat(280),
    };
    let push = ServerFrame::PushMessage(Message {
        id: 9,
        sender: Username::parse("alice").unwrap(),
        body: MessageBody::parse(&"x".repeat(280)).unwrap(),
        timestamp_ms: 1_764_000_000_000,
    });
    c.bench_function("encode SEND ONCE", |b| {
        let mut codec = ClientCodec::new(1 << 20);
        let mut buf = BytesMut::with_capacity(1024);
        b.iter(|| {
            buf.clear();
            codec.encode(black_box(send.clone()), &mut buf).unwrap();
        })
    });
    let mut wire = BytesMut::new();
    ClientCodec::new(1 << 20)
        .encode(send.clone(), &mut wire)
        .unwrap();
    c.bench_function("decode SEND ONCE", |b| {
        let mut codec = ServerCodec::new(8192);
        b.iter(|| {
            let mut buf = wire.clone();
            black_box(codec.decode(&mut buf).unwrap());
        })
    });
    c.bench_function("encode PUSH MESSAGE", |b| {
        let mut codec = ServerCodec::new(8192);
        let mut buf = BytesMut::with_capacity(1024);
        b.iter(|| {
            buf.clear();
            codec.encode(black_box(push.clone()), &mut buf).unwrap();
        })
    });
}

fn send_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let chat = Chat::in_memory();
    let (alice, _a) = chat.open_session();
    let (bob, mut bob_events) = chat.open_session();
    runtime.block_on(async {
        alice.create("alice", "password1").await.unwrap();
        bob.create("bob", "password1").await.unwrap();
    });
    let body = "x".repeat(280);
    c.bench_function("engine send → live event → ack (memory store)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                alice.send("bob", &body).await.unwrap();
                if let Some(chat_core::Event::Message(m)) = bob_events.recv().await {
                    bob.ack(m.id).await.unwrap();
                }
            })
        })
    });
}

/// `CHAT_BENCH_QUICK=1` (as CI runs it): a few samples, short windows.
fn config() -> Criterion {
    if std::env::var_os("CHAT_BENCH_QUICK").is_some() {
        Criterion::default()
            .sample_size(10)
            .warm_up_time(std::time::Duration::from_millis(100))
            .measurement_time(std::time::Duration::from_millis(300))
    } else {
        Criterion::default()
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = codec, send_path
}
criterion_main!(benches);
