//! Serving: the listener, HTTP/2 settings, health and reflection around the
//! [`ChatService`].
//!
//! The service's parts live in their own modules: `sessions` (the token
//! table and grace timers), [`crate::service`] (the RPC handlers) and
//! `forward` (the Subscribe stream). A gRPC session's lifetime is
//! tied to its Subscribe stream, as a socket session's is to its
//! connection: when the stream ends (the client cancelled it, or its HTTP/2
//! connection died and hyper dropped it) the user is logged out and the
//! token voided; a session whose stream is never opened expires after
//! [`GrpcConfig::stream_grace`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chat_core::{Chat, ConnectionLimit};
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tonic::service::InterceptorLayer;
use tonic_health::ServingStatus;
use tracing::{debug, error, info, warn};

use crate::connection::{Connection, first_request};
use crate::pb;
use crate::pb::chat_server::ChatServer;
use crate::service::ChatService;
use crate::sessions::Sessions;

/// Settings of the gRPC server.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// How long a new session may go without opening its Subscribe stream
    /// before it is logged out (default 10 s).
    pub stream_grace: Duration,
    /// Longest a push may wait for room in a stream whose client stopped
    /// reading; past it the session ends (its messages stay stored and are
    /// delivered again at the next login) and the stream ends with a
    /// `logged_out` push and `UNAUTHENTICATED` (default 30 s).
    pub push_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings to each client (default 20 s).
    pub http2_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is
    /// dropped, ending its streams (default 10 s).
    pub http2_keepalive_timeout: Duration,
    /// Idle time before TCP keepalive probes start (default 30 s).
    pub tcp_keepalive: Duration,
    /// Most connections served at once, in total and per peer address
    /// (shared with the other transports of the process, when they are
    /// given a clone of it); a connection beyond it is closed at once
    /// (default 50,000, 1,000 per address).
    pub connections: ConnectionLimit,
    /// Most concurrent HTTP/2 streams (calls) per connection (default 32):
    /// a client uses one for its push stream and one per call in flight.
    pub max_streams_per_connection: u32,
    /// Largest request message accepted, in bytes (default 8 KiB, as on
    /// the socket transport; the largest legal request, a password change
    /// with two 256-character passwords, is under 2.1 KiB).
    /// A larger one fails with `OUT_OF_RANGE` before it is decoded.
    pub max_request: usize,
    /// Longest a call may take before it fails with `CANCELLED` (default
    /// 30 s; the push stream is not a call that ends, and is not cut).
    pub request_timeout: Duration,
    /// How long a new connection may take to send its HTTP/2 preface and
    /// its first call before it is closed (default 10 s).
    pub handshake_timeout: Duration,
    /// Age at which a connection is told to go away (HTTP/2 GOAWAY, default
    /// 10 minutes): it takes no new calls, calls and push streams already
    /// open run to their end, and then it closes. An idle connection
    /// closes at once, so none is held forever; clients reconnect for
    /// their next call without noticing.
    pub max_connection_age: Duration,
    /// Serve TLS (ALPN [`chat_tls::ALPN_GRPC`], `h2`) instead of plaintext
    /// (default: plaintext). The TLS handshake counts against
    /// [`GrpcConfig::handshake_timeout`].
    pub tls: Option<chat_tls::Acceptor>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            stream_grace: Duration::from_secs(10),
            push_timeout: Duration::from_secs(30),
            http2_keepalive_interval: Duration::from_secs(20),
            http2_keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(30),
            connections: ConnectionLimit::default(),
            max_streams_per_connection: 32,
            max_request: 8 * 1024,
            request_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(600),
            tls: None,
        }
    }
}

