//! Fuzz targets, runnable on the stable toolchain: proptest generates
//! inputs (random bytes, mutations of a checked-in seed corpus, and
//! sequences of valid frames with mutations), shrinks any failure to a
//! small case, and runs for a time budget.
//!
//! - `frame_decoder`: whatever the bytes, both sides' decoders return a
//!   frame, "need more", or an error — never a panic — and a frame they
//!   return encodes to bytes that decode to the same frame.
//! - `live_server`: the bytes, after a valid hello, go to a real server on
//!   a real engine; whatever they do to their own connection, the server
//!   keeps serving a well-behaved client.
//!
//! `cargo test` runs each briefly; `cargo xtask fuzz --secs N` runs each for
//! N seconds (`CHAT_FUZZ_SECS`). Seeds live in `fuzz/corpus/*.hex` (one
//! frame or frame sequence per file, as hex).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chat_core::Chat;
use chat_core::client::ChatClient;
use chat_socket::codec::{ClientCodec, ServerCodec};
use chat_socket::{ServerConfig, SocketClient};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

/// Seconds each target runs: `CHAT_FUZZ_SECS`, else a short default so
/// that `cargo test` stays quick.
fn budget() -> Duration {
    let secs = std::env::var("CHAT_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0_f64);
    Duration::from_secs_f64(secs)
}

/// The seed corpus: every `fuzz/corpus/*.hex` file, decoded.
fn corpus() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus");
    let mut seeds = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .expect("the seed corpus exists")
        .map(|entry| entry.expect("readable corpus").path())
        .filter(|path| path.extension().is_some_and(|e| e == "hex"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("readable seed");
        let bytes = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .flat_map(str::split_whitespace)
            .map(|w| u8::from_str_radix(w, 16).unwrap_or_else(|_| panic!("{path:?}: {w:?}")))
            .collect();
        seeds.push(bytes);
    }
    assert!(!seeds.is_empty(), "no seeds in {dir}");
    seeds
}

/// One change to a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, to: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Repeat,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, to)| Mutation::Set { at, to }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        Just(Mutation::Repeat),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip { at, bit } => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b ^= 1 << bit;
                }
            }
            Mutation::Set { at, to } => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b = *to;
                }
            }
            Mutation::Truncate { at } => bytes.truncate(at % len),
            Mutation::Insert { at, bytes: more } => {
                let at = (at % len).min(bytes.len());
                bytes.splice(at..at, more.iter().copied());
            }
            Mutation::Repeat => {
                let copy = bytes.clone();
                bytes.extend(copy);
            }
        }
    }
    bytes
}

/// Inputs: random bytes, or seeds (alone or concatenated) with mutations.
fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let seed = proptest::sample::select(seeds);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        (
            prop::collection::vec(seed, 1..4),
            prop::collection::vec(mutation(), 0..6)
        )
            .prop_map(|(parts, mutations)| mutate(parts.concat(), &mutations)),
    ]
}

/// Runs `test` on generated inputs until the budget is spent; a failure
/// is shrunk and reported with the smallest input found.
fn fuzz(name: &str, test: impl Fn(Vec<u8>) -> Result<(), TestCaseError>) {
    let seeds = corpus();
    // Every seed as it is, first.
    for seed in &seeds {
        if let Err(err) = test(seed.clone()) {
            panic!("{name}: a corpus seed fails: {err}");
        }
    }
    let deadline = Instant::now() + budget();
    let mut cases = 0u64;
    while Instant::now() < deadline {
        // A fresh runner each round: a new random seed, and a count of its
        // own (a runner counts its cases across runs).
        let mut runner = TestRunner::new(Config {
            cases: 64,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(err) = runner.run(&input(seeds.clone()), &test) {
            panic!("{name}: {err}");
        }
        cases += 64;
    }
    eprintln!("fuzz {name}: {cases} cases in {:?}, no failure", budget());
}

/// Decodes everything in `bytes` as a server would; each frame it gets
/// must encode (as a client would) to bytes that decode to it again.
fn server_side(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(frame)) = ServerCodec::new(1 << 16).decode(&mut buf) {
        let mut wire = BytesMut::new();
        if ClientCodec::new(1 << 16)
            .encode(frame.clone(), &mut wire)
            .is_ok()
        {
            let again = ServerCodec::new(1 << 16).decode(&mut wire).ok().flatten();
            prop_assert_eq!(again, Some(frame));
        }
    }
    Ok(())
}

/// The same for a client decoding what a server sends.
fn client_side(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(frame)) = ClientCodec::new(1 << 20).decode(&mut buf) {
        let mut wire = BytesMut::new();
        if ServerCodec::new(1 << 20)
            .encode(frame.clone(), &mut wire)
            .is_ok()
        {
            let again = ClientCodec::new(1 << 20).decode(&mut wire).ok().flatten();
            prop_assert_eq!(again, Some(frame));
        }
    }
    Ok(())
}

#[test]
fn frame_decoder() {
    fuzz("frame_decoder", |bytes| {
        server_side(&bytes)?;
        client_side(&bytes)
    });
}

/// Set by the panic hook: a panic anywhere in the process (a server task
/// included, where tokio would otherwise swallow it) fails the case.
static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn watch_for_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
        default(info);
    }));
}

/// A v2 hello without features, as a fuzzed connection's first frame.
const HELLO: [u8; 17] = [
    0, 0, 0, 13, 0x01, b'C', b'H', b'A', b'T', 0, 2, 0, 2, 0, 0, 0, 0,
];

#[test]
fn live_server() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    watch_for_panics();
    let addr: SocketAddr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServerConfig {
            idle_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        };
        let engine = chat_core::Config {
            hashing: chat_core::HashingConfig::cheap_for_tests(),
            ..chat_core::Config::default()
        };
        let chat = Chat::new(
            std::sync::Arc::new(chat_core::MemoryStore::default()),
            engine,
        );
        tokio::spawn(chat_socket::serve(
            listener,
            chat,
            config,
            std::future::pending(),
        ));
        addr
    });
    fuzz("live_server", |bytes| {
        // Each case starts clean, so a failure is this case's (and
        // shrinking keeps the input that causes it).
        PANICKED.store(false, std::sync::atomic::Ordering::SeqCst);
        runtime.block_on(async {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut all = HELLO.to_vec();
            all.extend_from_slice(&bytes);
            let _ = conn.write_all(&all).await;
            // Let the server answer what it can, then go.
            let mut sink = [0u8; 4096];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(20), conn.read(&mut sink)).await
            {
                if n == 0 {
                    break;
                }
            }
            Ok::<(), TestCaseError>(())
        })?;
        prop_assert!(
            !PANICKED.load(std::sync::atomic::Ordering::SeqCst),
            "the server panicked on this input"
        );
        Ok(())
    });
    // The server survived everything and still serves.
    runtime.block_on(async {
        let mut client = SocketClient::connect(addr).await.unwrap();
        client.create("survivor", "password1").await.unwrap();
        assert_eq!(client.list("survivor", 0).await.unwrap().len(), 1);
    });
}
