//! Runs one chat engine behind one or both transports in one process.
//!
//! Both server binaries are thin: they parse their flags and call [`run`].
//! Serving both transports from one process means a user connected over the
//! socket protocol chats with a user connected over gRPC: they share one
//! [`Chat`].

pub mod admin;
pub mod config;
pub mod telemetry;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chat_core::{Chat, ConnectionLimit, MemoryStore, Store};
use chat_grpc::GrpcConfig;
use chat_socket::ServerConfig;
use chat_store_sql::{SqliteOptions, SqliteStore};
use chat_tls::ServerTls;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use admin::{Admin, StoreHandle};
pub use config::ConfigFile;
pub use telemetry::LogFormat;

/// Tuning flags shared by both server binaries; `Tuning::default()` is
/// what the flags default to.
#[derive(Debug, Clone, clap::Args)]
pub struct Tuning {
    /// Socket transport: seconds of silence after which a client is dropped
    /// and logged out.
    #[arg(long, default_value_t = Tuning::default().idle_timeout_secs)]
    pub idle_timeout_secs: u64,
    /// Most connections served at once, both transports together; one more
    /// is told `server_full` (socket) or closed (gRPC). Lowered at start to
    /// what the process may open, with room for the store.
    #[arg(long, default_value_t = Tuning::default().max_connections)]
    pub max_connections: usize,
    /// Most connections from one peer address (an IPv6 /64), both
    /// transports together [default: 1,000, or an eighth of the
    /// connection limit if that is smaller].
    #[arg(long)]
    pub max_connections_per_address: Option<usize>,
    /// Seconds a new connection may take to complete its handshake (socket:
    /// its hello, then told `handshake_timeout`; gRPC: its HTTP/2 preface
    /// and first call) before it is closed.
    #[arg(long, default_value_t = Tuning::default().handshake_timeout_secs)]
    pub handshake_timeout_secs: u64,
    /// gRPC transport: seconds a new session may go without opening its
    /// push stream before it is logged out.
    #[arg(long, default_value_t = Tuning::default().stream_grace_secs)]
    pub stream_grace_secs: u64,
    /// gRPC transport: seconds a push may wait for a client that stopped
    /// reading its stream before its session ends (`slow_consumer`).
    #[arg(long, default_value_t = Tuning::default().push_timeout_secs)]
    pub push_timeout_secs: u64,
    /// gRPC transport: most concurrent calls (HTTP/2 streams) per
    /// connection.
    #[arg(long, default_value_t = Tuning::default().grpc_max_streams)]
    pub grpc_max_streams: u32,
    /// gRPC transport: seconds a call may take before it fails.
    #[arg(long, default_value_t = Tuning::default().grpc_request_timeout_secs)]
    pub grpc_request_timeout_secs: u64,
    /// gRPC transport: age in seconds at which a connection is told to go
    /// away (open calls and streams finish; an idle connection closes).
    #[arg(long, default_value_t = Tuning::default().grpc_max_connection_age_secs)]
    pub grpc_max_connection_age_secs: u64,
    /// Messages one user may send per second, sustained (0: no limit);
    /// past it sends fail with `rate_limited`.
    #[arg(long, default_value_t = Tuning::default().send_rate)]
    pub send_rate: u32,
    /// Messages one user may send at once after a quiet spell.
    #[arg(long, default_value_t = Tuning::default().send_burst)]
    pub send_burst: u32,
    /// Accounts that may be created from one peer address per minute,
    /// sustained (0: no limit); past it creates fail with `rate_limited`.
    #[arg(long, default_value_t = Tuning::default().creates_per_minute)]
    pub creates_per_minute: u32,
    /// Accounts that may be created from one address at once.
    #[arg(long, default_value_t = Tuning::default().create_burst)]
    pub create_burst: u32,
    /// Serve plaintext on an address other than loopback: passwords and
    /// messages then cross the network unencrypted. Without it, such an
    /// address needs --tls-cert and --tls-key.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Serve TLS on every transport with this PEM certificate chain (leaf
    /// first); needs --tls-key. Both files are read again on SIGHUP.
    #[arg(long, env = "CHAT_TLS_CERT", requires = "tls_key", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "CHAT_TLS_KEY", requires = "tls_cert", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Most accounts the server may hold (0: no cap); past it creates fail
    /// with `account_limit`.
    #[arg(long, default_value_t = Tuning::default().max_accounts)]
    pub max_accounts: usize,
    /// Lists one connection may make per second, sustained (0: no limit);
    /// every list scans every account name.
    #[arg(long, default_value_t = Tuning::default().list_rate)]
    pub list_rate: u32,
    /// Lists one connection may make at once.
    #[arg(long, default_value_t = Tuning::default().list_burst)]
    pub list_burst: u32,
    /// Password hashes (argon2id, 19 MiB each) computed at once; a login
    /// storm waits for these [default: one less than the cores, at least
    /// one, so that delivery keeps a core].
    #[arg(long)]
    pub hash_concurrency: Option<usize>,
}

