//! Nothing acknowledged is lost: the real server binary, on a durable
//! store, serving both transports, is SIGKILLed (or, in the graceful
//! variant, sent SIGTERM and left to drain) in the middle of a load of
//! concurrent senders and recipients (some online, some offline) and
//! restarted on the same data. Afterwards every message whose send was
//! acknowledged is delivered, each exactly once; nothing is delivered that
//! was not sent; and the accounts are all there. Half the senders
//! pipeline their sends (16 in flight), which their clients resend in order
//! after reconnecting: their messages are stored in the order sent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_conformance::process::ServerProcess;
use chat_core::client::{ChatClient, Push};
use chat_core::{ErrorCode, MessageId, Username};
use chat_grpc::GrpcClient;
use chat_socket::SocketClient;

const SERVER: &str = env!("CARGO_BIN_EXE_chat-grpc-server");
/// Pairs per transport: sender i sends to recipient i. Recipients 0 and 1
/// are online during the load, the others offline.
const PAIRS: usize = 4;
const ONLINE: usize = 2;

/// What one recipient saw before the crash: (message id, body), and the
/// highest id whose acknowledgement the server confirmed.
type Seen = Arc<Mutex<(Vec<(MessageId, String)>, MessageId)>>;

/// One transport's way of connecting.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Socket,
    Grpc,
}

impl Transport {
    fn tag(self) -> &'static str {
        match self {
            Transport::Socket => "s",
            Transport::Grpc => "g",
        }
    }
}

/// How the server is stopped mid-load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGKILL: no warning, no flush, no goodbye.
    Kill,
    /// SIGTERM: a graceful stop, draining within the shutdown timeout.
    Terminate,
    /// Three processes on one PostgreSQL database behind a round-robin
    /// balancer; one is SIGKILLed and not restarted: its clients reconnect
    /// through the balancer to the others, and log in there once its
    /// lease runs out.
    KillOneOfThree,
}

/// The servers under test: one process on a data directory, or three on
/// one PostgreSQL database.
enum Servers {
    One(Box<ServerProcess>),
    Three(Vec<ServerProcess>),
}

/// A round-robin TCP balancer on 127.0.0.1:0 in front of `backends`, as
/// a load balancer with TCP health checks would be: a backend that refuses
/// a connection is skipped.
async fn balance(backends: Vec<String>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut next = 0;
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            let mut outbound = None;
            for step in 0..backends.len() {
                let at = (next + step) % backends.len();
                if let Ok(stream) = tokio::net::TcpStream::connect(&backends[at]).await {
                    outbound = Some(stream);
                    next = at + 1;
                    break;
                }
            }
            let Some(mut outbound) = outbound else {
                continue;
            };
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    addr
}

/// One process of the cluster on `url`, both transports on free ports, a
/// short lease so that a dead process's users move on quickly.
async fn start_on(url: &str) -> ServerProcess {
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--socket-listen",
        "127.0.0.1:0",
        "--store",
        "postgres",
        "--database-url",
        url,
        "--lease-time-secs",
        "2",
        "--queue-limit",
        "10000000",
        "--send-rate",
        "0",
        "--creates-per-minute",
        "0",
    ];
    ServerProcess::start(SERVER, &args, 2).await
}

async fn start(data: &str, grpc: &str, socket: &str) -> ServerProcess {
    // A queue bound far above what the load can reach, and no send or
    // create rates: this test is about loss, not limits.
    let args = [
        "--listen",
        grpc,
        "--socket-listen",
        socket,
        "--data",
        data,
        "--queue-limit",
        "10000000",
        "--send-rate",
        "0",
        "--creates-per-minute",
        "0",
        "--shutdown-timeout-secs",
        "5",
    ];
    ServerProcess::start(SERVER, &args, 2).await
}

/// Sends numbered messages until told to stop, one at a time (a `window`
/// of 1) or pipelined with up to `window` in flight; returns every body it
/// tried and, for the acknowledged ones, the id the server gave.
async fn sender<C: ChatClient>(
    mut client: C,
    to: String,
    me: String,
    stop: Arc<AtomicBool>,
    window: usize,
) -> (Vec<String>, Vec<(String, MessageId)>) {
    let (mut tried, mut acked) = (Vec::new(), Vec::new());
    let mut in_flight = std::collections::VecDeque::new();
    let mut n = 0;
    let fail = |err| -> ! { panic!("{me}: a send failed even after reconnecting: {err}") };
    while !stop.load(Ordering::Relaxed) {
        let body = format!("{me}#{n}");
        n += 1;
        tried.push(body.clone());
        if window == 1 {
            match client.send(&to, &body).await {
                Ok(receipt) => acked.push((body, receipt.id)),
                Err(err) => fail(err),
            }
            continue;
        }
        client
            .send_pipelined(&to, &body)
            .await
            .unwrap_or_else(|e| fail(e));
        in_flight.push_back(body);
        while client.in_flight() >= window {
            let receipt = client.next_receipt().await.unwrap_or_else(|e| fail(e));
            acked.push((in_flight.pop_front().expect("in flight"), receipt.id));
        }
    }
    while client.in_flight() > 0 {
        let receipt = client.next_receipt().await.unwrap_or_else(|e| fail(e));
        acked.push((in_flight.pop_front().expect("in flight"), receipt.id));
    }
    (tried, acked)
}

