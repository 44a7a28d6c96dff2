//! The token → session table: which chat-core [`Session`] a bearer token
//! names, and the grace timer of a session whose push stream has not opened.
//!
//! A token is 80 lower-case hexadecimal characters: the session's 64-bit id
//! (looked up) and a 256-bit random secret (compared in constant time). It
//! is matched exactly as issued: upper-case digits, whitespace or any other
//! length name no session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_core::{Events, Session};
use rand::Rng;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Characters of a token: 16 for the id, 64 for the secret.
const TOKEN_LEN: usize = 16 + 64;

/// One logged-in gRPC session.
pub(crate) struct Entry {
    pub(crate) id: u64,
    secret: [u8; 32],
    pub(crate) session: Session,
    /// Taken by the Subscribe call; `None` once the stream is open.
    pub(crate) events: Mutex<Option<Events>>,
    /// Cancelled when the session ends, whoever ends it.
    pub(crate) ended: CancellationToken,
    /// Counts the session while it is in use.
    _open: chat_core::metrics::Held,
}

/// The token → session table.
#[derive(Default)]
pub(crate) struct Sessions {
    by_id: Mutex<HashMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
}

impl Sessions {
    /// Adds a logged-in session; returns it and its token.
    pub(crate) fn insert(&self, session: Session, events: Events) -> (Arc<Entry>, String) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut secret = [0u8; 32];
        rand::rng().fill(&mut secret);
        let token = format!("{id:016x}{}", hex(&secret));
        let entry = Arc::new(Entry {
            id,
            secret,
            session,
            events: Mutex::new(Some(events)),
            ended: CancellationToken::new(),
            _open: chat_core::metrics::Held::new(chat_core::metrics::SESSIONS, "grpc"),
        });
        if let Ok(mut by_id) = self.by_id.lock() {
            by_id.insert(id, Arc::clone(&entry));
        }
        (entry, token)
    }

    /// The session a token names, if it is live.
    pub(crate) fn find(&self, token: &str) -> Option<Arc<Entry>> {
        let (id, secret) = parse_token(token)?;
        let entry = self.by_id.lock().ok()?.get(&id).cloned()?;
        bool::from(entry.secret.ct_eq(&secret)).then_some(entry)
    }

    /// Ends a session: forgets its token and logs it out. Idempotent.
    pub(crate) async fn end(&self, entry: &Entry) {
        let removed = self
            .by_id
            .lock()
            .ok()
            .and_then(|mut by_id| by_id.remove(&entry.id));
        entry.ended.cancel();
        if removed.is_some() {
            entry.session.logout().await.ok();
        }
    }

    /// Ends `entry` if its push stream is not open within `grace`.
    pub(crate) fn expire_unopened(self: &Arc<Self>, entry: Arc<Entry>, grace: Duration) {
        let sessions = Arc::clone(self);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {
                    let unopened = entry.events.lock().map(|e| e.is_some()).unwrap_or(true);
                    if unopened {
                        debug!(session = entry.id, "push stream never opened; session expired");
                        sessions.end(&entry).await;
                    }
                }
                _ = entry.ended.cancelled() => {}
            }
        });
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A token's id and secret, if it has exactly the issued form.
fn parse_token(token: &str) -> Option<(u64, [u8; 32])> {
    let lower_hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
    if token.len() != TOKEN_LEN || !token.bytes().all(lower_hex) {
        return None;
    }
    let id = u64::from_str_radix(&token[..16], 16).ok()?;
    let mut secret = [0u8; 32];
    for (i, byte) in secret.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&token[16 + 2 * i..18 + 2 * i], 16).ok()?;
    }
    Some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_matched_exactly_as_issued() {
        let token = format!("{:016x}{}", 7u64, "ab".repeat(32));
        assert_eq!(parse_token(&token), Some((7, [0xab; 32])));
        for bad in [
            token.to_uppercase(),
            format!(" {token}"),
            format!("{token}0"),
            token[1..].to_string(),
            format!("+{}", &token[1..]),
            token.replace('a', "g"),
        ] {
            assert_eq!(parse_token(&bad), None, "{bad:?}");
        }
    }
}
