//! The server binary as users run it: a real child process on port 0.

use std::process::Stdio;
use std::time::Duration;

use chat_core::ErrorCode;
use chat_core::client::{ChatClient, Push};
use chat_socket::SocketClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn prints_its_address_serves_and_stops_on_sigterm() {
    let mut server = Command::new(env!("CARGO_BIN_EXE_chat-socket-server"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(server.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(PATIENCE, stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = first
        .strip_prefix("listening on ")
        .expect("the one stdout line")
        .to_string();
    assert!(!addr.ends_with(":0"), "the actual port is printed: {addr}");

    let mut alice = SocketClient::connect(&addr).await.unwrap();
    alice.create("alice").await.unwrap();
    assert_eq!(alice.list("", 0).await.unwrap().len(), 1);

    let pid = server.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    match tokio::time::timeout(PATIENCE, alice.next_push())
        .await
        .unwrap()
    {
        Some(Push::Goodbye {
            code: ErrorCode::ShuttingDown,
            ..
        }) => {}
        other => panic!("expected a shutdown goodbye, got {other:?}"),
    }
    let status = tokio::time::timeout(PATIENCE, server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert_eq!(
        stdout.next_line().await.unwrap(),
        None,
        "exactly one line on stdout"
    );
}