/// Serves `chat` over gRPC on `listener`, with `grpc.health.v1` health and
/// server reflection, until `shutdown` completes; then ends every push
/// stream with `UNAVAILABLE`/`shutting_down` and stops. Health turns
/// `NOT_SERVING` when stopping, and when the store can no longer write.
pub async fn serve(
    listener: TcpListener,
    chat: Chat,
    config: GrpcConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let stop = CancellationToken::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ChatServer<ChatService>>().await;
    // Reflection in both versions: v1 for current tools, v1alpha for the
    // many (Python's grpcio-reflection, older grpcurl) that only ask that.
    // google.rpc.ErrorInfo's schema is served too, so that tools decode the
    // error details of failed calls.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(pb::ERROR_DETAILS_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    let service = ChatService {
        chat: chat.clone(),
        sessions: Arc::new(Sessions::default()),
        stream_grace: config.stream_grace,
        push_timeout: config.push_timeout,
        stop: Arc::new(stop.clone()),
    };
    // A store that can no longer write makes the server unhealthy: load
    // balancers and orchestrators stop sending it users.
    let watch_store = {
        let health = health.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                why = chat.store_failed() => {
                    error!(%why, "the store failed; health is NOT_SERVING");
                    health.set_not_serving::<ChatServer<ChatService>>().await;
                    // The whole server too: probes that ask about no
                    // particular service ask about "".
                    health.set_service_status("", ServingStatus::NotServing).await;
                }
                _ = stop.cancelled() => {}
            }
        })
    };
    let signal = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            info!("grpc server stopping");
            health.set_not_serving::<ChatServer<ChatService>>().await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            stop.cancel();
        }
    };
    let incoming = accept_loop(listener, &config);
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .max_concurrent_streams(Some(config.max_streams_per_connection.max(1)))
        .timeout(config.request_timeout)
        .max_connection_age(config.max_connection_age)
        // Every call, to any service, completes its connection's handshake.
        .layer(InterceptorLayer::new(first_request))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ChatServer::new(service).max_decoding_message_size(config.max_request))
        .serve_with_incoming_shutdown(incoming, signal)
        .await;
    watch_store.abort();
    served
}

/// Accepted connections, configured (and past their TLS handshake), for
/// tonic. The builder's TCP options apply only to listeners tonic binds
/// itself, so ours are set here: without TCP_NODELAY the first reply on
/// every connection waits ~40 ms for a delayed ACK. Each connection holds a
/// slot of the connection limit while it lives; one beyond the limit is
/// closed at once (HTTP/2 has no way to say why before its handshake); one
/// that makes no call within the handshake timeout is closed then. TLS
/// handshakes run side by side, each in its own task, so a slow one delays
/// no other. Accept errors (out of file descriptors, a peer that reset
/// before we got to it) are logged and retried after a pause: handing an
/// error to tonic would stop the whole server. The accepting task ends
/// when tonic drops the stream.
fn accept_loop(
    listener: TcpListener,
    config: &GrpcConfig,
) -> impl futures::Stream<Item = std::io::Result<Connection>> + use<> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(config.tcp_keepalive)
        .with_interval(config.tcp_keepalive / 3);
    let connections = config.connections.clone();
    let handshake_timeout = config.handshake_timeout;
    let tls = config.tls.clone();
    let max_work = config.max_streams_per_connection as usize;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let accepted_total = metrics::counter!(
        chat_core::metrics::CONNECTIONS_ACCEPTED,
        "transport" => "grpc"
    );
    let refused_total = metrics::counter!(
        chat_core::metrics::CONNECTIONS_REFUSED,
        "transport" => "grpc"
    );
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => break,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let deadline = tokio::time::Instant::now() + handshake_timeout;
            let slot = match connections.try_acquire(peer.ip()) {
                Ok(slot) => slot,
                Err(refused) => {
                    refused_total.increment(1);
                    debug!(%peer, ?refused, "connection refused");
                    continue;
                }
            };
            accepted_total.increment(1);
            if let Err(err) = stream
                .set_nodelay(true)
                .and_then(|()| socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive))
            {
                debug!(%peer, %err, "could not set socket options");
            }
            let Some(tls) = &tls else {
                let connection =
                    Connection::new(Either::Left(stream), peer, slot, deadline, max_work);
                if tx.send(Ok(connection)).await.is_err() {
                    break;
                }
                continue;
            };
            let tls = tls.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let connection = Connection::new(
                            Either::Right(Box::new(stream)),
                            peer,
                            slot,
                            deadline,
                            max_work,
                        );
                        let _ = tx.send(Ok(connection)).await;
                    }
                    Ok(Err(err)) => debug!(%peer, %err, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "no TLS handshake within the handshake timeout"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