impl Default for Tuning {
    fn default() -> Self {
        let socket = ServerConfig::default();
        let grpc = GrpcConfig::default();
        Self {
            idle_timeout_secs: socket.idle_timeout.as_secs(),
            max_connections: chat_core::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: None,
            handshake_timeout_secs: socket.handshake_timeout.as_secs(),
            stream_grace_secs: grpc.stream_grace.as_secs(),
            push_timeout_secs: grpc.push_timeout.as_secs(),
            grpc_max_streams: grpc.max_streams_per_connection,
            grpc_request_timeout_secs: grpc.request_timeout.as_secs(),
            grpc_max_connection_age_secs: grpc.max_connection_age.as_secs(),
            send_rate: 256,
            send_burst: 512,
            creates_per_minute: 10,
            create_burst: 10,
            max_accounts: 0,
            list_rate: 2,
            list_burst: 10,
            insecure_plaintext: false,
            tls_cert: None,
            tls_key: None,
            hash_concurrency: None,
        }
    }
}

impl Tuning {
    /// The engine's settings these flags choose (the rest are the
    /// defaults).
    pub fn engine(&self) -> chat_core::Config {
        let send_rate = (self.send_rate > 0).then(|| chat_core::Rate {
            burst: self.send_burst.max(1),
            per_second: f64::from(self.send_rate),
        });
        let create_rate = (self.creates_per_minute > 0).then(|| {
            chat_core::Rate::per_minute(
                self.create_burst.max(1),
                f64::from(self.creates_per_minute),
            )
        });
        let list_rate = (self.list_rate > 0).then(|| chat_core::Rate {
            burst: self.list_burst.max(1),
            per_second: f64::from(self.list_rate),
        });
        let defaults = chat_core::Config::default();
        let hashing = chat_core::HashingConfig {
            max_concurrent: self
                .hash_concurrency
                .unwrap_or(defaults.hashing.max_concurrent)
                .max(1),
            ..defaults.hashing
        };
        chat_core::Config {
            send_rate,
            create_rate,
            max_accounts: (self.max_accounts > 0).then_some(self.max_accounts),
            list_rate,
            hashing,
            ..defaults
        }
    }

    /// The certificate and key of `--tls-cert` and `--tls-key`, loaded, if
    /// given.
    pub fn server_tls(&self) -> anyhow::Result<Option<ServerTls>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(ServerTls::load(cert, key)?)),
            (None, None) => Ok(None),
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }
    }

    fn socket(&self, connections: ConnectionLimit, drain: Duration) -> ServerConfig {
        ServerConfig {
            drain_timeout: drain,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            connections,
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs.max(1)),
            ..ServerConfig::default()
        }
    }

    fn grpc(&self, connections: ConnectionLimit) -> GrpcConfig {
        GrpcConfig {
            stream_grace: Duration::from_secs(self.stream_grace_secs.max(1)),
            push_timeout: Duration::from_secs(self.push_timeout_secs.max(1)),
            connections,
            max_streams_per_connection: self.grpc_max_streams.max(1),
            request_timeout: Duration::from_secs(self.grpc_request_timeout_secs.max(1)),
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs.max(1)),
            max_connection_age: Duration::from_secs(self.grpc_max_connection_age_secs.max(1)),
            ..GrpcConfig::default()
        }
    }
}

