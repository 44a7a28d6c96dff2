//! Logs and metrics: what an operator watches.
//!
//! Logs go to stderr through `tracing`, readable text by default or one
//! JSON object per line (`--log-format json`). Each connection runs in a
//! `conn` span carrying its transport, peer address and (once logged in)
//! user, so every line a connection causes says whose it is. Passwords and
//! message bodies are never logged.
//!
//! Metrics are recorded with the `metrics` crate wherever they happen (the
//! engine, the transports, the stores), and served in the Prometheus text
//! format by `metrics-exporter-prometheus` at `http://ADDR/metrics` when
//! `--metrics-listen ADDR` is given. Without it no recorder is installed and
//! every metric is a no-op. The names are listed in docs/OPERATIONS.md.

use std::convert::Infallible;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines, colored on a terminal.
    #[default]
    Text,
    /// One JSON object per line, with the connection's span fields.
    Json,
}

/// Installs the global log subscriber: `filter` is a `tracing` filter
/// (`info`, `warn,chat_core=debug`, ...). Fails naming the option if the
/// filter does not parse.
pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log-filter (RUST_LOG) `{filter}`"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    // A second call (tests that run several servers) keeps the first.
    let _ = installed;
    Ok(())
}

/// Bucket bounds, in seconds, for the latency histograms: 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Bucket bounds for batch sizes (records per store commit).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// How often the exporter folds recorded histogram samples in, when nobody
/// scrapes, so that memory stays bounded.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the process's global one. Call it
/// before the engine and the store are built: they take their metric
/// handles once, when made.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .context("bad latency buckets")?
        .set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS)
        .context("bad batch buckets")?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("a metrics recorder is installed already")?;
    chat_core::metrics::describe();
    metrics_process::Collector::default().describe();
    Ok(handle)
}

/// A bound metrics endpoint.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
    handle: PrometheusHandle,
}

impl MetricsEndpoint {
    /// Binds `addr` for `handle`'s metrics.
    pub async fn bind(addr: SocketAddr, handle: PrometheusHandle) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
        Ok(Self { listener, handle })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `GET /metrics` (anything else is 404) until `stop`.
    pub async fn serve(self, stop: CancellationToken) {
        let upkeep = self.handle.clone();
        let upkeep_stop = stop.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = every.tick() => upkeep.run_upkeep(),
                    _ = upkeep_stop.cancelled() => break,
                }
            }
        });
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = stop.cancelled() => break,
            };
            let (stream, _) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::debug!(%err, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handle = self.handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(respond(&request, &handle)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(io, service);
                if let Err(err) = served.await {
                    tracing::debug!(%err, "metrics endpoint: connection failed");
                }
            });
        }
    }
}

fn respond<B>(request: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let mut response = if request.uri().path() == "/metrics" && request.method() == "GET" {
        // Process figures (CPU, memory, descriptors) are read at scrape
        // time, like the rest.
        metrics_process::Collector::default().collect();
        let mut response = Response::new(Full::new(Bytes::from(handle.render())));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    } else {
        let mut response =
            Response::new(Full::new(Bytes::from_static(b"not found: try /metrics\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        response
    };
    response.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    response
}
