//! A client in another language, with no .proto file, discovers the
//! service through reflection and calls it: scripts/reflection_client.py on
//! Python's stock grpcio and grpcio-reflection, against the real binary.
//!
//! Needs `python3` with `grpcio` and `grpcio-reflection` (`.ci/run`
//! installs them). Without them the test says loudly that it skipped,
//! unless `CI` is set, where a skip is a failure.

use std::process::Command;

use chat_conformance::process::ServerProcess;

const SERVER: &str = env!("CARGO_BIN_EXE_chat-grpc-server");
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/reflection_client.py"
);

fn python_has_grpc() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection"])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn a_python_client_discovers_and_calls_the_service_by_reflection() {
    if !python_has_grpc() {
        let why = "python3 with grpcio and grpcio-reflection is not installed \
                   (pip install grpcio grpcio-reflection)";
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIPPED a_python_client_discovers_and_calls_the_service_by_reflection: {why}");
        return;
    }
    let server = ServerProcess::start(
        SERVER,
        &["--listen", "127.0.0.1:0", "--data", ":memory:"],
        1,
    )
    .await;
    let output = tokio::process::Command::new("python3")
        .args([SCRIPT, &server.addrs[0]])
        .output()
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("services: chat.v1.Chat"), "{stdout}");
    assert!(
        stdout.contains("duplicate create: ALREADY_EXISTS username_taken"),
        "{stdout}"
    );
    server.terminate().await;
}
