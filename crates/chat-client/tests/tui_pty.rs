//! The `chat` binary's full-screen UI as a person uses it: each client a
//! real child process in a pseudo-terminal, its output parsed into a screen
//! by a terminal emulator (vt100), against a real server in this process.
//!
//! Keys are written as a terminal sends them; every wait reads the
//! terminal's output until the screen shows what is expected, within a
//! deadline. The same runs produce the README's screenshots, which a test
//! compares with what the program draws (`CHAT_UPDATE_SCREENSHOTS=1`
//! rewrites them).

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chat_core::client::{ChatClient, Push};
use chat_grpc::GrpcClient;
use chat_server::{Listen, Storage};
use chat_socket::SocketClient;
use portable_pty::{Child, CommandBuilder, MasterPty, PtySize, native_pty_system};

/// How long one wait for the screen may take.
const PATIENCE: Duration = Duration::from_secs(30);
/// The terminal's size, fixed so that screens are reproducible.
const ROWS: u16 = 30;
const COLS: u16 = 100;
/// The README's screenshots are smaller: fewer empty rows.
const SHOT_ROWS: u16 = 20;

const ENTER: &str = "\r";
const TAB: &str = "\t";
const CTRL_C: &str = "\x03";
const CTRL_N: &str = "\x0e";

/// One `chat` process in a pseudo-terminal.
struct Tui {
    name: &'static str,
    child: Box<dyn Child + Send + Sync>,
    writer: Box<dyn Write + Send>,
    output: mpsc::Receiver<Vec<u8>>,
    /// Everything the process wrote, to check how it left the terminal.
    raw: Vec<u8>,
    parser: vt100::Parser,
    _master: Box<dyn MasterPty + Send>,
}

impl Tui {
    /// Starts `chat --transport TRANSPORT --server ADDR` in a terminal of
    /// [`ROWS`] by [`COLS`].
    fn spawn(name: &'static str, transport: &str, addr: &str) -> Self {
        Self::spawn_with(name, &["--transport", transport, "--server", addr], ROWS)
    }

    /// [`Tui::spawn`] in a terminal of `rows` by [`COLS`].
    fn spawn_sized(name: &'static str, transport: &str, addr: &str, rows: u16) -> Self {
        Self::spawn_with(name, &["--transport", transport, "--server", addr], rows)
    }

