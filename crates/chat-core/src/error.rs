//! The one error type of the engine, and the stable codes every transport
//! puts on the wire.
//!
//! A [`ChatError`] is what the engine returns; its [`ErrorCode`] is what a
//! client branches on. Codes never change meaning once released: each has a
//! fixed machine-readable name ([`ErrorCode::as_str`]) and a fixed number
//! ([`ErrorCode::as_u16`]) used by the binary socket protocol.

use std::fmt;

use crate::types::{MAX_BODY_CHARS, Username};

/// Everything that can go wrong in a chat operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The name breaks the username rules; the text says which one.
    #[error("invalid username: {0}")]
    InvalidUsername(String),
    /// The message body is empty or has control characters.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The message body is longer than the limit.
    #[error("message too long: {chars} characters, the limit is {MAX_BODY_CHARS}")]
    MessageTooLong {
        /// How many Unicode scalar values the body had.
        chars: usize,
    },
    /// Create: an account with this name exists already.
    #[error("username {0} is taken")]
    UsernameTaken(Username),
    /// Login or send: there is no account with this name.
    #[error("no such user: {0}")]
    NoSuchUser(Username),
    /// Login: the account is logged in on another session.
    #[error("{0} is already logged in on another session")]
    AlreadyLoggedIn(Username),
    /// Create or login while this session is logged in: log out first.
    #[error("this session is logged in as {0}; log out first")]
    SessionLoggedIn(Username),
    /// Logout, delete, send or fetch while logged out.
    #[error("not logged in")]
    NotLoggedIn,
    /// List: the pattern does not compile, or is too large.
    #[error("invalid pattern: {0}")]
    InvalidPattern(String),
    /// Send: the recipient's queue of undelivered messages is full.
    #[error("the queue of {0} is full; try again later")]
    QueueFull(Username),
    /// The store could not do what was asked; nothing was changed.
    #[error("storage unavailable: {0}")]
    StoreUnavailable(String),
    /// The server is shutting down and takes no new work.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Send: this idempotency key was used before for a different message
    /// (another recipient or body) within the retention window; nothing was
    /// stored. A client must never reuse a send id for another message.
    #[error("send id already used for a different message to {0}; nothing was sent")]
    SendIdReused(Username),
    /// Too many requests of this kind too fast (sends per user, account
    /// creations per address); nothing was done.
    #[error("too many {what}; try again in {} ms", retry_after.as_millis())]
    RateLimited {
        /// What was limited, e.g. `messages`.
        what: &'static str,
        /// How long until one more is allowed.
        retry_after: std::time::Duration,
    },
    /// Create: the server holds as many accounts as it may (the number).
    #[error("the server holds as many accounts as it may ({0}); none can be created now")]
    AccountLimit(usize),
    /// The password breaks the rules; the text says which one (and never
    /// quotes the password).
    #[error("invalid password: {0}")]
    InvalidPassword(String),
    /// Login, delete or password change: the password is not the account's.
    #[error("wrong password")]
    WrongPassword,
    /// Too many failed password attempts on this account or from this
    /// address; nothing was checked.
    #[error("too many failed attempts; try again in {} s", retry_after.as_secs().max(1))]
    TooManyAttempts {
        /// How long until an attempt is checked again.
        retry_after: std::time::Duration,
    },
    /// Login: the account predates passwords and has none yet; one can be
    /// set only by logging in over a TLS or loopback connection.
    #[error("{0} has no password yet; log in once over TLS or a loopback connection to set one")]
    PasswordNotSet(Username),
}

