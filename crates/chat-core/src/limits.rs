//! Limits shared by every transport of one server.
//!
//! [`ConnectionLimit`] counts the connections a process serves, across all
//! its transports together, in total and per peer address: each accepted
//! connection takes a [`ConnectionSlot`] and gives it back when it ends. A
//! server gives both transports clones of one limit, so that the total
//! stays below what the process can open (every connection is a file
//! descriptor) and one address cannot take every slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many connections may be served at once; clones share the counts.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
    per_address: usize,
    by_address: AddressCounts,
}

/// Connections per peer address, shared by a limit's clones and slots.
type AddressCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Why a connection was not given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server serves as many connections as it may.
    Full,
    /// This peer address holds as many connections as one address may.
    TooManyFromAddress,
}

/// One connection's place under a [`ConnectionLimit`], given back when
/// dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    address: Option<(IpAddr, AddressCounts)>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some((address, counts)) = self.address.take()
            && let Ok(mut counts) = counts.lock()
            && let Some(count) = counts.get_mut(&address)
        {
            *count -= 1;
            if *count == 0 {
                counts.remove(&address);
            }
        }
    }
}

impl ConnectionLimit {
    /// A limit of `max` connections, and as many from one address.
    pub fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            per_address: max,
            by_address: Arc::default(),
        }
    }

    /// This limit, allowing at most `per_address` connections from one
    /// peer address.
    pub fn with_per_address(mut self, per_address: usize) -> Self {
        self.per_address = per_address;
        self
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The limit per peer address.
    pub fn per_address(&self) -> usize {
        self.per_address
    }

    /// Connections being served now.
    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// A slot for a new connection from `peer` (counted by
    /// [`address_key`]), or why not.
    pub fn try_acquire(&self, peer: IpAddr) -> Result<ConnectionSlot, Refusal> {
        let peer = address_key(peer);
        let permit = Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| Refusal::Full)?;
        let mut counts = self.by_address.lock().map_err(|_| Refusal::Full)?;
        let count = counts.entry(peer).or_insert(0);
        if *count >= self.per_address {
            if *count == 0 {
                counts.remove(&peer);
            }
            return Err(Refusal::TooManyFromAddress);
        }
        *count += 1;
        Ok(ConnectionSlot {
            _permit: permit,
            address: Some((peer, Arc::clone(&self.by_address))),
        })
    }
}

impl Default for ConnectionLimit {
    /// [`DEFAULT_MAX_CONNECTIONS`] in total, [`DEFAULT_MAX_PER_ADDRESS`]
    /// from one address.
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CONNECTIONS).with_per_address(DEFAULT_MAX_PER_ADDRESS)
    }
}

/// The default total of a [`ConnectionLimit`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;

/// The default number of connections one peer address may hold. Generous
/// enough for many users behind one NAT; small enough that one address
/// cannot take the server's file descriptors.
pub const DEFAULT_MAX_PER_ADDRESS: usize = 1_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_count_and_slots_come_back() {
        let here: IpAddr = "127.0.0.1".parse().unwrap();
        let limit = ConnectionLimit::new(2);
        let other = limit.clone();
        let a = limit.try_acquire(here).expect("first");
        let _b = other.try_acquire(here).expect("second, through the clone");
        assert_eq!(limit.try_acquire(here).unwrap_err(), Refusal::Full);
        assert_eq!(other.in_use(), 2);
        drop(a);
        assert!(other.try_acquire(here).is_ok());
    }

    #[test]
    fn addresses_are_keyed_by_host_or_ipv6_network() {
        let key = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.1"), key("::ffff:192.0.2.1"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert!(key("::ffff:127.0.0.1").is_loopback());
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let (one, two): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let limit = ConnectionLimit::new(10).with_per_address(2);
        let a = limit.try_acquire(one).unwrap();
        let _b = limit.try_acquire(one).unwrap();
        assert_eq!(
            limit.try_acquire(one).unwrap_err(),
            Refusal::TooManyFromAddress
        );
        assert!(limit.try_acquire(two).is_ok(), "another address is served");
        drop(a);
        assert!(limit.try_acquire(one).is_ok(), "a freed slot counts again");
    }
}

/// The key per-address limits count by: an IPv4 address (also written as
/// an IPv4-mapped IPv6 one), or an IPv6 address's /64 network, since one
/// host commonly holds a whole /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::V6(std::net::Ipv6Addr::from(segments))
        }
        v4 => v4,
    }
}

/// A token-bucket rate: up to `burst` at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Most taken at once after a quiet spell.
    pub burst: u32,
    /// Sustained rate, per second.
    pub per_second: f64,
}

impl Rate {
    /// `burst` at once, then `per_minute` a minute.
    pub fn per_minute(burst: u32, per_minute: f64) -> Self {
        Self {
            burst,
            per_second: per_minute / 60.0,
        }
    }
}

/// One token bucket (not shared: its owner locks it).
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: f64,
    last: tokio::time::Instant,
}

impl Bucket {
    /// A full bucket for `rate`.
    pub(crate) fn full(rate: Rate) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            last: tokio::time::Instant::now(),
        }
    }

    fn refill(&mut self, rate: Rate) {
        let now = tokio::time::Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.last = now;
    }

    /// Takes one token, or says how long until one is there.
    pub(crate) fn take(&mut self, rate: Rate) -> Result<(), std::time::Duration> {
        self.peek(rate)?;
        self.tokens -= 1.0;
        Ok(())
    }

    /// Whether a token is there now (none is taken), or how long until
    /// one is.
    pub(crate) fn peek(&mut self, rate: Rate) -> Result<(), std::time::Duration> {
        self.refill(rate);
        if self.tokens >= 1.0 {
            return Ok(());
        }
        let wait = if rate.per_second > 0.0 {
            (1.0 - self.tokens) / rate.per_second
        } else {
            f64::MAX
        };
        // A day at most: a rate of zero would otherwise say "forever".
        Err(std::time::Duration::from_secs_f64(wait.min(86_400.0)))
    }

    /// Whether the bucket has refilled completely (and can be forgotten).
    pub(crate) fn is_full(&mut self, rate: Rate) -> bool {
        self.refill(rate);
        self.tokens >= f64::from(rate.burst)
    }
}