/// Where accounts and messages are kept: flags shared by both server
/// binaries.
#[derive(Debug, Clone, clap::Args)]
pub struct Storage {
    /// Data directory for the durable store (created if missing), or
    /// `:memory:` to keep nothing across restarts.
    #[arg(long, env = "CHAT_DATA", default_value = "chat-data")]
    pub data: String,
    /// Storage engine: `log`, `sqlite`, `memory` or `postgres`, or a
    /// PostgreSQL URL (`postgres://user:password@host:port/database`,
    /// meaning `postgres` on that database). `--data :memory:` implies
    /// `memory`. With `log` (the default), a data directory that holds only
    /// a SQLite database from an earlier version keeps being served by
    /// SQLite.
    #[arg(long, default_value = "log", value_parser = StoreChoice::parse, value_name = "ENGINE|URL")]
    pub store: StoreChoice,
    /// The PostgreSQL database of `--store postgres`
    /// (`postgres://user:password@host:port/database`), unless `--store`
    /// is the URL itself.
    #[arg(long, env = "DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// With `--store postgres`: seconds a server process's logins outlive
    /// its last heartbeat in the database. If the process dies, its users
    /// can log in on another after this; a process that cannot beat within
    /// it stops.
    #[arg(long, default_value_t = chat_store_pg::cluster::DEFAULT_LEASE_TIME.as_secs())]
    pub lease_time_secs: u64,
    /// Messages stored per recipient (queued or awaiting acknowledgement)
    /// past which sends get `queue_full`.
    #[arg(long, default_value_t = chat_core::DEFAULT_QUEUE_LIMIT)]
    pub queue_limit: usize,
}

/// What `--store` says: an engine, and for PostgreSQL perhaps its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreChoice {
    /// The engine.
    pub kind: StoreKind,
    /// The database, when `--store` was a `postgres://` URL.
    pub url: Option<String>,
}

impl StoreChoice {
    /// Parses `--store`: an engine's name, or a `postgres://` (or
    /// `postgresql://`) URL.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let scheme = raw
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => {
                return Ok(Self {
                    kind: StoreKind::Postgres,
                    url: Some(raw.to_string()),
                });
            }
            // Not echoed: it may hold a password.
            Some(_) => return Err("only postgres:// and postgresql:// URLs are stores".into()),
            None => {}
        }
        let kind = <StoreKind as clap::ValueEnum>::from_str(raw, false).map_err(|_| {
            format!("`{raw}` is not log, sqlite, memory, postgres or a postgres:// URL")
        })?;
        Ok(kind.into())
    }
}

impl From<StoreKind> for StoreChoice {
    fn from(kind: StoreKind) -> Self {
        Self { kind, url: None }
    }
}

impl PartialEq<StoreKind> for StoreChoice {
    fn eq(&self, kind: &StoreKind) -> bool {
        self.kind == *kind
    }
}

/// A storage engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// State in memory, every change in an append-only log in the data
    /// directory with group commit (chat-store-log): every acknowledged
    /// message survives a crash.
    Log,
    /// Embedded SQLite in the data directory (chat-store-sql): every
    /// acknowledged message survives a crash; slower, and holds no message
    /// in memory.
    Sqlite,
    /// In memory: fast, and gone when the process stops.
    Memory,
    /// A PostgreSQL database (`--database-url`, or `DATABASE_URL`;
    /// chat-store-pg): every acknowledged message is committed there, and
    /// several server processes may share it (logins leased there).
    Postgres,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            data: "chat-data".into(),
            store: StoreKind::Log.into(),
            database_url: None,
            lease_time_secs: chat_store_pg::cluster::DEFAULT_LEASE_TIME.as_secs(),
            queue_limit: chat_core::DEFAULT_QUEUE_LIMIT,
        }
    }
}

impl Storage {
    /// Keeps everything in memory.
    pub fn memory() -> Self {
        Self {
            store: StoreKind::Memory.into(),
            ..Self::default()
        }
    }

    /// The default durable store (the log) in `dir`.
    pub fn durable(dir: impl Into<String>) -> Self {
        Self {
            data: dir.into(),
            ..Self::default()
        }
    }

    /// The SQLite store in `dir`.
    pub fn sqlite(dir: impl Into<String>) -> Self {
        Self {
            data: dir.into(),
            store: StoreKind::Sqlite.into(),
            ..Self::default()
        }
    }

    /// The engine that serves the data directory: `--store`, except that
    /// `log` on a directory holding only an earlier version's SQLite
    /// database keeps SQLite.
    pub fn engine(&self) -> StoreKind {
        if self.store == StoreKind::Postgres {
            return StoreKind::Postgres;
        }
        if self.store == StoreKind::Memory || self.data == ":memory:" {
            return StoreKind::Memory;
        }
        let found = StoreFiles::in_dir(Path::new(&self.data));
        if self.store == StoreKind::Log && found.sqlite && !found.log {
            StoreKind::Sqlite
        } else {
            self.store.kind
        }
    }