    /// `chat ARGS` in a terminal of `rows` by [`COLS`].
    fn spawn_with(name: &'static str, args: &[&str], rows: u16) -> Self {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("open a pseudo-terminal");
        let mut command = CommandBuilder::new(env!("CARGO_BIN_EXE_chat"));
        command.args(args);
        // CI may run without a TERM; the UI is drawn for a common one.
        command.env("TERM", "xterm-256color");
        command.env_remove("CHAT_SERVER");
        command.env_remove("CHAT_TRANSPORT");
        let child = pair.slave.spawn_command(command).expect("start chat");
        // Only the child holds the terminal's other end: its exit ends the
        // reads below.
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().unwrap();
        let writer = pair.master.take_writer().unwrap();
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0; 8192];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Self {
            name,
            child,
            writer,
            output,
            raw: Vec::new(),
            parser: vt100::Parser::new(rows.try_into().unwrap(), COLS.try_into().unwrap(), 0),
            _master: pair.master,
        }
    }

    /// Types `keys` (as a terminal sends them).
    fn keys(&mut self, keys: &str) {
        self.writer.write_all(keys.as_bytes()).unwrap();
        self.writer.flush().unwrap();
    }

    /// The screen as text, one line per row, trailing blanks cut.
    fn text(&self) -> String {
        screen_text(self.parser.screen())
    }

    /// Reads the terminal until `ready` holds for its screen; panics with
    /// the screen if it does not within [`PATIENCE`].
    fn wait_until(&mut self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = self.text();
            if ready(&text) {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(bytes) => self.take(&bytes),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: no {what} within {PATIENCE:?}; screen:\n{text}",
                        self.name
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("{}: exited before {what}; screen:\n{text}", self.name)
                }
            }
        }
    }

    /// Waits until the screen shows every one of `texts` at once (a frame
    /// may arrive in pieces: checking one text, then another, could look
    /// at a half-drawn screen).
    fn wait_for_all(&mut self, texts: &[&str]) -> String {
        self.wait_until(&format!("{texts:?}"), |screen| {
            texts.iter().all(|text| screen.contains(text))
        })
    }

    /// Waits until the screen shows `text`.
    fn wait_for(&mut self, text: &str) -> String {
        self.wait_for_all(&[text])
    }

    fn take(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
        self.parser.process(bytes);
    }

    /// Creates an account through the login screen.
    fn create_account(&mut self, name: &str, password: &str) {
        self.wait_for("chat · sign in");
        // Name, Tab, password, Tab to "Log in", Tab to "Create account".
        self.keys(&format!("{name}{TAB}{password}{TAB}{TAB}{ENTER}"));
        self.wait_for(&format!("account {name} created"));
    }

    /// Reads the terminal until the process exits (and with it the
    /// terminal's last writer); its exit status.
    fn wait_exit(&mut self) -> portable_pty::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(bytes) => self.take(&bytes),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{} did not exit:\n{}", self.name, self.text())
                }
            }
        }
        self.child.wait().unwrap()
    }

    /// Quits with Ctrl-C and checks the terminal was given back.
    fn quit(&mut self) {
        self.keys(CTRL_C);
        self.exits_restored();
    }

    /// Closes the terminal (SIGHUP, as when its window is closed) and
    /// checks the program quit as with Ctrl-C.
    fn hang_up(&mut self) {
        // portable-pty's kill is a SIGHUP.
        self.child.kill().unwrap();
        self.exits_restored();
    }

    /// Waits for a clean exit that left the terminal as it found it: the
    /// alternate screen left, the cursor shown, bracketed paste off.
    fn exits_restored(&mut self) {
        let status = self.wait_exit();
        assert!(
            status.success(),
            "{}: {status:?}\n{}",
            self.name,
            self.text()
        );
        let screen = self.parser.screen();
        assert!(
            !screen.alternate_screen(),
            "{}: still on the alternate screen",
            self.name
        );
        assert!(
            !screen.hide_cursor(),
            "{}: the cursor stays hidden",
            self.name
        );
        assert!(
            !screen.bracketed_paste(),
            "{}: bracketed paste left on",
            self.name
        );
        let raw = String::from_utf8_lossy(&self.raw);
        assert!(
            raw.contains("\x1b[?1049l"),
            "{}: never left the alternate screen",
            self.name
        );
    }
}

impl Drop for Tui {
    fn drop(&mut self) {
        // A failed test must not leave the process behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
    }
}

fn screen_text(screen: &vt100::Screen) -> String {
    screen
        .rows(0, COLS)
        .map(|row| row.trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A runtime for the server and the library clients; the test's own
/// thread does the blocking terminal I/O.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A server with both transports on one in-memory engine; the socket and
/// gRPC addresses.
fn start_server(rt: &tokio::runtime::Runtime) -> (String, String) {
    rt.block_on(async {
        let any = "127.0.0.1:0".parse().unwrap();
        let chat = Storage::memory().open().await.unwrap();
        let addrs = chat_server::spawn(&[Listen::Socket(any), Listen::Grpc(any)], chat)
            .await
            .unwrap();
        (addrs[0].to_string(), addrs[1].to_string())
    })
}

#[test]
fn two_tui_users_chat_over_the_socket_protocol() {
    let rt = runtime();
    let (socket, _) = start_server(&rt);
    two_tui_users_chat(&rt, ("socket", &socket));
}

#[test]
fn two_tui_users_chat_over_grpc() {
    let rt = runtime();
    let (_, grpc) = start_server(&rt);
    two_tui_users_chat(&rt, ("grpc", &grpc));
}

/// Bob and Alice create their accounts on the login screen; Alice finds Bob
/// and writes, Bob reads it and answers. Alice quits with Ctrl-C, Bob's
/// terminal is closed under him: both are logged out and the terminal
/// given back.
fn two_tui_users_chat(rt: &tokio::runtime::Runtime, (transport, addr): (&str, &str)) {
    let mut bob = Tui::spawn("bob", transport, addr);
    let mut alice = Tui::spawn("alice", transport, addr);
    bob.create_account("bob", "password-of-bob");
    alice.create_account("alice", "password-of-alice");
    alice.wait_for(&format!(
        " alice │ {addr} │ {transport} │ no TLS │ connected"
    ));

    alice.keys(CTRL_N);
    alice.wait_for("Find accounts");
    alice.keys(&format!("^bob${ENTER}"));
    alice.wait_for("1 account; Enter opens a conversation");
    alice.keys(ENTER);
    alice.wait_for("Message to bob");
    alice.keys(&format!("hello bob, from a terminal{ENTER}"));
    alice.wait_for("you: hello bob, from a terminal ✓");

    // Bob's first conversation opens by itself.
    bob.wait_for_all(&["alice: hello bob, from a terminal", "Message to alice"]);
    // From the list, Enter goes to the message line.
    bob.keys(&format!("{ENTER}hi alice{ENTER}"));
    bob.wait_for("you: hi alice ✓");
    alice.wait_for("bob: hi alice");

    alice.quit();
    bob.hang_up();
    // Ctrl-C and the hang-up logged them out: the accounts log in elsewhere at once.
    rt.block_on(async {
        for (name, password) in [("alice", "password-of-alice"), ("bob", "password-of-bob")] {
            let result = match transport {
                "socket" => {
                    let mut client = SocketClient::connect(addr).await.unwrap();
                    client.login(name, password).await
                }
                _ => {
                    let mut client = GrpcClient::connect(addr).await.unwrap();
                    client.login(name, password).await
                }
            };
            assert!(result.is_ok(), "{name} is still logged in: {result:?}");
        }
    });
}

/// A TCP relay to the server that a test can cut (every relayed connection
/// closed, new ones closed at once) and restore: a network outage.
struct Proxy {
    addr: String,
    up: Arc<AtomicBool>,
    relays: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    fn start(rt: &tokio::runtime::Runtime, upstream: &str) -> Self {
        let upstream = upstream.to_owned();
        let up = Arc::new(AtomicBool::new(true));
        let relays = Arc::new(Mutex::new(Vec::new()));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (accepting, tracked) = (Arc::clone(&up), Arc::clone(&relays));
        rt.spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue;
                }
                let upstream = upstream.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap().push(relay.abort_handle());
            }
        });
        Self { addr, up, relays }
    }

    /// Closes every relayed connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[test]
