//! The server's metrics: every name in one place, and the engine's handles.
//!
//! Recorded through the `metrics` crate's facade: with no recorder
//! installed (an embedded engine, tests, the benchmark) each is a no-op. A
//! server installs a Prometheus recorder before it builds the engine, which
//! takes its handles once (`EngineMetrics::new`) so that the hot path
//! pays an atomic add, not a registry lookup. Labels: `transport`
//! (`socket`, `grpc`), `code` (an [`ErrorCode`] name), `store` (`log`,
//! `sqlite`), `outcome`.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::ErrorCode;

/// Connections open now (gauge; `transport`).
pub const CONNECTIONS: &str = "chat_connections";
/// Connections accepted since start (counter; `transport`).
pub const CONNECTIONS_ACCEPTED: &str = "chat_connections_accepted_total";
/// Connections refused at accept: the process or the address is at its
/// limit (counter; `transport`).
pub const CONNECTIONS_REFUSED: &str = "chat_connections_refused_total";
/// Engine sessions open now (gauge; `transport`): one per socket
/// connection, one per gRPC session.
pub const SESSIONS: &str = "chat_sessions";
/// Users logged in now, both transports (gauge).
pub const USERS_ONLINE: &str = "chat_users_online";
/// Logins and account creations that logged in (counter; `outcome` `ok`),
/// and failed login attempts: a wrong password, an unknown user, a
/// throttled attempt (counter; `outcome` `failed`).
pub const LOGINS: &str = "chat_logins_total";
/// Accounts created (counter).
pub const ACCOUNTS_CREATED: &str = "chat_accounts_created_total";
/// Accounts deleted (counter).
pub const ACCOUNTS_DELETED: &str = "chat_accounts_deleted_total";
/// Messages stored (counter): duplicates of an earlier send are not counted.
pub const MESSAGES_SENT: &str = "chat_messages_sent_total";
/// Messages stored for a recipient who was not logged in (counter).
pub const MESSAGES_QUEUED: &str = "chat_messages_queued_total";
/// Messages handed live to their recipient's connection (counter).
pub const MESSAGES_DELIVERED_LIVE: &str = "chat_messages_delivered_live_total";
/// Queued messages handed over by a fetch (counter).
pub const MESSAGES_FETCHED: &str = "chat_messages_fetched_total";
/// Messages acknowledged, and so deleted (counter).
pub const MESSAGES_ACKNOWLEDGED: &str = "chat_messages_acknowledged_total";
/// Messages delivered before, never acknowledged, and delivered again at
/// their recipient's next login (counter).
pub const MESSAGES_REDELIVERED: &str = "chat_messages_redelivered_total";
/// Seconds from a send being accepted to the message being handed to its
/// logged-in recipient's connection: the store's commit included
/// (histogram).
pub const DELIVERY_LATENCY: &str = "chat_delivery_latency_seconds";
/// Logins ended because the recipient stopped reading (counter).
pub const SLOW_CONSUMER_LOGOUTS: &str = "chat_slow_consumer_logouts_total";
/// Requests answered with an error, by code (counter; `transport`,
/// `code`).
pub const ERRORS: &str = "chat_errors_total";
/// Seconds one store commit (a batch of writes made durable together)
/// took (histogram; `store`).
pub const STORE_COMMIT_LATENCY: &str = "chat_store_commit_seconds";
/// Writes per store commit (histogram; `store`).
pub const STORE_COMMIT_BATCH: &str = "chat_store_commit_batch_size";