    /// Opens the store and builds the engine on it.
    pub async fn open(&self) -> anyhow::Result<Chat> {
        self.open_with(chat_core::Config::default()).await
    }

    /// [`Storage::open`] with the engine's settings.
    pub async fn open_with(&self, config: chat_core::Config) -> anyhow::Result<Chat> {
        let opened = self.open_store().await?;
        let (chat, heartbeat) = opened.engine(config, self.lease_time()).await?;
        if let Some(heartbeat) = heartbeat {
            let engine = chat.downgrade();
            tokio::spawn(async move {
                if let Err(why) = heartbeat.run(CancellationToken::new()).await {
                    // Its logins may be held elsewhere now: it stops.
                    tracing::error!(%why, "this node lost its place in the cluster; shutting it down");
                    if let Some(chat) = engine.upgrade() {
                        chat.shutdown();
                    }
                }
            });
        }
        Ok(chat)
    }

    /// The PostgreSQL database: `--store URL`, else `--database-url` (or
    /// `DATABASE_URL`).
    pub fn database(&self) -> anyhow::Result<&str> {
        match (self.store.url.as_deref(), self.database_url.as_deref()) {
            (Some(store), Some(other)) if store != other => anyhow::bail!(
                "two databases given: one in --store, another in --database-url (or DATABASE_URL)"
            ),
            (Some(url), _) | (None, Some(url)) => Ok(url),
            (None, None) => anyhow::bail!(
                "--store postgres needs the database: --store postgres://…, --database-url URL or DATABASE_URL"
            ),
        }
    }

    /// How long a PostgreSQL node's logins outlive its last heartbeat.
    pub fn lease_time(&self) -> Duration {
        Duration::from_secs(self.lease_time_secs.max(1))
    }

    /// Opens the store: for the engine, and for what only the server does
    /// with it (backups).
    pub async fn open_store(&self) -> anyhow::Result<OpenStore> {
        let queue_limit = self.queue_limit.max(1);
        let dir = Path::new(&self.data);
        let (store, handle): (Arc<dyn Store>, StoreHandle) = match self.engine() {
            StoreKind::Memory => {
                tracing::info!("keeping data in memory only");
                (Arc::new(MemoryStore::new(queue_limit)), StoreHandle::Memory)
            }
            StoreKind::Log => {
                let options = chat_store_log::LogOptions {
                    queue_limit,
                    ..chat_store_log::LogOptions::default()
                };
                let store = Arc::new(chat_store_log::LogStore::open(dir, options).await?);
                (store.clone(), StoreHandle::Log(store))
            }
            StoreKind::Postgres => {
                let url = self.database()?;
                let options = chat_store_pg::PgOptions {
                    queue_limit,
                    ..chat_store_pg::PgOptions::default()
                };
                let store = chat_store_pg::PgStore::connect(url, options)
                    .await
                    .map_err(|err| anyhow::anyhow!("{}: {err}", err.code()))?;
                tracing::info!("PostgreSQL store open");
                let store = Arc::new(store);
                (store.clone(), StoreHandle::Postgres(store))
            }
            StoreKind::Sqlite => {
                if self.store == StoreKind::Log {
                    tracing::info!(
                        data = %dir.display(),
                        "the data directory holds an earlier version's SQLite database: serving it with SQLite"
                    );
                }
                let options = SqliteOptions {
                    queue_limit,
                    ..SqliteOptions::default()
                };
                let store = Arc::new(SqliteStore::open(dir, options).await?);
                tracing::info!(data = %dir.display(), "SQLite store open");
                (store.clone(), StoreHandle::Sqlite(store))
            }
        };
        Ok(OpenStore { store, handle })
    }
}

/// Which stores' files a data directory holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreFiles {
    /// The log store's (`log-N`, `snapshot-N`).
    pub log: bool,
    /// The SQLite store's database.
    pub sqlite: bool,
}

impl StoreFiles {
    /// What `dir` holds (nothing, if it cannot be read).
    pub fn in_dir(dir: &Path) -> Self {
        let mut found = Self::default();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            found.log |= name.starts_with("log-") || name.starts_with("snapshot-");
            found.sqlite |= name == chat_store_sql::DATABASE_FILE;
        }
        found
    }

    /// Whether there is any store.
    pub fn any(self) -> bool {
        self.log || self.sqlite
    }
}

