//! The conformance suite, written once against
//! `chat_core::client::ChatClient` and run over every transport.
//!
//! A transport's test file provides an async function that starts a fresh
//! server on `127.0.0.1:0` and returns a [`Connector`] to it, then invokes
//! [`conformance_tests!`] with that function; the macro expands to one
//! `#[tokio::test]` per scenario in [`scenarios`]. Each test gets its own
//! server, so scenarios never see each other's accounts.
//!
//! [`process`] runs the server binaries as child processes; [`wire`]
//! counts bytes on the wire per operation; [`pki`] makes TLS certificates.

pub mod pki;
pub mod postgres;
pub mod process;
pub mod scenarios;
pub mod wire;

use std::future::Future;
use std::time::Duration;

use chat_core::client::{ChatClient, Push};
use chat_core::{ErrorCode, Message};

/// Longest a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Waits for the next pushed message, failing on anything else.
pub async fn next_message<C: ChatClient>(client: &mut C) -> Message {
    match tokio::time::timeout(PATIENCE, client.next_push()).await {
        Ok(Some(Push::Message(message))) => message,
        Ok(other) => panic!("expected a pushed message, got {other:?}"),
        Err(_) => panic!("no pushed message within {PATIENCE:?}"),
    }
}

/// Waits for the server's goodbye, failing unless it carries `code`.
pub async fn expect_goodbye<C: ChatClient>(client: &mut C, code: ErrorCode) {
    match tokio::time::timeout(PATIENCE, client.next_push()).await {
        Ok(Some(Push::Goodbye { code: got, .. })) if got == code => {}
        other => panic!("expected a goodbye with {code}, got {other:?}"),
    }
}

/// Opens client connections to one running server.
pub trait Connector: Send + Sync + 'static {
    /// The transport's client type.
    type Client: ChatClient + 'static;
    /// Opens a new connection; panics if the server cannot be reached (a
    /// test failure, not a case to handle).
    fn connect(&self) -> impl Future<Output = Self::Client> + Send;
}

/// Expands to one `#[tokio::test]` per conformance scenario, each calling
/// `$start().await` for a fresh [`Connector`].
#[macro_export]
macro_rules! conformance_tests {
    // `start` returns `Option<connector>`: `None` skips the test (a service
    // it needs is absent, and it said so).
    (optional $start:path) => {
        $crate::conformance_tests!(@names each_optional $start);
    };
    ($start:path) => {
        $crate::conformance_tests!(@names each $start);
    };
    // The scenarios, listed once.
    (@names $mode:ident $start:path) => {
        $crate::conformance_tests!(@ $mode $start;
            account_lifecycle,
            double_create_rejected,
            concurrent_login_rejected,
            bad_requests_get_clear_errors,
            send_to_unknown_user,
            queued_delivery_then_fetch,
            live_delivery_in_order,
            pipelined_sends_in_order,
            batched_acks_go_out_when_due,
            delete_drops_queue_and_frees_name,
            list_accounts_by_pattern,
            connection_drop_logs_out,
            concurrent_creates_one_winner_per_name,
            hundreds_of_clients_exactly_once,
            unacked_messages_are_delivered_again,
            fetched_messages_need_an_ack,
            acks_never_cover_unseen_messages,
            a_recreated_account_starts_afresh,
            a_returning_client_sees_a_recreated_accounts_messages,
            passwords_guard_accounts,
        );
    };
    (@each_optional $start:path; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(connector) = $start(stringify!($name)).await else {
                    return;
                };
                $crate::scenarios::$name(&connector).await;
            }
        )*
    };
    (@each $start:path; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let connector = $start().await;
                $crate::scenarios::$name(&connector).await;
            }
        )*
    };
}