/// Records live messages, acknowledging each once recorded, until the
/// connection dies.
async fn online<C: ChatClient>(mut client: C, seen: Seen) {
    while let Some(push) = client.next_push().await {
        match push {
            Push::Message(m) => {
                seen.lock().unwrap().0.push((m.id, m.body.to_string()));
                if client.ack(m.id).await.is_err() {
                    return;
                }
                seen.lock().unwrap().1 = m.id;
            }
            Push::LoggedOut { .. } | Push::Goodbye { .. } => return,
        }
    }
}

/// After the restart: logs in, takes the replay and the queue, and
/// acknowledges everything; again, until a login finds nothing more (a
/// replayed message still on its way when the acknowledgement goes out is
/// held back by the client, and replayed at the next login).
async fn collect<C: ChatClient>(mut client: C, name: &str) -> Vec<(MessageId, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    loop {
        while let Err(err) = client.login(name, "password1").await {
            assert_eq!(
                err.code(),
                Some(ErrorCode::AlreadyLoggedIn),
                "{name}: {err}"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never logged out"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut round = Vec::new();
        while let Ok(Some(Push::Message(m))) =
            tokio::time::timeout(Duration::from_millis(200), client.next_push()).await
        {
            round.push((m.id, m.body.to_string()));
        }
        loop {
            let fetched = client.fetch(0).await.expect("fetch");
            if fetched.is_empty() {
                break;
            }
            round.extend(fetched.into_iter().map(|m| (m.id, m.body.to_string())));
        }
        if let Some(max) = round.iter().map(|(id, _)| *id).max() {
            client.ack(max).await.expect("ack");
        }
        client.logout().await.expect("logout");
        if round.is_empty() {
            break;
        }
        for entry in round {
            if !got.contains(&entry) {
                got.push(entry);
            }
        }
    }
    got
}

async fn connect_socket(addr: &str) -> SocketClient {
    SocketClient::connect(addr.to_string())
        .await
        .expect("socket connect")
}

async fn connect_grpc(addr: &str) -> GrpcClient {
    GrpcClient::connect(addr).await.expect("grpc connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    restart_under_load(Stop::Kill).await;
}

/// A graceful restart under load (SIGTERM, then a new process on the same
/// data and addresses) loses no acknowledged message, and shows none twice:
/// a send stored during the drain whose answer never reached its client is
/// resent after the restart and recognised (one id per message, checked
/// below), and an acknowledgement the server answered is never undone.
/// The stop itself is clean: exit status 0 within the shutdown timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_under_load_loses_nothing_and_repeats_nothing() {
    restart_under_load(Stop::Terminate).await;
}

/// A cluster under load: three processes (each serving both transports)
/// on one PostgreSQL database, behind a balancer per transport; one is
/// SIGKILLed mid-load and stays dead. Every acknowledged send is delivered,
/// under the id it was given, exactly once, as after a single server's
/// crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_a_process_killed_in_a_cluster() {
    restart_under_load(Stop::KillOneOfThree).await;
}

async fn restart_under_load(how: Stop) {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_string_lossy().to_string();
    let database = match how {
        Stop::KillOneOfThree => {
            match chat_conformance::postgres::TestDatabase::create(
                "acknowledged_messages_survive_a_process_killed_in_a_cluster",
            )
            .await
            {
                Some(db) => Some(db),
                None => return,
            }
        }
        Stop::Kill | Stop::Terminate => None,
    };
    let (server, grpc_addr, socket_addr) = match &database {
        None => {
            let server = start(&data_dir, "127.0.0.1:0", "127.0.0.1:0").await;
            let (grpc, socket) = (server.addrs[0].clone(), server.addrs[1].clone());
            (Servers::One(Box::new(server)), grpc, socket)
        }
        Some(db) => {
            let mut servers = Vec::new();
            for _ in 0..3 {
                servers.push(start_on(&db.url).await);
            }
            let grpc = balance(servers.iter().map(|s| s.addrs[0].clone()).collect()).await;
            let socket = balance(servers.iter().map(|s| s.addrs[1].clone()).collect()).await;
            (Servers::Three(servers), grpc, socket)
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    let mut watchers = Vec::new();
    let mut seen_before: HashMap<String, Seen> = HashMap::new();
    for transport in [Transport::Socket, Transport::Grpc] {
        for i in 0..PAIRS {
            let (me, to) = (
                format!("s{}{i}", transport.tag()),
                format!("r{}{i}", transport.tag()),
            );
            let seen: Seen = Arc::default();
            seen_before.insert(to.clone(), Arc::clone(&seen));
            macro_rules! pair {
                ($connect:expr, $addr:expr) => {{
                    let mut recipient = $connect($addr).await;
                    recipient.create(&to, "password1").await.unwrap();
                    if i < ONLINE {
                        watchers.push(tokio::spawn(online(recipient, seen)));
                    } else {
                        recipient.logout().await.unwrap();
                    }
                    let mut client = $connect($addr).await;
                    client.create(&me, "password1").await.unwrap();
                    // Odd pairs pipeline their sends.
                    let window = if i % 2 == 1 { 16 } else { 1 };
                    senders.push(tokio::spawn(sender(
                        client,
                        to.clone(),
                        me.clone(),
                        Arc::clone(&stop),
                        window,
                    )));
                }};
            }
            match transport {
                Transport::Socket => pair!(connect_socket, &socket_addr),
                Transport::Grpc => pair!(connect_grpc, &grpc_addr),
            }
        }
    }

    // Mid-load.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let server = match (how, server) {
        (Stop::Kill, Servers::One(server)) => {
            server.kill().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            Servers::One(Box::new(start(&data_dir, &grpc_addr, &socket_addr).await))
        }
        (Stop::Terminate, Servers::One(server)) => {
            server.terminate().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            Servers::One(Box::new(start(&data_dir, &grpc_addr, &socket_addr).await))
        }
        (Stop::KillOneOfThree, Servers::Three(mut servers)) => {
            servers.remove(1).kill().await;
            Servers::Three(servers)
        }
        _ => unreachable!("each way of stopping has its own servers"),
    };
    // The senders reconnect and resend by themselves; let them go on a bit.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut tried: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut acked: HashMap<String, Vec<(String, MessageId)>> = HashMap::new();
    for (task, transport, i) in [Transport::Socket, Transport::Grpc]
        .into_iter()
        .flat_map(|t| (0..PAIRS).map(move |i| (t, i)))
        .zip(senders)
        .map(|((t, i), task)| (task, t, i))
    {
        let (all, ok) = task.await.expect("sender");
        let to = format!("r{}{i}", transport.tag());
        assert!(!ok.is_empty(), "{to}'s sender got nothing acknowledged");
        assert!(
            ok.windows(2).all(|w| w[0].1 < w[1].1),
            "{to}: sends stored out of order (pipelined: {})",
            i % 2 == 1
        );
        tried.insert(to.clone(), all.into_iter().collect());
        acked.insert(to, ok);
    }
    for watcher in watchers {
        // A watcher whose server died has ended; one on a process that
        // lives on (the cluster) is stopped here, its client dropped: what
        // it saw and acknowledged is recorded.
        watcher.abort();
        if let Err(err) = watcher.await {
            assert!(err.is_cancelled(), "watcher: {err}");
        }
    }

    let mut total_acked = 0;
    for transport in [Transport::Socket, Transport::Grpc] {
        for i in 0..PAIRS {
            let to = format!("r{}{i}", transport.tag());
            let after = match transport {
                Transport::Socket => collect(connect_socket(&socket_addr).await, &to).await,
                Transport::Grpc => collect(connect_grpc(&grpc_addr).await, &to).await,
            };
            // "Exactly once" is checked as: one id per message (below), and
            // no message whose acknowledgement was confirmed comes back.
            // Repeats of one id on the wire are dropped by the client
            // library itself, so they are not visible (or checked) here.
            // One id per message, ever: nothing was stored twice.
            let (before, acked_through) = seen_before[&to].lock().unwrap().clone();
            // An acknowledgement the server confirmed is durable: those
            // messages never come back.
            if let Some((id, body)) = after.iter().find(|(id, _)| *id <= acked_through) {
                panic!(
                    "{to}: {body:?} (id {id}) came back after its acknowledgement was confirmed"
                );
            }
            let mut id_of: BTreeMap<String, MessageId> = BTreeMap::new();
            for (id, body) in before.iter().chain(&after) {
                let first = *id_of.entry(body.clone()).or_insert(*id);
                assert_eq!(first, *id, "{to}: {body:?} stored under two ids");
                assert!(
                    tried[&to].contains(body),
                    "{to}: got {body:?}, which nobody sent"
                );
            }
            // Every acknowledged send arrived, under the id it was given.
            for (body, id) in &acked[&to] {
                assert_eq!(
                    id_of.get(body),
                    Some(id),
                    "{to}: acknowledged {body:?} (id {id}) was lost"
                );
            }
            total_acked += acked[&to].len();
        }
    }
    eprintln!("restart test ({how:?}): {total_acked} acknowledged sends checked across the stop");

    // The accounts survived too.
    let mut lister = connect_socket(&socket_addr).await;
    let names: BTreeSet<String> = lister
        .list("", 0)
        .await
        .unwrap()
        .iter()
        .map(Username::to_string)
        .collect();
    for transport in [Transport::Socket, Transport::Grpc] {
        for i in 0..PAIRS {
            for who in [
                format!("s{}{i}", transport.tag()),
                format!("r{}{i}", transport.tag()),
            ] {
                assert!(names.contains(&who), "{who} did not survive: {names:?}");
            }
        }
    }
    drop(lister);
    match server {
        Servers::One(server) => server.terminate().await,
        Servers::Three(servers) => {
            for server in servers {
                server.terminate().await;
            }
        }
    }
}