/// An open store (see [`Storage::open_store`]).
pub struct OpenStore {
    /// For the engine.
    pub store: Arc<dyn Store>,
    /// For backups.
    pub handle: StoreHandle,
}

impl std::fmt::Debug for OpenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenStore")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl OpenStore {
    /// The engine on this store: one node of a cluster on PostgreSQL (with
    /// the heartbeat to run while it serves; its notification listener is
    /// started here), a lone engine otherwise.
    pub async fn engine(
        &self,
        config: chat_core::Config,
        lease_time: Duration,
    ) -> anyhow::Result<(Chat, Option<chat_store_pg::cluster::Heartbeat>)> {
        let StoreHandle::Postgres(pg) = &self.handle else {
            return Ok((Chat::new(Arc::clone(&self.store), config), None));
        };
        let node = chat_store_pg::cluster::Node::join(pg, lease_time)
            .await
            .context("cannot join the PostgreSQL cluster")?;
        let chat = Chat::on_node(Arc::clone(&self.store), node.cluster(), config);
        let listener = node
            .delivery
            .listen(
                node.heartbeat.node(),
                chat.downgrade(),
                CancellationToken::new(),
            )
            .await
            .context("cannot listen for deliveries")?;
        tokio::spawn(listener);
        tracing::info!(node = %node.heartbeat.node(), "joined the PostgreSQL cluster");
        Ok((chat, Some(node.heartbeat)))
    }

    /// Closes the store once nothing else holds it: every write recorded
    /// is on disk and the data directory is free when this returns.
    pub async fn close(self) {
        drop(self.store);
        if let StoreHandle::Log(store) = self.handle {
            match Arc::try_unwrap(store) {
                Ok(store) => store.close().await,
                // Every acknowledged write is on disk already; the rest is
                // written when the last holder lets go.
                Err(_) => tracing::warn!(
                    "the store is still in use at exit; every acknowledged write is on disk, the rest is not waited for"
                ),
            }
        }
    }
}

/// Longest a shutdown waits for the transports to close their connections,
/// by default (`--shutdown-timeout-secs`).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How the process runs: logs, metrics, stopping. Flags shared by both
/// server binaries.
#[derive(Debug, Clone, clap::Args)]
pub struct Operations {
    /// Log format on stderr: readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Which logs to write, as a tracing filter: `info`, `debug`,
    /// `warn,chat_core=debug`, ... (messages and passwords are never
    /// logged).
    #[arg(long, env = "RUST_LOG", default_value = "info", value_name = "FILTER")]
    pub log_filter: String,
    /// Serve Prometheus metrics at http://ADDR/metrics; port 0 picks a
    /// free port (printed as `metrics on ADDR`).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGINT or SIGTERM: seconds to let connections finish what they
    /// are doing (every answered send is stored; clients are told
    /// goodbye) before the rest are closed.
    #[arg(long, visible_alias = "shutdown-timeout", default_value_t = DRAIN_TIMEOUT.as_secs())]
    pub shutdown_timeout_secs: u64,
}

impl Default for Operations {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            metrics_listen: None,
            shutdown_timeout_secs: DRAIN_TIMEOUT.as_secs(),
        }
    }
}