/// Describes every metric to the installed recorder (its `# HELP` lines).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(CONNECTIONS, "Connections open now, by transport.");
    describe_counter!(CONNECTIONS_ACCEPTED, "Connections accepted, by transport.");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused at accept (connection limits), by transport."
    );
    describe_gauge!(SESSIONS, "Engine sessions open now, by transport.");
    describe_gauge!(USERS_ONLINE, "Users logged in now.");
    describe_counter!(LOGINS, "Logins, by outcome (ok or failed).");
    describe_counter!(ACCOUNTS_CREATED, "Accounts created.");
    describe_counter!(ACCOUNTS_DELETED, "Accounts deleted.");
    describe_counter!(MESSAGES_SENT, "Messages stored.");
    describe_counter!(
        MESSAGES_QUEUED,
        "Messages stored for a recipient who was not logged in."
    );
    describe_counter!(
        MESSAGES_DELIVERED_LIVE,
        "Messages handed live to the recipient's connection."
    );
    describe_counter!(MESSAGES_FETCHED, "Queued messages handed over by a fetch.");
    describe_counter!(MESSAGES_ACKNOWLEDGED, "Messages acknowledged and deleted.");
    describe_counter!(
        MESSAGES_REDELIVERED,
        "Unacknowledged messages delivered again at a login."
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "Send accepted to message handed to the logged-in recipient's connection."
    );
    describe_counter!(
        SLOW_CONSUMER_LOGOUTS,
        "Logins ended because the recipient stopped reading."
    );
    describe_counter!(
        ERRORS,
        "Requests answered with an error, by transport and code."
    );
    describe_histogram!(
        STORE_COMMIT_LATENCY,
        Unit::Seconds,
        "Duration of one store commit (write and sync of a batch)."
    );
    describe_histogram!(STORE_COMMIT_BATCH, "Writes per store commit.");
    // Every error series exists from the start at 0, so that an alert on
    // its increase sees the first one after a restart.
    for transport in ["socket", "grpc"] {
        for code in ErrorCode::ALL {
            counter!(ERRORS, "transport" => transport, "code" => code.as_str()).increment(0);
        }
    }
}

/// Counts one request answered with `code` on `transport`.
pub fn count_error(transport: &'static str, code: ErrorCode) {
    counter!(ERRORS, "transport" => transport, "code" => code.as_str()).increment(1);
}

/// Counts one login ended because its client stopped reading, found by a
/// transport (gRPC's push timeout) rather than by the engine.
pub fn count_slow_consumer() {
    counter!(SLOW_CONSUMER_LOGOUTS).increment(1);
}

/// The engine's metric handles, taken once.
#[derive(Debug)]
pub(crate) struct EngineMetrics {
    pub(crate) logins: Counter,
    pub(crate) failed_logins: Counter,
    pub(crate) created: Counter,
    pub(crate) deleted: Counter,
    pub(crate) sent: Counter,
    pub(crate) queued: Counter,
    pub(crate) live: Counter,
    pub(crate) fetched: Counter,
    pub(crate) acknowledged: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) slow_consumers: Counter,
    pub(crate) delivery_latency: Histogram,
    pub(crate) online: Gauge,
}

impl EngineMetrics {
    pub(crate) fn new() -> Self {
        Self {
            logins: counter!(LOGINS, "outcome" => "ok"),
            failed_logins: counter!(LOGINS, "outcome" => "failed"),
            created: counter!(ACCOUNTS_CREATED),
            deleted: counter!(ACCOUNTS_DELETED),
            sent: counter!(MESSAGES_SENT),
            queued: counter!(MESSAGES_QUEUED),
            live: counter!(MESSAGES_DELIVERED_LIVE),
            fetched: counter!(MESSAGES_FETCHED),
            acknowledged: counter!(MESSAGES_ACKNOWLEDGED),
            redelivered: counter!(MESSAGES_REDELIVERED),
            slow_consumers: counter!(SLOW_CONSUMER_LOGOUTS),
            delivery_latency: histogram!(DELIVERY_LATENCY),
            online: gauge!(USERS_ONLINE),
        }
    }
}

/// A gauge raised while this lives: a connection or a session counted
/// under its transport.
#[derive(Debug)]
pub struct Held(Gauge);

impl Held {
    /// Raises `name` (a gauge labelled `transport`) by one until dropped.
    pub fn new(name: &'static str, transport: &'static str) -> Self {
        let gauge = gauge!(name, "transport" => transport);
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
