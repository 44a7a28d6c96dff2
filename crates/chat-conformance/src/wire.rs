//! Bytes on the wire, counted at the TCP layer: a loopback proxy that
//! forwards a connection and counts what crosses it in each direction, and
//! a per-operation cost table built on it. Works the same for every
//! transport, so HTTP/2 and protobuf overhead is measured, not estimated.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chat_core::client::{ChatClient, Push};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards connections to a target and counts the bytes each way.
pub struct CountingProxy {
    /// Where clients should connect.
    pub addr: SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl CountingProxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let (up2, down2) = (Arc::clone(&up), Arc::clone(&down));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, Arc::clone(&up2)));
                tokio::spawn(pump(server_read, client_write, Arc::clone(&down2)));
            }
        });
        Ok(Self { addr, up, down })
    }

    /// Bytes sent client → server and server → client so far, read once
    /// the traffic has been quiet for a moment (so that acknowledgements a
    /// protocol sends after a reply, like HTTP/2 window updates, are
    /// counted with the operation that caused them).
    pub async fn settled(&self) -> (u64, u64) {
        let mut last = (u64::MAX, u64::MAX);
        loop {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let now = (
                self.up.load(Ordering::SeqCst),
                self.down.load(Ordering::SeqCst),
            );
            if now == last {
                return now;
            }
            last = now;
        }
    }
}

/// Copies one direction, counting before forwarding.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::SeqCst);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// What one operation cost on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    /// The operation.
    pub operation: &'static str,
    /// Bytes client → server.
    pub up: u64,
    /// Bytes server → client.
    pub down: u64,
}

/// The body every measured send carries (41 bytes).
pub const BODY: &str = "the quick brown fox jumps over a lazy dog";
/// The recipient of every measured send (3 bytes).
pub const RECIPIENT: &str = "bob";

/// Measures each operation's bytes over `server` for one transport, with a
/// fresh client per side connected through a counting proxy.
pub async fn measure<C, F, Fut>(server: SocketAddr, connect: F) -> Vec<Cost>
where
    C: ChatClient,
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = C>,
{
    let alice_proxy = CountingProxy::start(server).await.expect("proxy");
    let bob_proxy = CountingProxy::start(server).await.expect("proxy");
    let mut costs = Vec::new();
    let mark = |costs: &mut Vec<Cost>, operation, before: (u64, u64), after: (u64, u64)| {
        costs.push(Cost {
            operation,
            up: after.0 - before.0,
            down: after.1 - before.1,
        });
    };

    let start = alice_proxy.settled().await;
    let mut alice = connect(alice_proxy.addr).await;
    let after = alice_proxy.settled().await;
    mark(&mut costs, "connect", start, after);

    let mut bob = connect(bob_proxy.addr).await;
    bob.create(RECIPIENT, "password1")
        .await
        .expect("create bob");

    let before = alice_proxy.settled().await;
    alice
        .create("alice", "password1")
        .await
        .expect("create alice");
    let after = alice_proxy.settled().await;
    mark(&mut costs, "create", before, after);

    let before = alice_proxy.settled().await;
    let bob_before = bob_proxy.settled().await;
    alice.send(RECIPIENT, BODY).await.expect("send");
    match tokio::time::timeout(Duration::from_secs(20), bob.next_push()).await {
        Ok(Some(Push::Message(_))) => {}
        other => panic!("expected the live message, got {other:?}"),
    }
    let after = alice_proxy.settled().await;
    let bob_after = bob_proxy.settled().await;
    mark(&mut costs, "send", before, after);
    mark(
        &mut costs,
        "live push (recipient side)",
        bob_before,
        bob_after,
    );

    let before = alice_proxy.settled().await;
    alice.list("", 0).await.expect("list");
    let after = alice_proxy.settled().await;
    mark(&mut costs, "list (2 names)", before, after);

    bob.logout().await.expect("logout bob");
    alice.send(RECIPIENT, BODY).await.expect("queued send");
    bob.login(RECIPIENT, "password1").await.expect("login bob");
    let before = bob_proxy.settled().await;
    assert_eq!(bob.fetch(0).await.expect("fetch").len(), 1);
    let after = bob_proxy.settled().await;
    mark(&mut costs, "fetch (1 message)", before, after);

    let before = alice_proxy.settled().await;
    alice.logout().await.expect("logout");
    let after = alice_proxy.settled().await;
    mark(&mut costs, "logout", before, after);

    let before = alice_proxy.settled().await;
    alice.login("alice", "password1").await.expect("login");
    let after = alice_proxy.settled().await;
    mark(&mut costs, "login", before, after);

    let before = alice_proxy.settled().await;
    alice.delete("password1").await.expect("delete");
    let after = alice_proxy.settled().await;
    mark(&mut costs, "delete", before, after);
    costs
}
