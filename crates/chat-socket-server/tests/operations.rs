//! Running the server for real: configuration from flags, environment and
//! a file; the metrics endpoint; JSON logs with the connection's span;
//! backups taken while the server runs, and restored. Real child processes
//! throughout.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use chat_conformance::process::ServerProcess;
use chat_core::client::{ChatClient, Push};
use chat_socket::SocketClient;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const SERVER: &str = env!("CARGO_BIN_EXE_chat-socket-server");
const PATIENCE: Duration = Duration::from_secs(30);

/// Runs the server binary to completion with `args` and `env`; returns its
/// exit code, stdout and stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = std::process::Command::new(SERVER);
    command.args(args);
    // A variable set where the tests run must not decide what they see.
    for (key, _) in std::env::vars() {
        if key.starts_with("CHAT_") || key == "RUST_LOG" || key == "DATABASE_URL" {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let out = command.output().expect("run the server binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--print-config`'s lines as key → (value, source).
fn effective(printed: &str) -> BTreeMap<String, (String, String)> {
    printed
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (key, rest) = line.split_once(" = ")?;
            let (value, source) = rest.split_once("  # ")?;
            Some((key.to_string(), (value.to_string(), source.to_string())))
        })
        .collect()
}

#[test]
fn flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.toml");
    std::fs::write(
        &file,
        "idle-timeout-secs = 100\nmax_connections = 50\nsend-rate = 7\ninsecure-plaintext = true\n\
         data = \"/srv/chat\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let (code, out, err) = run(
        &["--config", file, "--send-rate", "9", "--print-config"],
        &[("CHAT_MAX_CONNECTIONS", "60"), ("CHAT_SEND_RATE", "8")],
    );
    assert_eq!(code, 0, "{err}");
    let config = effective(&out);
    let at = |key: &str| {
        config
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} missing in {out}"))
    };
    // Set by all four: the flag wins.
    assert_eq!(at("send-rate"), ("9".into(), "flag".into()));
    // Environment and file: the environment.
    assert_eq!(
        at("max-connections"),
        ("60".into(), "environment CHAT_MAX_CONNECTIONS".into())
    );
    // File only (underscores or dashes in its keys alike).
    assert_eq!(
        at("idle-timeout-secs"),
        ("100".into(), "config file".into())
    );
    assert_eq!(
        at("insecure-plaintext"),
        ("true".into(), "config file".into())
    );
    assert_eq!(at("data"), ("\"/srv/chat\"".into(), "config file".into()));
    // Nothing: the default.
    assert_eq!(at("send-burst"), ("512".into(), "default".into()));
    assert_eq!(at("store"), ("\"log\"".into(), "default".into()));
    // A value that reads as a number but is not written as one stays text.
    let odd = dir.path().join("odd.toml");
    std::fs::write(&odd, "data = \"007\"\ninsecure-plaintext = false\n").unwrap();
    let (code, out_odd, err) = run(&["--config", odd.to_str().unwrap(), "--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    let odd = effective(&out_odd);
    assert_eq!(odd["data"], ("\"007\"".into(), "config file".into()));
    assert_eq!(
        odd["insecure-plaintext"],
        ("false".into(), "config file".into())
    );
    // The printed configuration is itself a valid config file that gives
    // the same configuration.
    let again = dir.path().join("again.toml");
    let body: String = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_once("  # ").map_or(l, |(kv, _)| kv).to_string() + "\n")
        .collect();
    std::fs::write(&again, body).unwrap();
    let (code, out_again, err) = run(
        &["--config", again.to_str().unwrap(), "--print-config"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let values = |c: &BTreeMap<String, (String, String)>| -> BTreeMap<String, String> {
        c.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect()
    };
    assert_eq!(values(&effective(&out_again)), values(&config));
}

#[test]
fn a_bad_option_fails_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        path.to_str().unwrap().to_string()
    };
    let cases = [
        (
            write("unknown.toml", "max-conections = 5\n"),
            "max-conections",
        ),
        (
            write("value.toml", "max-connections = \"lots\"\n"),
            "--max-connections",
        ),
        (write("array.toml", "send-rate = [1, 2]\n"), "send-rate"),
        (
            write("switch.toml", "insecure-plaintext = \"yes\"\n"),
            "insecure-plaintext",
        ),
        (write("syntax.toml", "send-rate = \n"), "not valid TOML"),
    ];
    for (file, named) in &cases {
        let (code, _, err) = run(&["--config", file, "--data", ":memory:"], &[]);
        assert_eq!(code, 2, "{file}: {err}");
        assert!(
            err.contains(named),
            "{file}: the error names {named}: {err}"
        );
        assert!(
            err.contains(file.as_str()),
            "{file}: the error names the file: {err}"
        );
    }
    let (code, _, err) = run(&["--print-config"], &[("CHAT_QUEUE_LIMIT", "many")]);
    assert_eq!(code, 2);
    assert!(err.contains("--queue-limit"), "{err}");
    let (code, _, err) = run(&["--log-filter", "info,=x=y", "--data", ":memory:"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("--log-filter"), "{err}");
    // --help lists every option, with its default and variable.
    let (code, help, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for option in [
        "--max-connections",
        "--metrics-listen",
        "--shutdown-timeout-secs",
        "--config",
    ] {
        assert!(help.contains(option), "--help lists {option}");
    }
    assert!(help.contains("[env: CHAT_SEND_BURST=]") && help.contains("[default: 512]"));
}

#[tokio::test]
async fn the_file_configures_the_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\nstore = \"memory\"\nmax-accounts = 1\n",
    )
    .unwrap();
    let server = ServerProcess::start(SERVER, &["--config", file.to_str().unwrap()], 1).await;
    let mut alice = SocketClient::connect(&server.addrs[0]).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    let mut bob = SocketClient::connect(&server.addrs[0]).await.unwrap();
    let refused = bob.create("bob", "password1").await.unwrap_err();
    assert_eq!(refused.code(), Some(chat_core::ErrorCode::AccountLimit));
    drop((alice, bob));
    server.terminate().await;
}