impl Operations {
    /// How long a shutdown drains.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

/// What a server binary was asked to do: serve on `listen`, or run
/// `admin`. Builds the runtime, sets up logging, and returns the exit
/// status (printing any error).
pub fn main(
    listen: &[Listen],
    tuning: &Tuning,
    storage: &Storage,
    operations: &Operations,
    admin: Option<&Admin>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        telemetry::init_logging(operations.log_format, &operations.log_filter)?;
        match admin {
            Some(command) => admin::run(command, storage).await,
            None => run_with(listen, tuning, storage, operations).await,
        }
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A transport to serve on an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// The binary socket protocol.
    Socket(SocketAddr),
    /// gRPC.
    Grpc(SocketAddr),
}

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (default
/// `info`), as readable text colored only on a terminal.
pub fn init_logging() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    if telemetry::init_logging(LogFormat::Text, &filter).is_err() {
        let _ = telemetry::init_logging(LogFormat::Text, "info");
    }
}

/// [`run_with`] with the default [`Operations`].
pub async fn run(listen: &[Listen], tuning: &Tuning, storage: &Storage) -> anyhow::Result<()> {
    run_with(listen, tuning, storage, &Operations::default()).await
}

/// Opens the store, binds every listener (in order), prints one
/// `listening on ADDRESS` line per listener to stdout in that order (then
/// `metrics on ADDRESS` if metrics are served), serves one shared engine
/// on all of them until Ctrl-C or SIGTERM, then shuts down cleanly within
/// the shutdown timeout.
pub async fn run_with(
    listen: &[Listen],
    tuning: &Tuning,
    storage: &Storage,
    operations: &Operations,
) -> anyhow::Result<()> {
    let tls = tuning.server_tls()?;
    check_plaintext(listen, tuning.insecure_plaintext, tls.is_some())?;
    let shutdown = shutdown_signal().context("cannot install the signal handlers")?;
    if let Some(tls) = &tls {
        tracing::info!(cert = %tls.cert_path().display(), "serving TLS; SIGHUP reloads the certificate and key");
        reload_on_hangup(tls.clone()).context("cannot install the SIGHUP handler")?;
    }
    // Before the engine and the store: they take their metric handles
    // when made.
    let metrics = match operations.metrics_listen {
        Some(addr) => {
            let handle = telemetry::install_metrics()?;
            Some(telemetry::MetricsEndpoint::bind(addr, handle).await?)
        }
        None => None,
    };
    let opened = storage.open_store().await?;
    let (chat, heartbeat) = opened.engine(tuning.engine(), storage.lease_time()).await?;
    let bound = Bound::bind(listen).await?;
    {
        let mut stdout = std::io::stdout().lock();
        for addr in bound.local_addrs()? {
            writeln!(stdout, "listening on {addr}")?;
        }
        if let Some(metrics) = &metrics {
            writeln!(stdout, "metrics on {}", metrics.local_addr()?)?;
        }
        stdout.flush()?;
    }
    let background = CancellationToken::new();
    let mut helpers = tokio::task::JoinSet::new();
    if let Some(heartbeat) = heartbeat {
        let stop = background.clone();
        helpers.spawn(async move {
            if let Err(why) = heartbeat.run(stop).await {
                // Other processes may hold this one's logins by now: it
                // must not act for those users a moment longer (fail-stop).
                tracing::error!(%why, "stopping at once");
                std::process::exit(75);
            }
        });
    }
    if let Some(metrics) = metrics {
        helpers.spawn(metrics.serve(background.clone()));
    }
    if matches!(opened.handle, StoreHandle::Log(_) | StoreHandle::Sqlite(_)) {
        helpers.spawn(admin::serve_control(
            Path::new(&storage.data).join(admin::CONTROL_SOCKET),
            opened.handle.clone(),
            background.clone(),
        ));
    }
    let served = bound
        .serve_draining(chat, tuning, tls, shutdown, operations.shutdown_timeout())
        .await;
    background.cancel();
    // A backup under way finishes first: the store closes after it.
    while helpers.join_next().await.is_some() {}
    // Every write the drain answered is on disk before the process exits,
    // and the data directory is free for the next one.
    opened.close().await;
    served
}

/// Binds `listen` and serves `chat` on them in the background until the
/// process ends; returns the actual addresses, in order. For tests,
/// examples and embedding, where nothing needs to stop the server.
pub async fn spawn(listen: &[Listen], chat: Chat) -> anyhow::Result<Vec<SocketAddr>> {
    spawn_with(listen, chat, Tuning::default()).await
}

/// [`spawn`] with `tuning` instead of the default flags. Only the
/// transports' half of `tuning` applies here: the engine's (send, create
/// and list rates, `--max-accounts`) is `chat`'s, so build it with
/// [`Storage::open_with`]`(tuning.engine())` for those to hold.
pub async fn spawn_with(
    listen: &[Listen],
    chat: Chat,
    tuning: Tuning,
) -> anyhow::Result<Vec<SocketAddr>> {
    let bound = Bound::bind(listen).await?;
    let addrs = bound.local_addrs()?;
    tokio::spawn(async move {
        if let Err(err) = bound.serve(chat, &tuning, std::future::pending()).await {
            tracing::error!(%err, "background server failed");
        }
    });
    Ok(addrs)
}

/// Listeners bound and ready to serve.
#[derive(Debug)]
pub struct Bound {
    listeners: Vec<(Listen, TcpListener)>,
}

impl Bound {
    /// Binds every address in `listen`, in order.
    pub async fn bind(listen: &[Listen]) -> anyhow::Result<Self> {
        let mut listeners = Vec::new();
        for &spec in listen {
            let addr = match spec {
                Listen::Socket(addr) | Listen::Grpc(addr) => addr,
            };
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            listeners.push((spec, listener));
        }
        Ok(Self { listeners })
    }