fn the_tui_reconnects_after_an_outage_over_the_socket_protocol() {
    let rt = runtime();
    let (socket, _) = start_server(&rt);
    reconnects_after_an_outage(&rt, "socket", &socket);
}

#[test]
fn the_tui_reconnects_after_an_outage_over_grpc() {
    let rt = runtime();
    let (_, grpc) = start_server(&rt);
    reconnects_after_an_outage(&rt, "grpc", &grpc);
}

/// Alice's terminal reaches the server through a proxy that fails twice.
/// The first time the UI shows that it reconnects, logs in again by
/// itself, receives what Bob sent meanwhile and sends what Alice typed
/// meanwhile, each once. The second time her password was changed
/// elsewhere meanwhile: the UI says so on the login screen.
fn reconnects_after_an_outage(rt: &tokio::runtime::Runtime, transport: &str, addr: &str) {
    let proxy = Proxy::start(rt, addr);
    // Bob is a library client, straight to the server.
    let mut bob = rt.block_on(Peer::create(transport, addr, "bob"));
    let mut alice = Tui::spawn("alice", transport, &proxy.addr);
    alice.create_account("alice", "password-of-alice");
    rt.block_on(bob.send("alice", "before the outage"));
    alice.wait_for("bob: before the outage");
    // From the list to the message line.
    alice.keys(ENTER);
    alice.wait_for("Enter send");

    proxy.cut();
    alice.wait_for("reconnecting in");
    rt.block_on(bob.send("alice", "while you were away"));
    alice.keys(&format!("typed while offline{ENTER}"));
    alice.wait_for("you: typed while offline (sending)");
    proxy.restore();
    let screen = alice.wait_until("the state from before and during the outage", |s| {
        s.contains("│ connected")
            && s.contains("bob: while you were away")
            && s.contains("you: typed while offline ✓")
    });
    for text in [
        "before the outage",
        "while you were away",
        "typed while offline",
    ] {
        assert_eq!(screen.matches(text).count(), 1, "{text:?} once:\n{screen}");
    }
    assert_eq!(
        rt.block_on(bob.next_message()),
        "typed while offline",
        "what Alice typed offline reached Bob"
    );

    // Second outage; meanwhile the password changes elsewhere.
    proxy.cut();
    alice.wait_for("reconnecting in");
    rt.block_on(async {
        let mut other = Peer::login_when_free(transport, addr, "alice", "password-of-alice").await;
        other
            .change_password("password-of-alice", "a-new-password")
            .await;
    });
    proxy.restore();
    alice.wait_for_all(&[
        "chat · sign in",
        "logged out, could not log in again: error wrong_password",
        " not logged in │",
    ]);
    alice.quit();
}