/// One scrape of `/metrics`: sample name with labels → value.
async fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: chat\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
        .await
        .expect("scraped in time")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4")
    );
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sample(metrics: &BTreeMap<String, f64>, name: &str) -> f64 {
    metrics.get(name).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_with_the_traffic() {
    let data = tempfile::tempdir().unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--data",
        data.path().to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
    ];
    let mut server = ServerProcess::start(SERVER, &args, 2).await;
    let line = server.next_line().await;
    let metrics_addr = line.strip_prefix("metrics on ").expect(&line).to_string();
    let before = scrape(&metrics_addr).await;
    assert_eq!(sample(&before, "chat_messages_sent_total"), 0.0);
    assert!(
        sample(&before, "process_resident_memory_bytes") > 0.0,
        "process figures are served"
    );

    let addr = server.addrs[0].clone();
    let mut alice = SocketClient::connect(&addr).await.unwrap();
    let mut bob = SocketClient::connect(&addr).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    for n in 0..5 {
        alice.send("bob", &format!("live {n}")).await.unwrap();
    }
    let mut last = None;
    for _ in 0..5 {
        match tokio::time::timeout(PATIENCE, bob.next_push())
            .await
            .unwrap()
        {
            Some(Push::Message(m)) => last = Some(m.id),
            other => panic!("expected a message, got {other:?}"),
        }
    }
    bob.ack(last.unwrap()).await.unwrap();
    bob.logout().await.unwrap();
    for n in 0..3 {
        alice.send("bob", &format!("queued {n}")).await.unwrap();
    }
    let mut mallory = SocketClient::connect(&addr).await.unwrap();
    assert!(mallory.login("alice", "wrong-password").await.is_err());
    // gRPC's are counted under its own label.
    let mut carol = chat_grpc::GrpcClient::connect(&server.addrs[1])
        .await
        .unwrap();
    assert!(carol.login("alice", "wrong-password").await.is_err());
    carol.create("carol", "password1").await.unwrap();
    carol.send("bob", "over grpc").await.unwrap();

    let after = scrape(&metrics_addr).await;
    let moved = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(moved("chat_messages_sent_total"), 9.0);
    assert_eq!(moved("chat_messages_delivered_live_total"), 5.0);
    assert_eq!(moved("chat_messages_queued_total"), 4.0);
    assert_eq!(moved("chat_messages_acknowledged_total"), 5.0);
    assert_eq!(moved("chat_accounts_created_total"), 3.0);
    assert_eq!(moved("chat_logins_total{outcome=\"ok\"}"), 3.0);
    assert_eq!(moved("chat_logins_total{outcome=\"failed\"}"), 2.0);
    assert_eq!(
        moved("chat_errors_total{transport=\"grpc\",code=\"wrong_password\"}"),
        1.0
    );
    assert_eq!(sample(&after, "chat_connections{transport=\"grpc\"}"), 1.0);
    assert_eq!(sample(&after, "chat_sessions{transport=\"grpc\"}"), 1.0);
    assert_eq!(
        moved("chat_errors_total{transport=\"socket\",code=\"wrong_password\"}"),
        1.0,
        "{after:?}"
    );
    assert_eq!(
        sample(&after, "chat_connections{transport=\"socket\"}"),
        3.0
    );
    assert_eq!(
        sample(&after, "chat_users_online"),
        2.0,
        "alice and carol; bob logged out"
    );
    assert_eq!(
        moved("chat_connections_accepted_total{transport=\"socket\"}"),
        3.0
    );
    assert_eq!(moved("chat_delivery_latency_seconds_count"), 5.0);
    assert!(moved("chat_store_commit_seconds_count{store=\"log\"}") >= 1.0);
    assert!(moved("chat_store_commit_batch_size_sum{store=\"log\"}") >= 9.0);
    assert!(
        sample(&after, "process_open_fds") >= 3.0,
        "the connections' descriptors at least"
    );
    // Every metric docs/OPERATIONS.md lists is served.
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/OPERATIONS.md"
    ))
    .unwrap();
    let listed: Vec<&str> = doc
        .split('`')
        .filter(|word| {
            word.starts_with("chat_") && word.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .collect();
    assert!(listed.len() >= 18, "the metrics table: {listed:?}");
    for name in listed {
        assert!(
            after.keys().any(|sample| {
                sample.strip_prefix(name).is_some_and(|rest| {
                    rest.is_empty()
                        || rest.starts_with('{')
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| rest.starts_with(s))
                })
            }),
            "OPERATIONS.md lists {name}, which the server does not serve"
        );
    }

    drop((alice, bob, mallory, carol));
    // The connections are gone from the gauge once closed.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = scrape(&metrics_addr).await;
        if sample(&now, "chat_connections{transport=\"socket\"}") == 0.0
            && sample(&now, "chat_connections{transport=\"grpc\"}") == 0.0
        {
            assert_eq!(sample(&now, "chat_users_online"), 0.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never closed"
        );
        // Polled: the server closes them on its own time.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.terminate().await;
}

#[tokio::test]
async fn json_logs_name_the_connection_and_never_the_secrets() {
    let mut child = tokio::process::Command::new(SERVER)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data",
            ":memory:",
            "--log-format",
            "json",
            "--log-filter",
            "debug",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = line.strip_prefix("listening on ").unwrap().to_string();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut alice = SocketClient::connect(&addr).await.unwrap();
    alice.create("alice", "secret-password-1").await.unwrap();
    alice.send("alice", "a private body").await.unwrap();
    alice.logout().await.unwrap();
    drop(alice);
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let mut lines = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout(PATIENCE, stderr.next_line())
        .await
        .unwrap()
    {
        lines.push(line);
    }
    assert!(child.wait().await.unwrap().success());
    let all = lines.join("\n");
    assert!(
        !all.contains("secret-password-1"),
        "a password was logged:\n{all}"
    );
    assert!(
        !all.contains("a private body"),
        "a message body was logged:\n{all}"
    );
    let mut found = false;
    for line in &lines {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "every line is one JSON object: {line}"
        );
        if line.contains("\"message\":\"logged out\"") {
            // The connection's span: transport, peer and the user.
            for field in [
                "\"name\":\"conn\"",
                "\"transport\":\"socket\"",
                "\"peer\":\"127.0.0.1:",
                "\"user\":\"alice\"",
            ] {
                assert!(line.contains(field), "{field} in {line}");
            }
            found = true;
        }
    }
    assert!(found, "a `logged out` line:\n{all}");
}

