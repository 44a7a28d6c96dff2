//! One accepted gRPC connection: its stream (TCP, or TLS over TCP), its
//! slot under the process's connection limit, and its handshake deadline.
//!
//! A connection must complete its TLS handshake (when TLS is on), send its
//! HTTP/2 preface and complete its first call's request within the
//! handshake timeout; until then, its reads fail once
//! the deadline passes, and hyper closes it. Without this, a TCP connection
//! that sends nothing (or only a preface) holds a file descriptor and a
//! connection slot for as long as its peer likes: HTTP/2 keepalive pings
//! only start once a connection is established, and a silent peer is not
//! reaped. The first call marks the handshake done through the connection's
//! [`ConnInfo`], which tonic puts in every request's extensions.

use chat_core::ConnectionSlot;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::either::Either;
use tonic::transport::server::Connected;

/// What every request on a connection knows about it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// Whether the connection is TLS.
    pub encrypted: bool,
    handshake: Arc<AtomicBool>,
    /// Calls' work running for this connection (see
    /// [`ConnInfo::work_permit`]).
    work: Arc<Semaphore>,
    /// The connection's span (transport, peer, user): every call's work
    /// runs in it.
    pub span: tracing::Span,
}

impl ConnInfo {
    /// A connection's information as if accepted from `remote`, for unit
    /// tests of the handlers.
    #[cfg(test)]
    pub(crate) fn for_tests(remote: SocketAddr, max_work: usize) -> Self {
        Self {
            remote,
            encrypted: false,
            handshake: Arc::default(),
            work: Arc::new(Semaphore::new(max_work)),
            span: tracing::Span::none(),
        }
    }

    /// Waits until fewer calls' work runs for this connection than it may
    /// have calls open, and holds one place until dropped.
    pub(crate) async fn work_permit(&self) -> Result<OwnedSemaphorePermit, tonic::Status> {
        Arc::clone(&self.work)
            .acquire_owned()
            .await
            .map_err(|_| tonic::Status::unavailable("the connection is closing"))
    }
}

/// The span of the connection a request came on (none without one).
pub(crate) fn span_of<T>(request: &tonic::Request<T>) -> tracing::Span {
    request
        .extensions()
        .get::<ConnInfo>()
        .map_or_else(tracing::Span::none, |info| info.span.clone())
}

/// The peer address of the connection a request came on.
pub fn peer_of<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnInfo>()
        .map(|info| info.remote)
}

/// Opens an engine session for the connection a request came on: from its
/// peer address (or, without one, from [`UNKNOWN_PEER`]: treated as remote,
/// never trusted, its limits counted together), encrypted if it is TLS.
pub(crate) fn open_session<T>(
    chat: &chat_core::Chat,
    request: &tonic::Request<T>,
) -> (chat_core::Session, chat_core::Events) {
    match request.extensions().get::<ConnInfo>() {
        Some(info) => chat.open_session_over(info.remote.ip(), info.encrypted),
        None => chat.open_session_from(UNKNOWN_PEER),
    }
}

/// The address counted for a caller whose connection gave none (not one
/// from [`crate::serve`]'s listener).
pub(crate) const UNKNOWN_PEER: std::net::IpAddr =
    std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

/// Marks the handshake of the request's connection done (a server-wide
/// interceptor: it lets every call through).
pub(crate) fn first_request(
    request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    if let Some(info) = request.extensions().get::<ConnInfo>() {
        info.handshake.store(true, Ordering::Release);
    }
    Ok(request)
}

/// An accepted connection and its slot under the connection limit, given
/// back when hyper drops the connection.
pub(crate) struct Connection {
    stream: Io,
    info: ConnInfo,
    /// Until the first call: when reading fails.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: ConnectionSlot,
    _open: chat_core::metrics::Held,
}

impl Connection {
    pub(crate) fn new(
        stream: Io,
        remote: SocketAddr,
        slot: ConnectionSlot,
        handshake_deadline: Instant,
        max_work: usize,
    ) -> Self {
        let encrypted = matches!(stream, Either::Right(_));
        Self {
            stream,
            info: ConnInfo {
                remote,
                encrypted,
                handshake: Arc::default(),
                work: Arc::new(Semaphore::new(max_work.max(1))),
                span: tracing::info_span!(
                    "conn",
                    transport = "grpc",
                    peer = %remote,
                    user = tracing::field::Empty
                ),
            },
            deadline: Some(Box::pin(tokio::time::sleep_until(handshake_deadline))),
            _slot: slot,
            _open: chat_core::metrics::Held::new(chat_core::metrics::CONNECTIONS, "grpc"),
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = this.deadline.as_mut() {
            if this.info.handshake.load(Ordering::Acquire) {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no call within the handshake timeout",
                )));
            }
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A connection's byte stream: plain TCP, or TLS over it (boxed: a TLS
/// stream is far larger than a TCP one).
pub(crate) type Io = Either<TcpStream, Box<chat_tls::server::TlsStream<TcpStream>>>;