    /// The actual addresses (port 0 resolved), in the order given.
    pub fn local_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.listeners
            .iter()
            .map(|(_, listener)| listener.local_addr())
            .collect()
    }

    /// Serves `chat` on every listener until `shutdown` completes (or a
    /// transport fails), then stops them all and the engine. TLS is on
    /// when `tuning` names a certificate and key.
    pub async fn serve(
        self,
        chat: Chat,
        tuning: &Tuning,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let tls = tuning.server_tls()?;
        self.serve_with_tls(chat, tuning, tls, shutdown).await
    }

    /// [`Bound::serve`] with TLS from `tls` (whoever holds a clone of it
    /// can reload it) instead of from `tuning`.
    pub async fn serve_with_tls(
        self,
        chat: Chat,
        tuning: &Tuning,
        tls: Option<ServerTls>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.serve_draining(chat, tuning, tls, shutdown, DRAIN_TIMEOUT)
            .await
    }

    /// [`Bound::serve_with_tls`], giving connections `drain` to finish
    /// once `shutdown` completes.
    pub async fn serve_draining(
        self,
        chat: Chat,
        tuning: &Tuning,
        tls: Option<ServerTls>,
        shutdown: impl std::future::Future<Output = ()>,
        drain: Duration,
    ) -> anyhow::Result<()> {
        let acceptor = |alpn| -> anyhow::Result<_> {
            tls.as_ref()
                .map(|tls| tls.acceptor(alpn))
                .transpose()
                .context("cannot set up TLS")
        };
        let stop = CancellationToken::new();
        let mut servers = tokio::task::JoinSet::new();
        // One count for every transport: each connection is a file
        // descriptor, whichever protocol it speaks.
        let budget = connection_budget(tuning.max_connections);
        let connections = ConnectionLimit::new(budget).with_per_address(per_address_share(
            budget,
            tuning.max_connections_per_address,
        ));
        for (spec, listener) in self.listeners {
            let chat = chat.clone();
            let stop = stop.clone().cancelled_owned();
            match spec {
                Listen::Socket(_) => {
                    let config = ServerConfig {
                        tls: acceptor(chat_tls::ALPN_SOCKET)?,
                        ..tuning.socket(connections.clone(), drain)
                    };
                    tracing::info!(addr = %listener.local_addr()?, "socket transport ready");
                    servers.spawn(async move {
                        chat_socket::serve(listener, chat, config, stop)
                            .await
                            .context("socket transport failed")
                    });
                }
                Listen::Grpc(_) => {
                    let config = GrpcConfig {
                        tls: acceptor(chat_tls::ALPN_GRPC)?,
                        ..tuning.grpc(connections.clone())
                    };
                    tracing::info!(addr = %listener.local_addr()?, "grpc transport ready");
                    servers.spawn(async move {
                        chat_grpc::serve(listener, chat, config, stop)
                            .await
                            .context("grpc transport failed")
                    });
                }
            }
        }
        tokio::select! {
            _ = shutdown => {}
            // A transport that stops by itself is worth stopping for.
            Some(result) = servers.join_next() => {
                stop.cancel();
                chat.shutdown();
                result??;
                anyhow::bail!("a transport stopped unexpectedly");
            }
        }
        stop.cancel();
        chat.shutdown();
        // Each transport drains its own connections within `drain`; a
        // client that neither reads nor closes must not keep the process
        // alive much past it.
        let drained = tokio::time::timeout(drain + Duration::from_secs(1), async {
            while let Some(result) = servers.join_next().await {
                result??;
            }
            anyhow::Ok(())
        })
        .await;
        match drained {
            Ok(result) => result?,
            Err(_) => {
                tracing::warn!("connections still open after {drain:?}; closing them");
                servers.shutdown().await;
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Refuses to serve plaintext (`tls` false) on an address other than
/// loopback unless `insecure` (`--insecure-plaintext`) says to: passwords
/// would cross the network unencrypted.
pub fn check_plaintext(listen: &[Listen], insecure: bool, tls: bool) -> anyhow::Result<()> {
    if tls {
        return Ok(());
    }
    for spec in listen {
        let addr = match spec {
            Listen::Socket(addr) | Listen::Grpc(addr) => addr,
        };
        if addr.ip().to_canonical().is_loopback() {
            continue;
        }
        if !insecure {
            anyhow::bail!(
                "refusing to serve plaintext on {addr}: passwords and messages would cross the \
                 network unencrypted; serve TLS with --tls-cert and --tls-key, listen on a \
                 loopback address, or pass --insecure-plaintext to accept the risk"
            );
        }
        tracing::warn!(%addr, "serving plaintext on a non-loopback address (--insecure-plaintext)");
    }
    Ok(())
}

/// File descriptors kept for everything but client connections: the
/// listeners, the store's files and connections, log output, the socket
/// connections being refused at any moment (up to 256), and slack.
pub const RESERVED_FDS: u64 = 384;

/// What one address may hold of a connection budget: what was asked (up
/// to the budget), or by default [`chat_core::DEFAULT_MAX_PER_ADDRESS`] but
/// no more than an eighth of the budget, so that one address cannot take
/// every connection even when the file-descriptor limit makes the budget
/// small.
pub fn per_address_share(budget: usize, asked: Option<usize>) -> usize {
    let share = match asked {
        Some(asked) => asked.min(budget),
        None => chat_core::DEFAULT_MAX_PER_ADDRESS.min(budget / 8),
    }
    .max(1);
    tracing::info!(
        max_connections_per_address = share,
        "connections per address"
    );
    share
}

/// Raises the process's file-descriptor limit to its hard limit and
/// returns how many connections it can serve: `wanted`, or fewer if the
/// limit leaves room for fewer besides [`RESERVED_FDS`]. Says what it chose.
pub fn connection_budget(wanted: usize) -> usize {
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(err) => {
            tracing::warn!(%err, "could not read or raise the file-descriptor limit");
            return wanted.max(1);
        }
    };
    let room = usize::try_from(soft.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    let chosen = wanted.min(room).max(1);
    if chosen < wanted {
        tracing::warn!(
            file_descriptors = soft,
            max_connections = chosen,
            asked = wanted,
            "the file-descriptor limit leaves room for fewer connections than asked"
        );
    } else {
        tracing::info!(
            file_descriptors = soft,
            max_connections = chosen,
            "connection limit (both transports together)"
        );
    }
    chosen
}

/// Reads `tls`'s certificate and key again on every SIGHUP, logging the
/// outcome; a pair that fails to load leaves the old one serving.
#[cfg(unix)]
pub fn reload_on_hangup(tls: ServerTls) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => {
                    tracing::info!(cert = %tls.cert_path().display(), "SIGHUP: TLS certificate reloaded")
                }
                Err(err) => {
                    tracing::error!(%err, code = err.code(), "SIGHUP: TLS certificate not reloaded; the old one stays")
                }
            }
        }
    });
    Ok(())
}