impl ChatError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::InvalidUsername(_) => ErrorCode::InvalidUsername,
            ChatError::InvalidMessage(_) => ErrorCode::InvalidMessage,
            ChatError::MessageTooLong { .. } => ErrorCode::MessageTooLong,
            ChatError::UsernameTaken(_) => ErrorCode::UsernameTaken,
            ChatError::NoSuchUser(_) => ErrorCode::NoSuchUser,
            ChatError::AlreadyLoggedIn(_) => ErrorCode::AlreadyLoggedIn,
            ChatError::SessionLoggedIn(_) => ErrorCode::SessionLoggedIn,
            ChatError::NotLoggedIn => ErrorCode::NotLoggedIn,
            ChatError::InvalidPattern(_) => ErrorCode::InvalidPattern,
            ChatError::QueueFull(_) => ErrorCode::QueueFull,
            ChatError::StoreUnavailable(_) => ErrorCode::StoreUnavailable,
            ChatError::ShuttingDown => ErrorCode::ShuttingDown,
            ChatError::SendIdReused(_) => ErrorCode::SendIdReused,
            ChatError::RateLimited { .. } => ErrorCode::RateLimited,
            ChatError::AccountLimit(_) => ErrorCode::AccountLimit,
            ChatError::InvalidPassword(_) => ErrorCode::InvalidPassword,
            ChatError::WrongPassword => ErrorCode::WrongPassword,
            ChatError::TooManyAttempts { .. } => ErrorCode::TooManyAttempts,
            ChatError::PasswordNotSet(_) => ErrorCode::PasswordNotSet,
        }
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $num:literal, $name:literal; )*) => {
        /// Stable, machine-readable error codes shared by every transport.
        ///
        /// Codes 1–99 come from the engine ([`ChatError::code`]); codes
        /// 100 and up are transport-level (malformed input, version
        /// mismatch), defined here so that all clients share one table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in number order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The code's stable name, e.g. `username_taken`.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name,)* }
            }

            /// The code's stable number, as sent by the socket protocol.
            pub fn as_u16(self) -> u16 {
                match self { $(ErrorCode::$variant => $num,)* }
            }

            /// The code with this number, if there is one.
            pub fn from_u16(num: u16) -> Option<Self> {
                match num { $($num => Some(ErrorCode::$variant),)* _ => None }
            }

            /// The code with this name, if there is one.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $($name => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// See [`ChatError::InvalidUsername`].
    InvalidUsername = 1, "invalid_username";
    /// See [`ChatError::InvalidMessage`].
    InvalidMessage = 2, "invalid_message";
    /// See [`ChatError::MessageTooLong`].
    MessageTooLong = 3, "message_too_long";
    /// See [`ChatError::UsernameTaken`].
    UsernameTaken = 4, "username_taken";
    /// See [`ChatError::NoSuchUser`].
    NoSuchUser = 5, "no_such_user";
    /// See [`ChatError::AlreadyLoggedIn`].
    AlreadyLoggedIn = 6, "already_logged_in";
    /// See [`ChatError::SessionLoggedIn`].
    SessionLoggedIn = 7, "session_logged_in";
    /// See [`ChatError::NotLoggedIn`].
    NotLoggedIn = 8, "not_logged_in";
    /// See [`ChatError::InvalidPattern`].
    InvalidPattern = 9, "invalid_pattern";
    /// See [`ChatError::QueueFull`].
    QueueFull = 10, "queue_full";
    /// See [`ChatError::StoreUnavailable`].
    StoreUnavailable = 11, "store_unavailable";
    /// See [`ChatError::ShuttingDown`].
    ShuttingDown = 12, "shutting_down";
    /// See [`ChatError::SendIdReused`].
    SendIdReused = 13, "send_id_reused";
    /// See [`ChatError::RateLimited`].
    RateLimited = 14, "rate_limited";
    /// See [`ChatError::AccountLimit`].
    AccountLimit = 15, "account_limit";
    /// See [`ChatError::InvalidPassword`].
    InvalidPassword = 16, "invalid_password";
    /// See [`ChatError::WrongPassword`].
    WrongPassword = 17, "wrong_password";
    /// See [`ChatError::TooManyAttempts`].
    TooManyAttempts = 18, "too_many_attempts";
    /// See [`ChatError::PasswordNotSet`].
    PasswordNotSet = 19, "password_not_set";
    /// Transport: a frame or message could not be decoded.
    Malformed = 100, "malformed";
    /// Transport: a frame was larger than the receiver accepts.
    FrameTooLarge = 101, "frame_too_large";
    /// Transport: the operation tag is not one this server knows.
    UnknownOperation = 102, "unknown_operation";
    /// Transport: the peer speaks a protocol version this one does not.
    UnsupportedVersion = 103, "unsupported_version";
    /// Transport: a request came before the version handshake.
    HandshakeRequired = 104, "handshake_required";
    /// Transport: the peer was silent for longer than the idle timeout.
    IdleTimeout = 105, "idle_timeout";
    /// Transport: the session token is missing, unknown or expired.
    Unauthenticated = 106, "unauthenticated";
    /// Transport: the server failed in a way that is not the client's fault.
    Internal = 107, "internal";
    /// Transport: the server holds as many connections as it may; try
    /// again later.
    ServerFull = 108, "server_full";
    /// Transport: the connection did not finish its handshake in time.
    HandshakeTimeout = 109, "handshake_timeout";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_by_number_and_name() {
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            assert!(seen.insert(code.as_u16()), "duplicate number for {code}");
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(code));
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_name("nope"), None);
    }
}
