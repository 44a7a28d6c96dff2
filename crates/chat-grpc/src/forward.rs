//! The Subscribe stream: a session's events, forwarded as [`pb::Push`]es.
//!
//! A task feeds the session's events into a small bounded channel that the
//! response stream drains (so a client that stops reading holds at most a
//! few pushes here; the session's own event channel is the real queue). The
//! stream always ends with what the client must know about the end of its
//! session: a `LoggedOut` push, a status carrying a chat error code, or
//! both. Those last items do not go through the bounded channel, so they
//! are delivered even when the client stopped reading or the server is
//! stopping: they come after everything already queued.

use std::pin::Pin;
use std::time::Duration;

use chat_core::{ErrorCode, Event, Events, LogoutReason, Message};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::pb;
use crate::status::ending_status;

/// What a Subscribe call returns.
pub type PushStream = Pin<Box<dyn Stream<Item = Result<pb::Push, tonic::Status>> + Send>>;

type Item = Result<pb::Push, tonic::Status>;

/// Pushes buffered between the forwarder and the response stream.
const STREAM_BUFFER: usize = 16;

/// Starts forwarding `events` and returns the response stream and the
/// forwarder; the forwarder completes when the session's stream is over.
pub(crate) fn subscribe(
    session: u64,
    user: String,
    events: Events,
    stop: CancellationToken,
    push_timeout: Duration,
) -> (PushStream, impl Future<Output = ()> + Send) {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let (last_tx, last_rx) = oneshot::channel::<Vec<Item>>();
    let stream = ReceiverStream::new(rx).chain(
        futures::stream::once(last_rx)
            .flat_map(|last| futures::stream::iter(last.unwrap_or_default())),
    );
    let forwarder = async move {
        let last = forward(session, &user, events, tx, stop, push_timeout).await;
        let _ = last_tx.send(last);
    };
    (Box::pin(stream), forwarder)
}

pub(crate) fn pb_message(m: Message) -> pb::Message {
    pb::Message {
        id: m.id,
        sender: m.sender.to_string(),
        body: m.body.to_string(),
        timestamp_ms: m.timestamp_ms,
    }
}

fn push(event: pb::push::Event) -> Item {
    Ok(pb::Push { event: Some(event) })
}

fn logged_out(user: &str, reason: LogoutReason) -> Item {
    push(pb::push::Event::LoggedOut(pb::LoggedOut {
        username: user.to_string(),
        reason: reason.as_str().to_string(),
    }))
}

fn shutting_down() -> Vec<Item> {
    vec![Err(ending_status(
        ErrorCode::ShuttingDown,
        "the server is shutting down",
    ))]
}

/// How one push into the stream went.
enum Pushed {
    Yes,
    /// The client went away.
    Gone,
    /// The client did not make room within the push timeout.
    Stuck,
    /// The server is stopping.
    Stopping,
}

/// Puts `item` in the stream: at once when there is room (no timer, no
/// cancellation waiter: the common case, once per delivered message), else
/// waiting up to `timeout` for the client to make room.
async fn push_into(
    tx: &mpsc::Sender<Item>,
    item: Item,
    stop: &CancellationToken,
    timeout: Duration,
) -> Pushed {
    let item = match tx.try_send(item) {
        Ok(()) => return Pushed::Yes,
        Err(mpsc::error::TrySendError::Closed(_)) => return Pushed::Gone,
        Err(mpsc::error::TrySendError::Full(item)) => item,
    };
    tokio::select! {
        sent = tokio::time::timeout(timeout, tx.send(item)) => match sent {
            Ok(Ok(())) => Pushed::Yes,
            Ok(Err(_)) => Pushed::Gone,
            Err(_) => Pushed::Stuck,
        },
        _ = stop.cancelled() => Pushed::Stopping,
    }
}

