//! The `chat` binary as a user's script drives it: real child processes
//! against a real server, reading the documented line format.

use std::process::Stdio;
use std::time::Duration;

use chat_core::Chat;
use chat_server::Listen;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const PATIENCE: Duration = Duration::from_secs(30);

struct ChatProcess {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ChatProcess {
    /// Starts `chat` against `server` over `transport` (`socket`/`grpc`).
    fn spawn(at: (&str, &str)) -> Self {
        Self::spawn_with(at, &[])
    }

    /// [`ChatProcess::spawn`] with more flags.
    fn spawn_with((transport, server): (&str, &str), flags: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
            .args(["--server", server, "--transport", transport])
            .args(flags)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chat");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            lines,
        }
    }

    async fn say(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("chat printed a line in time")
            .unwrap()
            .expect("chat still running")
    }

    /// Runs a command and returns its result line.
    async fn run(&mut self, line: &str) -> String {
        self.say(line).await;
        self.line().await
    }
}

/// A server with both transports on one engine; returns the socket and
/// gRPC addresses.
async fn start_server() -> (String, String) {
    let any = "127.0.0.1:0".parse().unwrap();
    let addrs = chat_server::spawn(&[Listen::Socket(any), Listen::Grpc(any)], Chat::in_memory())
        .await
        .unwrap();
    (addrs[0].to_string(), addrs[1].to_string())
}

#[tokio::test]
async fn two_users_chat_over_the_socket_protocol() {
    let (socket, _) = start_server().await;
    two_users_chat(("socket", &socket), ("socket", &socket)).await;
}

#[tokio::test]
async fn two_users_chat_over_grpc() {
    let (_, grpc) = start_server().await;
    two_users_chat(("grpc", &grpc), ("grpc", &grpc)).await;
}

#[tokio::test]
async fn a_socket_user_and_a_grpc_user_chat() {
    let (socket, grpc) = start_server().await;
    two_users_chat(("socket", &socket), ("grpc", &grpc)).await;
}

async fn two_users_chat(bob_at: (&str, &str), alice_at: (&str, &str)) {
    let mut bob = ChatProcess::spawn(bob_at);
    let mut alice = ChatProcess::spawn(alice_at);
    assert_eq!(bob.run("create bob password1").await, "ok logged in as bob");
    assert_eq!(
        alice.run("create alice password1").await,
        "ok logged in as alice"
    );
    assert_eq!(alice.run("send bob hello   bob").await, "ok sent bob 1");
    assert_eq!(bob.line().await, "message 1 alice hello   bob");

    assert_eq!(bob.run("logout").await, "ok logged out");
    assert_eq!(alice.run("send bob are you there?").await, "ok sent bob 2");
    assert_eq!(bob.run("login bob password1").await, "ok logged in as bob");
    bob.say("fetch").await;
    let message = bob.line().await;
    let parts: Vec<&str> = message.splitn(4, ' ').collect();
    assert_eq!(parts, ["message", "2", "alice", "are you there?"]);
    assert_eq!(bob.line().await, "ok fetched 1");

    assert_eq!(alice.run("list").await, "ok accounts 2 alice bob");
    assert_eq!(alice.run("list ^b 5").await, "ok accounts 1 bob");
    assert!(
        alice
            .run("send nobody hi")
            .await
            .starts_with("error no_such_user ")
    );
    assert!(
        alice
            .run("list (")
            .await
            .starts_with("error invalid_pattern ")
    );
    assert!(
        alice
            .run(&format!("send bob {}", "x".repeat(281)))
            .await
            .starts_with("error message_too_long ")
    );
    assert!(
        alice
            .run("dance")
            .await
            .starts_with("error unknown_command ")
    );

    assert_eq!(bob.run("quit").await, "ok bye");
    let status = tokio::time::timeout(PATIENCE, bob.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_killed_client_is_logged_out() {
    let (socket, grpc) = start_server().await;
    for server in [("socket", socket.as_str()), ("grpc", grpc.as_str())] {
        killed_client_is_logged_out(server).await;
    }
}

async fn killed_client_is_logged_out(server: (&str, &str)) {
    let mut alice = ChatProcess::spawn(server);
    assert_eq!(
        alice.run("create alice password1").await,
        "ok logged in as alice"
    );
    alice.child.kill().await.unwrap();

    let mut again = ChatProcess::spawn(server);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let reply = again.run("login alice password1").await;
        if reply == "ok logged in as alice" {
            assert_eq!(again.run("delete password1").await, "ok deleted alice");
            break;
        }
        assert!(reply.starts_with("error already_logged_in "), "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice never logged out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn end_of_input_exits_cleanly_and_logs_out() {
    let (socket, _) = start_server().await;
    let mut carol = ChatProcess::spawn(("socket", &socket));
    assert_eq!(
        carol.run("create carol password1").await,
        "ok logged in as carol"
    );
    drop(carol.stdin);
    let status = tokio::time::timeout(PATIENCE, carol.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    // The exit logged carol out.
    let mut again = ChatProcess::spawn(("socket", &socket));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let reply = again.run("login carol password1").await;
        if reply == "ok logged in as carol" {
            break;
        }
        assert!(reply.starts_with("error already_logged_in "), "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "carol never logged out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `--ca` on both transports against a TLS server: a socket user and a gRPC
/// user chat; without `--ca` (the system roots do not know the test CA) the
/// connection is refused and the reason shown.
#[tokio::test]
async fn users_chat_over_tls_with_the_servers_ca() {
    let pki = chat_conformance::pki::TestPki::new();
    let any = "127.0.0.1:0".parse().unwrap();
    let tuning = chat_server::Tuning {
        tls_cert: Some(pki.cert_path()),
        tls_key: Some(pki.key_path()),
        ..chat_server::Tuning::default()
    };
    let addrs = chat_server::spawn_with(
        &[Listen::Socket(any), Listen::Grpc(any)],
        Chat::in_memory(),
        tuning,
    )
    .await
    .unwrap();
    let (socket, grpc) = (addrs[0].to_string(), addrs[1].to_string());
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let mut bob = ChatProcess::spawn_with(("socket", &socket), &["--ca", ca]);
    let mut alice = ChatProcess::spawn_with(("grpc", &grpc), &["--ca", ca]);
    assert_eq!(bob.run("create bob password1").await, "ok logged in as bob");
    assert_eq!(
        alice.run("create alice password1").await,
        "ok logged in as alice"
    );
    assert_eq!(alice.run("send bob over tls").await, "ok sent bob 1");
    assert_eq!(bob.line().await, "message 1 alice over tls");

    // The "system" roots: another CA, whatever this machine has.
    let stranger = chat_conformance::pki::TestPki::new();
    for (transport, addr) in [("socket", &socket), ("grpc", &grpc)] {
        let output = Command::new(env!("CARGO_BIN_EXE_chat"))
            .args(["--server", addr, "--transport", transport, "--tls"])
            .env("SSL_CERT_FILE", stranger.ca_path())
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{transport}: {stderr}");
        assert!(
            stderr.contains("cannot connect") && stderr.contains("UnknownIssuer"),
            "{transport}: {stderr}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_server_is_reported() {
    // Bind then drop, so the port is (almost certainly) closed.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    for transport in ["socket", "grpc"] {
        unreachable_server_is_reported(transport, &addr.to_string()).await;
    }
}

async fn unreachable_server_is_reported(transport: &str, addr: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_chat"))
        .args(["--server", addr, "--transport", transport])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot connect"),
        "{transport}"
    );
}