/// Logs `name` in on a fresh connection and takes every message waiting
/// (replayed and queued), acknowledging them.
async fn messages_of(addr: &str, name: &str) -> Vec<String> {
    let mut client = SocketClient::connect(addr).await.unwrap();
    client.login(name, "password1").await.unwrap();
    let mut got: Vec<String> = client
        .fetch(0)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.body.to_string())
        .collect();
    got.sort();
    got
}

#[tokio::test]
async fn a_backup_taken_while_serving_restores() {
    for store in ["log", "sqlite"] {
        let data = tempfile::tempdir().unwrap();
        let backups = tempfile::tempdir().unwrap();
        let data_dir = data.path().to_str().unwrap();
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--data",
            data_dir,
            "--store",
            store,
        ];
        let server = ServerProcess::start(SERVER, &args, 1).await;
        let addr = server.addrs[0].clone();
        let mut alice = SocketClient::connect(&addr).await.unwrap();
        alice.create("alice", "password1").await.unwrap();
        let mut bob = SocketClient::connect(&addr).await.unwrap();
        bob.create("bob", "password1").await.unwrap();
        bob.logout().await.unwrap();
        for n in 0..3 {
            alice.send("bob", &format!("before {n}")).await.unwrap();
        }

        let backup = |to: &std::path::Path| {
            let to = to.to_str().unwrap();
            run(&["--data", data_dir, "--store", store, "backup", to], &[])
        };
        // While the server runs: through its control socket.
        let dest = backups.path().join("online");
        let (code, out, err) = backup(&dest);
        assert_eq!(code, 0, "{store}: {err}");
        assert!(out.starts_with("backup written to "), "{out}");
        // Into the same place again: refused, naming why.
        let (code, _, err) = backup(&dest);
        assert_ne!(code, 0);
        assert!(err.contains("backup_occupied"), "{store}: {err}");

        alice.send("bob", "after").await.unwrap();
        drop(alice);
        server.terminate().await;

        // With the server stopped: the command opens the store itself.
        let offline = backups.path().join("offline");
        let (code, _, err) = backup(&offline);
        assert_eq!(code, 0, "{store}: {err}");

        // Restore: serve the copy.
        for (copy, expected) in [
            (&dest, vec!["before 0", "before 1", "before 2"]),
            (&offline, vec!["after", "before 0", "before 1", "before 2"]),
        ] {
            let args = [
                "--listen",
                "127.0.0.1:0",
                "--data",
                copy.to_str().unwrap(),
                "--store",
                store,
            ];
            let restored = ServerProcess::start(SERVER, &args, 1).await;
            let got = messages_of(&restored.addrs[0], "bob").await;
            assert_eq!(got, expected, "{store}: restored from {}", copy.display());
            restored.terminate().await;
        }
    }
}