/// Reloading on SIGHUP exists only on Unix.
#[cfg(not(unix))]
pub fn reload_on_hangup(_tls: ServerTls) -> std::io::Result<()> {
    Ok(())
}

/// Installs the Ctrl-C (SIGINT) and SIGTERM handlers now, and returns a
/// future that completes when either arrives. Installing before the server
/// announces its address matters: a signal that arrives before the handler
/// exists kills the process instead of stopping it cleanly.
#[cfg(unix)]
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("Ctrl-C: shutting down"),
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    })
}

/// Installs the Ctrl-C handler and returns a future that completes on it.
#[cfg(not(unix))]
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C: shutting down");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_concurrency_reaches_the_engine_and_defaults_to_its_own() {
        let defaults = chat_core::Config::default().hashing;
        assert_eq!(Tuning::default().engine().hashing, defaults);
        let tuned = Tuning {
            hash_concurrency: Some(3),
            ..Tuning::default()
        };
        let hashing = tuned.engine().hashing;
        assert_eq!(hashing.max_concurrent, 3);
        assert_eq!(
            hashing.memory_kib, defaults.memory_kib,
            "nothing else moves"
        );
        let zero = Tuning {
            hash_concurrency: Some(0),
            ..Tuning::default()
        };
        assert_eq!(zero.engine().hashing.max_concurrent, 1, "never none at all");
    }
}