/// Feeds a session's events into its stream until the session or the
/// stream ends; returns the items that end the stream.
async fn forward(
    session: u64,
    user: &str,
    mut events: Events,
    tx: mpsc::Sender<Item>,
    stop: CancellationToken,
    push_timeout: Duration,
) -> Vec<Item> {
    // A child token: waiting on it takes a lock of this session's alone,
    // not the server-wide one every forwarder would share.
    let stop = stop.child_token();
    let ended = |pushed: Pushed| -> Option<Vec<Item>> {
        match pushed {
            Pushed::Yes => None,
            Pushed::Gone => {
                debug!(session, "push stream closed by the client");
                Some(Vec::new())
            }
            Pushed::Stuck => {
                warn!(
                    user,
                    "slow consumer logged out: its push stream was not read; its messages are queued"
                );
                chat_core::metrics::count_slow_consumer();
                Some(vec![
                    logged_out(user, LogoutReason::SlowConsumer),
                    Err(ending_status(
                        ErrorCode::Unauthenticated,
                        format!(
                            "session ended: slow consumer (no push read for {} ms)",
                            push_timeout.as_millis()
                        ),
                    )),
                ])
            }
            Pushed::Stopping => Some(shutting_down()),
        }
    };
    // First the replay, then the marker that it is complete.
    for message in events.take_replay() {
        let item = push(pb::push::Event::Message(pb_message(message)));
        if let Some(last) = ended(push_into(&tx, item, &stop, push_timeout).await) {
            return last;
        }
    }
    let ready = push(pb::push::Event::Ready(pb::Ready {}));
    if let Some(last) = ended(push_into(&tx, ready, &stop, push_timeout).await) {
        return last;
    }
    loop {
        let event = tokio::select! {
            _ = tx.closed() => return ended(Pushed::Gone).unwrap_or_default(),
            _ = stop.cancelled() => return shutting_down(),
            event = events.recv() => event,
        };
        let item = match event {
            Some(Event::Message(message)) => push(pb::push::Event::Message(pb_message(message))),
            Some(Event::LoggedOut { user, reason }) => {
                let mut last = vec![logged_out(user.as_str(), reason)];
                if reason != LogoutReason::Requested {
                    let why = format!("session ended: {}", reason.as_str().replace('_', " "));
                    last.push(Err(ending_status(ErrorCode::Unauthenticated, why)));
                }
                return last;
            }
            Some(Event::Shutdown) | None => return shutting_down(),
        };
        if let Some(last) = ended(push_into(&tx, item, &stop, push_timeout).await) {
            return last;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::Chat;

    /// Collects a stream's items, however it ends.
    async fn drain(mut stream: PushStream) -> Vec<Item> {
        let mut items = Vec::new();
        while let Some(item) = stream.next().await {
            items.push(item);
        }
        items
    }

    fn is_message_or_ready(item: &Item) -> bool {
        matches!(
            item,
            Ok(pb::Push {
                event: Some(pb::push::Event::Message(_) | pb::push::Event::Ready(_))
            })
        )
    }

    /// A client that stops reading: the push times out, and the stream
    /// still ends by telling it its session ended (it used to end with OK
    /// and nothing else).
    #[tokio::test(start_paused = true)]
    async fn a_stuck_stream_ends_with_a_logout_and_a_status() {
        let chat = Chat::in_memory();
        let (alice, _alice_events) = chat.open_session();
        let (bob, bob_events) = chat.open_session();
        alice.create("alice", "password1").await.unwrap();
        bob.create("bob", "password1").await.unwrap();
        let (stream, forwarder) = subscribe(
            1,
            "bob".into(),
            bob_events,
            CancellationToken::new(),
            Duration::from_secs(30),
        );
        let forwarder = tokio::spawn(forwarder);
        for i in 0..(STREAM_BUFFER + 2) {
            alice.send("bob", &format!("m{i}")).await.unwrap();
        }
        // Nobody reads: the forwarder gives up after the push timeout.
        forwarder.await.unwrap();
        let items = drain(stream).await;
        let n = items.len();
        assert!(items[..n - 2].iter().all(is_message_or_ready));
        match &items[n - 2] {
            Ok(pb::Push {
                event: Some(pb::push::Event::LoggedOut(out)),
            }) => {
                assert_eq!(
                    (out.username.as_str(), out.reason.as_str()),
                    ("bob", "slow_consumer")
                );
            }
            other => panic!("{other:?}"),
        }
        let status = items[n - 1].as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            crate::status::chat_code(status),
            Some(ErrorCode::Unauthenticated)
        );
    }

    /// Shutdown while the forwarder waits for room: the stream still ends
    /// with `shutting_down`, after what was queued.
    #[tokio::test(start_paused = true)]
    async fn shutdown_while_stuck_still_says_so() {
        let chat = Chat::in_memory();
        let (alice, _alice_events) = chat.open_session();
        let (bob, bob_events) = chat.open_session();
        alice.create("alice", "password1").await.unwrap();
        bob.create("bob", "password1").await.unwrap();
        let stop = CancellationToken::new();
        let (stream, forwarder) = subscribe(
            1,
            "bob".into(),
            bob_events,
            stop.clone(),
            Duration::from_secs(30),
        );
        let forwarder = tokio::spawn(forwarder);
        for i in 0..(STREAM_BUFFER + 2) {
            alice.send("bob", &format!("m{i}")).await.unwrap();
        }
        tokio::task::yield_now().await;
        stop.cancel();
        forwarder.await.unwrap();
        let items = drain(stream).await;
        let status = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(
            crate::status::chat_code(status),
            Some(ErrorCode::ShuttingDown)
        );
        assert!(items[..items.len() - 1].iter().all(|i| i.is_ok()));
    }
}