/// A user driven through the client library, on either transport.
enum Peer {
    Socket(Box<SocketClient>),
    Grpc(Box<GrpcClient>),
}

macro_rules! on_peer {
    ($peer:expr, $client:ident => $body:expr) => {
        match $peer {
            Peer::Socket($client) => $body,
            Peer::Grpc($client) => $body,
        }
    };
}

impl Peer {
    async fn connect(transport: &str, addr: &str) -> Self {
        match transport {
            "socket" => Peer::Socket(Box::new(SocketClient::connect(addr).await.unwrap())),
            _ => Peer::Grpc(Box::new(GrpcClient::connect(addr).await.unwrap())),
        }
    }

    async fn create(transport: &str, addr: &str, name: &str) -> Self {
        let mut peer = Self::connect(transport, addr).await;
        on_peer!(&mut peer, c => c.create(name, &format!("password-of-{name}")).await.unwrap());
        peer
    }

    /// Logs in as `name` once the server has let go of its earlier login.
    async fn login_when_free(transport: &str, addr: &str, name: &str, password: &str) -> Self {
        let mut peer = Self::connect(transport, addr).await;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let result = on_peer!(&mut peer, c => c.login(name, password).await);
            match result {
                Ok(_) => return peer,
                Err(err) if err.code() == Some(chat_core::ErrorCode::AlreadyLoggedIn) => {
                    assert!(Instant::now() < deadline, "{name} never logged out");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!("{err}"),
            }
        }
    }

    async fn send(&mut self, to: &str, text: &str) {
        on_peer!(self, c => c.send(to, text).await.unwrap());
    }

    async fn change_password(&mut self, old: &str, new: &str) {
        on_peer!(self, c => c.change_password(old, new).await.unwrap());
    }

    /// The next message's text.
    async fn next_message(&mut self) -> String {
        let push =
            tokio::time::timeout(PATIENCE, async { on_peer!(self, c => c.next_push().await) })
                .await
                .expect("a message in time");
        match push {
            Some(Push::Message(m)) => m.body.as_str().to_owned(),
            other => panic!("{other:?}"),
        }
    }
}

/// The README's two screenshots of the UI are what the program draws: this
/// runs the scenario they show and compares, after normalising what changes
/// from run to run (clock times and the server's port). With
/// `CHAT_UPDATE_SCREENSHOTS=1` it writes what it saw into README.md
/// instead.
#[test]
fn the_readme_screenshots_are_what_the_tui_draws() {
    let rt = runtime();
    let (socket, _) = start_server(&rt);
    let mut bob = rt.block_on(Peer::create("socket", &socket, "bob"));
    let mut carol = rt.block_on(Peer::create("socket", &socket, "carol"));
    let mut alice = Tui::spawn_sized("alice", "socket", &socket, SHOT_ROWS);
    alice.create_account("alice", "password-of-alice");
    rt.block_on(bob.send("alice", "hi alice! lunch at noon?"));
    alice.wait_for("bob: hi alice! lunch at noon?");
    alice.keys(&format!("{ENTER}sure, see you there{ENTER}"));
    alice.wait_for("you: sure, see you there ✓");
    rt.block_on(carol.send("alice", "are you coming to the demo at 3?"));
    alice.wait_for("carol");
    rt.block_on(bob.send("alice", "great, I'll book a table for two"));
    alice.keys("on my way");
    let chat = alice.wait_for_all(&[
        "bob: great, I'll book a table for two",
        "(1)",
        "│on my way",
        "│ connected",
    ]);

    alice.keys(CTRL_N);
    alice.wait_for("Find accounts");
    alice.keys(&format!("a{ENTER}"));
    let find = alice.wait_for_all(&["2 accounts; Enter opens a conversation", "alice (you)"]);
    alice.keys(CTRL_C);
    assert!(alice.wait_exit().success());

    let readme_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(readme_path).unwrap();
    let shots = [("chat", chat), ("find", find)];
    if std::env::var_os("CHAT_UPDATE_SCREENSHOTS").is_some() {
        let mut updated = readme;
        for (name, shot) in &shots {
            updated = replace_screenshot(&updated, name, shot);
        }
        std::fs::write(readme_path, updated).unwrap();
        return;
    }
    for (name, shot) in &shots {
        let shown = screenshot(&readme, name);
        assert_eq!(
            normalise(&shown),
            normalise(shot),
            "README.md's {name:?} screenshot is not what the UI draws now; \
             rerun with CHAT_UPDATE_SCREENSHOTS=1 to update it. The UI drew:\n{shot}"
        );
    }
}

