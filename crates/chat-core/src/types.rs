//! Validated value types: usernames, message bodies, messages, session state.
//!
//! Every value that crosses a transport boundary is parsed into one of these
//! types on the server before the engine looks at it, so the engine never
//! sees an over-long name or an empty message whatever the client checked.

use std::fmt;
use std::sync::Arc;

use crate::error::ChatError;

/// Most Unicode scalar values a username may have.
pub const MAX_USERNAME_CHARS: usize = 50;
/// Most Unicode scalar values a message body may have.
pub const MAX_BODY_CHARS: usize = 280;

/// A validated account name: 1 to [`MAX_USERNAME_CHARS`] Unicode scalar
/// values, none of them whitespace or control characters.
///
/// Cloning is cheap (a reference count), because names travel with every
/// message. Names compare and sort by their UTF-8 bytes, which is Unicode
/// code point order.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Username(Arc<str>);

impl Username {
    /// Checks `raw` and wraps it, or says exactly what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self, ChatError> {
        let count = raw.chars().count();
        if count == 0 {
            return Err(ChatError::InvalidUsername(
                "a username cannot be empty".into(),
            ));
        }
        if count > MAX_USERNAME_CHARS {
            return Err(ChatError::InvalidUsername(format!(
                "a username has at most {MAX_USERNAME_CHARS} characters, this one has {count}"
            )));
        }
        if let Some(bad) = raw.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(ChatError::InvalidUsername(format!(
                "a username cannot contain whitespace or control characters (found {:?})",
                bad
            )));
        }
        Ok(Self(Arc::from(raw)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for Username {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A validated message body: 1 to [`MAX_BODY_CHARS`] Unicode scalar values
/// and no control characters (so one message is always one line of text).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MessageBody(Arc<str>);

impl MessageBody {
    /// A stable 32-bit fingerprint (CRC-32) of the text. Stores keep it with
    /// a send id, so that a resend can be told from a different message
    /// reusing the id (`StoreError::SendIdReused`).
    pub fn fingerprint(&self) -> u32 {
        crc32fast::hash(self.0.as_bytes())
    }

    /// Checks `raw` and wraps it, or says exactly what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self, ChatError> {
        let count = raw.chars().count();
        if count == 0 {
            return Err(ChatError::InvalidMessage(
                "a message cannot be empty".into(),
            ));
        }
        if count > MAX_BODY_CHARS {
            return Err(ChatError::MessageTooLong { chars: count });
        }
        if let Some(bad) = raw.chars().find(|c| c.is_control()) {
            return Err(ChatError::InvalidMessage(format!(
                "a message cannot contain control characters (found {bad:?})"
            )));
        }
        Ok(Self(Arc::from(raw)))
    }

    /// The body as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MessageBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A message id: increasing per recipient, assigned by the store.
pub type MessageId = u64;

/// A message as the recipient sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Per-recipient id, larger for later messages.
    pub id: MessageId,
    /// Who sent it.
    pub sender: Username,
    /// What they wrote.
    pub body: MessageBody,
    /// When the server accepted it, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// Where a session stands; every response carries it so clients can adopt it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum SessionState {
    /// Not logged in: create, login and list are allowed.
    #[default]
    LoggedOut,
    /// Logged in as this user.
    LoggedIn(Username),
}

impl SessionState {
    /// The logged-in user, if any.
    pub fn user(&self) -> Option<&Username> {
        match self {
            SessionState::LoggedOut => None,
            SessionState::LoggedIn(name) => Some(name),
        }
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionState::LoggedOut => f.write_str("logged out"),
            SessionState::LoggedIn(name) => write!(f, "logged in as {name}"),
        }
    }
}

/// What the server says about an accepted message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendReceipt {
    /// The id the message got in the recipient's sequence.
    pub id: MessageId,
    /// When the server accepted it, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn username_limits_count_scalar_values_not_bytes() {
        let fifty = "é".repeat(50);
        assert!(Username::parse(&fifty).is_ok());
        let err = Username::parse(&"é".repeat(51)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidUsername);
        assert_eq!(
            Username::parse("").unwrap_err().code(),
            ErrorCode::InvalidUsername
        );
        for bad in ["a b", "a\tb", "a\nb", "a\u{0}b", "\u{3000}x"] {
            assert_eq!(
                Username::parse(bad).unwrap_err().code(),
                ErrorCode::InvalidUsername,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn body_limits() {
        assert!(MessageBody::parse(&"😀".repeat(280)).is_ok());
        assert!(MessageBody::parse("hello there, spaces are fine").is_ok());
        assert_eq!(
            MessageBody::parse(&"x".repeat(281)).unwrap_err().code(),
            ErrorCode::MessageTooLong
        );
        assert_eq!(
            MessageBody::parse("").unwrap_err().code(),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            MessageBody::parse("a\nb").unwrap_err().code(),
            ErrorCode::InvalidMessage
        );
    }
}