#[test]
fn a_memory_server_has_nothing_to_back_up() {
    let dest = tempfile::tempdir().unwrap();
    let (code, _, err) = run(
        &[
            "--data",
            ":memory:",
            "backup",
            dest.path().join("x").to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("in memory"), "{err}");
}

/// The `--print-config` example in docs/OPERATIONS.md is what the binary
/// prints for that file, those variables and those flags.
#[test]
fn the_operations_guide_shows_the_real_print_config() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/OPERATIONS.md"
    ))
    .unwrap();
    let (_, rest) = doc
        .split_once("With this `chat.toml`:")
        .expect("the example");
    let (_, rest) = rest.split_once("```toml\n").unwrap();
    let (file, rest) = rest.split_once("```").unwrap();
    let (_, rest) = rest.split_once("```text\n").unwrap();
    let (shown, _) = rest.split_once("```").unwrap();
    let mut shown = shown.lines();
    let command = shown.next().unwrap().strip_prefix("$ ").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.toml");
    std::fs::write(&path, file).unwrap();
    let mut env = Vec::new();
    let mut args = Vec::new();
    for word in command.split_whitespace().skip_while(|w| w.contains('=')) {
        args.push(if word == "chat.toml" {
            path.to_str().unwrap()
        } else {
            word
        });
    }
    for word in command.split_whitespace().take_while(|w| w.contains('=')) {
        env.push(word.split_once('=').unwrap());
    }
    assert_eq!(args.first(), Some(&"chat-socket-server"));
    let (code, out, err) = run(&args[1..], &env);
    assert_eq!(code, 0, "{err}");
    let mut printed = out.lines();
    for line in shown.filter(|line| *line != "...") {
        assert!(
            printed.any(|p| p == line),
            "OPERATIONS.md shows `{line}`, which --print-config does not print (in that order):\n{out}"
        );
    }
}