/// The marker line before a screenshot's fenced block in README.md.
fn marker(name: &str) -> String {
    format!("<!-- tui-screenshot: {name} -->")
}

/// The lines of the fenced block after `name`'s marker: (first line index,
/// end index) in `readme.lines()`.
fn screenshot_span(readme: &str, name: &str) -> (usize, usize) {
    let lines: Vec<&str> = readme.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == marker(name))
        .unwrap_or_else(|| panic!("README.md has no line {:?}", marker(name)));
    assert!(
        lines.get(at + 1).is_some_and(|l| l.starts_with("```")),
        "a fenced block must follow {:?}",
        marker(name)
    );
    let end = lines[at + 2..]
        .iter()
        .position(|l| l.starts_with("```"))
        .map(|n| at + 2 + n)
        .expect("the fenced block ends");
    (at + 2, end)
}

fn screenshot(readme: &str, name: &str) -> String {
    let (start, end) = screenshot_span(readme, name);
    readme.lines().collect::<Vec<_>>()[start..end].join("\n")
}

fn replace_screenshot(readme: &str, name: &str, shot: &str) -> String {
    let (start, end) = screenshot_span(readme, name);
    let lines: Vec<&str> = readme.lines().collect();
    let mut out: Vec<&str> = lines[..start].to_vec();
    out.extend(shot.lines());
    out.extend(&lines[end..]);
    let mut text = out.join("\n");
    if readme.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// What may differ between two runs of the same scenario: clock times
/// (`HH:MM`) and the server's port; spacing is collapsed, as the port's
/// length may shift the rest of its line.
fn normalise(screen: &str) -> String {
    const LOOPBACK: [char; 10] = ['1', '2', '7', '.', '0', '.', '0', '.', '1', ':'];
    screen
        .lines()
        .map(|line| {
            let chars: Vec<char> = line.chars().collect();
            let mut out = String::new();
            let mut i = 0;
            while i < chars.len() {
                let digit = |k: usize| chars.get(k).is_some_and(char::is_ascii_digit);
                let boundary = i == 0 || !chars[i - 1].is_ascii_digit();
                if boundary
                    && digit(i)
                    && digit(i + 1)
                    && chars.get(i + 2) == Some(&':')
                    && digit(i + 3)
                    && digit(i + 4)
                    && !digit(i + 5)
                {
                    out.push_str("HH:MM");
                    i += 5;
                } else if chars[i..].starts_with(&LOOPBACK) {
                    out.push_str("127.0.0.1:PORT");
                    i += 10;
                    while digit(i) {
                        i += 1;
                    }
                } else {
                    out.push(chars[i]);
                    i += 1;
                }
            }
            out.split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn normalising_keeps_all_but_times_ports_and_spacing() {
    assert_eq!(
        normalise("│ 09:41 bob: at 12:30?   │\n alice │ 127.0.0.1:41234 │ socket"),
        "│ HH:MM bob: at HH:MM? │\nalice │ 127.0.0.1:PORT │ socket"
    );
    assert_eq!(
        normalise("2025-06-01 123:456 1:23"),
        "2025-06-01 123:456 1:23"
    );
    assert_ne!(normalise("hello bob"), normalise("hello rob"));
}

/// `--plain` keeps the line mode on a terminal: the prompt, and the stable
/// result lines.
#[test]
fn plain_keeps_the_line_mode_on_a_terminal() {
    let rt = runtime();
    let (socket, _) = start_server(&rt);
    let mut dave = Tui::spawn_with("dave", &["--server", &socket, "--plain"], ROWS);
    dave.wait_for("(logged out)>");
    dave.keys(&format!("create dave password-of-dave{ENTER}"));
    dave.wait_for_all(&["ok logged in as dave", "dave>"]);
    assert!(!dave.parser.screen().alternate_screen());
    dave.keys(&format!("quit{ENTER}"));
    dave.wait_for("ok bye");
    assert!(dave.wait_exit().success());
}