/// The example configuration shipped in deploy/ is valid.
#[test]
fn the_shipped_example_configuration_is_valid() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/chat.toml");
    let (code, out, err) = run(&["--config", file, "--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    let config = effective(&out);
    assert_eq!(
        config["data"],
        ("\"/var/lib/chat\"".into(), "config file".into())
    );
    assert_eq!(
        config["log-format"],
        ("\"json\"".into(), "config file".into())
    );
}

/// Rules between options hold across sources: a certificate from a flag
/// (or the environment) and its key from the file is a pair. The file can
/// be named by `CHAT_CONFIG`, and use an option's alias.
#[test]
fn one_of_a_pair_may_come_from_the_file_and_the_other_from_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.toml");
    std::fs::write(
        &file,
        "tls-cert = \"/etc/chat/old.pem\"\ntls-key = \"/etc/chat/key.pem\"\nshutdown-timeout = 3\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let (code, out, err) = run(
        &[
            "--config",
            file,
            "--tls-cert",
            "/etc/chat/new.pem",
            "--print-config",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let config = effective(&out);
    assert_eq!(
        config["tls-cert"],
        ("\"/etc/chat/new.pem\"".into(), "flag".into())
    );
    assert_eq!(
        config["tls-key"],
        ("\"/etc/chat/key.pem\"".into(), "config file".into())
    );
    assert_eq!(
        config["shutdown-timeout-secs"],
        ("3".into(), "config file".into())
    );
    let (code, out, err) = run(
        &["--print-config"],
        &[
            ("CHAT_CONFIG", file),
            ("CHAT_TLS_CERT", "/etc/chat/env.pem"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let config = effective(&out);
    assert_eq!(
        config["tls-cert"],
        (
            "\"/etc/chat/env.pem\"".into(),
            "environment CHAT_TLS_CERT".into()
        )
    );
    assert_eq!(config["tls-key"].1, "config file");
    // Without the file, half a pair is still refused.
    let (code, _, err) = run(&["--tls-cert", "/etc/chat/new.pem", "--print-config"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--tls-key"), "{err}");
}

#[test]
fn an_offline_backup_needs_a_store_where_it_looks() {
    let empty = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let (code, _, err) = run(
        &[
            "--data",
            empty.path().join("missing").to_str().unwrap(),
            "backup",
            dest.path().join("x").to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("holds no store"), "{err}");
    assert!(
        !empty.path().join("missing").exists(),
        "nothing was created where there was no store"
    );
}

/// `--store postgres`: data kept across restarts, and the password hidden
/// by `--print-config`.
#[tokio::test]
async fn a_server_on_postgres_keeps_its_data() {
    let Some(db) =
        chat_conformance::postgres::TestDatabase::create("a_server_on_postgres_keeps_its_data")
            .await
    else {
        return;
    };
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--store",
        "postgres",
        "--database-url",
        db.url.as_str(),
    ];
    let server = ServerProcess::start(SERVER, &args, 1).await;
    let addr = server.addrs[0].clone();
    let mut alice = SocketClient::connect(&addr).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    let mut bob = SocketClient::connect(&addr).await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    bob.logout().await.unwrap();
    alice.send("bob", "kept in postgres").await.unwrap();
    let (code, out, err) = run(&[&args[..], &["--print-config"]].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(":***@"), "{out}");
    assert!(
        !out.contains("chat:chat@"),
        "the password is not printed: {out}"
    );
    let (code, _, err) = run(&[&args[..], &["backup", "/tmp/nowhere"]].concat(), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("pg_dump"), "{err}");
    drop((alice, bob));
    server.terminate().await;
    // The URL may be the store itself; its password is not printed either.
    let by_url = ["--listen", "127.0.0.1:0", "--store", db.url.as_str()];
    let (code, out, err) = run(&[&by_url[..], &["--print-config"]].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("store = \"postgres://chat:***@"), "{out}");
    assert!(!out.contains("chat:chat@"), "{out}");
    let server = ServerProcess::start(SERVER, &by_url, 1).await;
    let got = messages_of(&server.addrs[0], "bob").await;
    assert_eq!(got, ["kept in postgres"]);
    server.terminate().await;
    // Without a database, or with two, it says so.
    let (code, _, err) = run(&["--listen", "127.0.0.1:0", "--store", "postgres"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("needs the database"), "{err}");
    let two = [
        &by_url[..],
        &["--database-url", "postgres://other@127.0.0.1/x"],
    ]
    .concat();
    let (code, _, err) = run(&two, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("two databases"), "{err}");
}

/// Waits for the next message push on `client`.
async fn pushed<C: ChatClient>(client: &mut C) -> String {
    match tokio::time::timeout(PATIENCE, client.next_push()).await {
        Ok(Some(Push::Message(m))) => m.body.to_string(),
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Three server processes (socket and gRPC) on one database: users on
/// different processes chat live, a login is exclusive across them, one
/// of three simultaneous creates of a name wins, and when a process is
/// SIGKILLed its users log in on another once its lease runs out, their
/// messages waiting for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_database_are_one_server() {
    let Some(db) = chat_conformance::postgres::TestDatabase::create(
        "three_processes_on_one_database_are_one_server",
    )
    .await
    else {
        return;
    };
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--store",
        "postgres",
        "--database-url",
        db.url.as_str(),
        "--lease-time-secs",
        "2",
    ];
    let (a, b, c) = tokio::join!(
        ServerProcess::start(SERVER, &args, 2),
        ServerProcess::start(SERVER, &args, 2),
        ServerProcess::start(SERVER, &args, 2),
    );
    let mut alice = SocketClient::connect(&a.addrs[0]).await.unwrap();
    alice.create("alice", "password1").await.unwrap();
    let mut bob = chat_grpc::GrpcClient::connect(&b.addrs[1]).await.unwrap();
    bob.create("bob", "password1").await.unwrap();
    let mut carol = SocketClient::connect(&c.addrs[0]).await.unwrap();
    carol.create("carol", "password1").await.unwrap();

    // One login per account, whichever process is asked.
    let mut again = chat_grpc::GrpcClient::connect(&c.addrs[1]).await.unwrap();
    let refused = again.login("alice", "password1").await.unwrap_err();
    assert_eq!(refused.code(), Some(chat_core::ErrorCode::AlreadyLoggedIn));

    // One of three simultaneous creates wins.
    let (mut x, mut y, mut z) = (
        SocketClient::connect(&a.addrs[0]).await.unwrap(),
        chat_grpc::GrpcClient::connect(&b.addrs[1]).await.unwrap(),
        SocketClient::connect(&c.addrs[0]).await.unwrap(),
    );
    let (rx, ry, rz) = tokio::join!(
        x.create("dave", "password1"),
        y.create("dave", "password1"),
        z.create("dave", "password1"),
    );
    assert_eq!(
        [rx.is_ok(), ry.is_ok(), rz.is_ok()]
            .iter()
            .filter(|ok| **ok)
            .count(),
        1
    );

    // Password attempts on any process draw on one budget per account
    // (five failures at once by default): spread over three processes,
    // the sixth attempt is refused everywhere, even with the right password.
    let mut erin = SocketClient::connect(&a.addrs[0]).await.unwrap();
    erin.create("erin", "password1").await.unwrap();
    erin.logout().await.unwrap();
    for n in 0..5 {
        let process = [&a, &b, &c][n % 3];
        let mut guess = SocketClient::connect(&process.addrs[0]).await.unwrap();
        let err = guess.login("erin", "wrong-password").await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(chat_core::ErrorCode::WrongPassword),
            "attempt {n}"
        );
    }
    for process in [&a, &b, &c] {
        let mut owner = chat_grpc::GrpcClient::connect(&process.addrs[1])
            .await
            .unwrap();
        let err = owner.login("erin", "password1").await.unwrap_err();
        assert_eq!(err.code(), Some(chat_core::ErrorCode::TooManyAttempts));
    }
    drop(erin);

    // Live across processes and transports, in order.
    for n in 0..5 {
        alice.send("bob", &format!("a→b {n}")).await.unwrap();
    }
    for n in 0..5 {
        assert_eq!(pushed(&mut bob).await, format!("a→b {n}"));
    }
    bob.send("carol", "b→c").await.unwrap();
    assert_eq!(pushed(&mut carol).await, "b→c");

    // Queued for a user logged in nowhere, fetched on another process.
    carol.logout().await.unwrap();
    alice.send("carol", "while you were out").await.unwrap();
    assert_eq!(
        messages_of(&a.addrs[0], "carol").await,
        ["while you were out"]
    );

    // A process dies: its users are free elsewhere after the lease.
    b.kill().await;
    alice.send("bob", "after the crash").await.unwrap();
    let mut bob_again = SocketClient::connect(&c.addrs[0]).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match bob_again.login("bob", "password1").await {
            Ok(_) => break,
            Err(err) if err.code() == Some(chat_core::ErrorCode::AlreadyLoggedIn) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "bob's lease never ran out"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(err) => panic!("{err}"),
        }
    }
    let fetched: Vec<String> = bob_again
        .fetch(0)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.body.to_string())
        .collect();
    assert_eq!(fetched, ["after the crash"]);
    drop((alice, carol, again, x, y, z, bob_again, bob));
    a.terminate().await;
    c.terminate().await;
}

/// A free port on loopback (bound and released; HAProxy takes no port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// deploy/haproxy.cfg as shipped, with this test's addresses: its
/// frontends on `ports` (socket, gRPC) and its servers the given processes.
fn haproxy_config(ports: (u16, u16), servers: &[&ServerProcess]) -> String {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/haproxy.cfg"
    ))
    .unwrap();
    let mut out = String::new();
    let mut backend = "";
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        if let Some(name) = line.strip_prefix("backend ") {
            backend = if name.trim() == "chat_socket" {
                "socket"
            } else {
                "grpc"
            };
        }
        if trimmed == "bind :7878" {
            out.push_str(&format!("    bind 127.0.0.1:{}\n", ports.0));
        } else if trimmed == "bind :50051" {
            out.push_str(&format!("    bind 127.0.0.1:{}\n", ports.1));
        } else if let Some(rest) = trimmed.strip_prefix("server ") {
            // Every server line keeps its options; the first stands for all.
            if rest.starts_with("chat1 ") {
                let options: Vec<&str> = rest.split_whitespace().skip(2).collect();
                for (n, server) in servers.iter().enumerate() {
                    let addr = if backend == "socket" {
                        &server.addrs[0]
                    } else {
                        &server.addrs[1]
                    };
                    out.push_str(&format!(
                        "    server chat{} {addr} {}\n",
                        n + 1,
                        options.join(" ")
                    ));
                }
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The shipped HAProxy configuration in front of two server processes on
/// one PostgreSQL database: clients of either transport connect to the
/// balancer, land on either process, and chat as with one server; when a
/// process dies, its clients reconnect through the balancer to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_haproxy_configuration_balances_a_cluster() {
    let test = "the_shipped_haproxy_configuration_balances_a_cluster";
    if std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: haproxy is not installed, and CI must run this test"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: install haproxy to run it"
        );
        return;
    }
    let Some(db) = chat_conformance::postgres::TestDatabase::create(test).await else {
        return;
    };
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--store",
        "postgres",
        "--database-url",
        db.url.as_str(),
        "--lease-time-secs",
        "2",
    ];
    let (one, two) = tokio::join!(
        ServerProcess::start(SERVER, &args, 2),
        ServerProcess::start(SERVER, &args, 2),
    );
    let ports = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(&config, haproxy_config(ports, &[&one, &two])).unwrap();
    let checked = std::process::Command::new("haproxy")
        .args(["-c", "-q", "-f"])
        .arg(&config)
        .status()
        .unwrap();
    assert!(checked.success(), "the configuration is valid");
    let mut haproxy = tokio::process::Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let socket = format!("127.0.0.1:{}", ports.0);
    let grpc = format!("127.0.0.1:{}", ports.1);
    // Until HAProxy listens.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(&socket).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "haproxy never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Least-connections spreads these over both processes.
    let mut clients = Vec::new();
    for n in 0..4 {
        let mut client = SocketClient::connect(&socket).await.unwrap();
        client.create(&format!("s{n}"), "password1").await.unwrap();
        clients.push(client);
    }
    let mut carol = chat_grpc::GrpcClient::connect(&grpc).await.unwrap();
    carol.create("carol", "password1").await.unwrap();
    for (n, client) in clients.iter_mut().enumerate() {
        client.send("carol", &format!("from s{n}")).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(PATIENCE, carol.next_push()).await {
            Ok(Some(Push::Message(m))) => got.push(m.body.to_string()),
            other => panic!("expected a message, got {other:?}"),
        }
    }
    got.sort();
    assert_eq!(got, ["from s0", "from s1", "from s2", "from s3"]);
    // One process dies: its clients reconnect through the balancer, log in
    // on the other once the lease runs out, and their sends go on.
    one.kill().await;
    for (n, client) in clients.iter_mut().enumerate() {
        client.send("carol", &format!("after s{n}")).await.unwrap();
    }
    let mut carol_after = SocketClient::connect(&socket).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // carol may have been on the dead process: her login moves over too.
    loop {
        match carol_after.login("carol", "password1").await {
            Ok(_) => break,
            Err(err) if err.code() == Some(chat_core::ErrorCode::AlreadyLoggedIn) => {
                drop(carol);
                carol = chat_grpc::GrpcClient::connect(&grpc).await.unwrap();
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "carol never got her login back"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("{err}"),
        }
    }
    let mut after: Vec<String> = carol_after
        .fetch(0)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.body.to_string())
        .filter(|body| body.starts_with("after"))
        .collect();
    after.sort();
    assert_eq!(after, ["after s0", "after s1", "after s2", "after s3"]);
    drop((clients, carol, carol_after));
    two.terminate().await;
    let _ = haproxy.kill().await;
}
