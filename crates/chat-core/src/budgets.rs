//! Rate budgets that every engine sharing a store draws on: the
//! [`Budgets`] seam.
//!
//! The limits an attacker would spread over several server processes to
//! multiply are kept here rather than in one engine: failed password
//! attempts per account and per address, password checks per address,
//! account creations per address, and lists per address. Each is a token
//! bucket ([`Rate`]) named by a [`Budget`]. An engine draws on several at
//! once and all or nothing ([`Budgets::draw`]), so a refused attempt costs
//! no budget and attempts made in parallel cannot all pass a budget that
//! has room for one.
//!
//! [`LocalBudgets`] is the in-process implementation (one engine, or
//! several in one process). A clustered implementation keeps the buckets in
//! the shared database and refills them by its clock, so every process
//! sees one budget.
//!
//! Send rates are not here: a user sends from the one node that holds
//! their login (see [`presence`](crate::presence)), which keeps their
//! bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::ChatError;
use crate::limits::{Bucket, Rate};
use crate::types::Username;

/// One budget: what it limits, and for whom.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Budget {
    /// Failed password attempts on one account.
    AccountFailures(Username),
    /// Failed password attempts from one address (an
    /// [`address_key`](crate::address_key)), over all accounts.
    AddressFailures(IpAddr),
    /// Password checks of any outcome from one address.
    AddressChecks(IpAddr),
    /// Accounts created from one address.
    Creates(IpAddr),
    /// Lists from one address, by callers without a session.
    Lists(IpAddr),
}

impl Budget {
    /// A stable text key, e.g. `failures/account/alice` (what a shared
    /// implementation stores it under).
    pub fn key(&self) -> String {
        match self {
            Budget::AccountFailures(name) => format!("failures/account/{name}"),
            Budget::AddressFailures(ip) => format!("failures/address/{ip}"),
            Budget::AddressChecks(ip) => format!("checks/address/{ip}"),
            Budget::Creates(ip) => format!("creates/address/{ip}"),
            Budget::Lists(ip) => format!("lists/address/{ip}"),
        }
    }
}

/// One part of a [`Budgets::draw`]: `budget` (refilling at `rate`) must
/// hold a token, and gives one up if `take`.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    /// Which budget.
    pub budget: Budget,
    /// Its rate (a budget nobody drew on yet starts full: `rate.burst`).
    pub rate: Rate,
    /// Whether a token is taken, or only required.
    pub take: bool,
}

impl Draw {
    /// Takes a token from `budget`.
    pub fn take(budget: Budget, rate: Rate) -> Self {
        Self {
            budget,
            rate,
            take: true,
        }
    }

    /// Requires a token in `budget` without taking it.
    pub fn require(budget: Budget, rate: Rate) -> Self {
        Self {
            budget,
            rate,
            take: false,
        }
    }
}

/// Why budgets could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The shared store of budgets cannot be reached.
    #[error("rate budgets unavailable: {0}")]
    Unavailable(String),
}

impl From<BudgetError> for ChatError {
    fn from(err: BudgetError) -> Self {
        ChatError::StoreUnavailable(err.to_string())
    }
}

/// Token buckets shared by every engine that uses one. See the module docs.
#[async_trait]
pub trait Budgets: Send + Sync + 'static {
    /// All or nothing: if every budget of `draws` holds a token, takes one
    /// from each whose `take` is set and answers `Ok(Ok(()))`; otherwise
    /// changes nothing and answers `Ok(Err(wait))`, the longest wait until
    /// the empty ones hold a token again.
    async fn draw(&self, draws: &[Draw]) -> Result<Result<(), Duration>, BudgetError>;

    /// Makes `budget` full again (its owner proved who they are).
    async fn refill(&self, budget: &Budget) -> Result<(), BudgetError>;

    /// Forgets budgets that are full again (a full budget is what a new one
    /// is); returns how many.
    async fn prune(&self) -> Result<usize, BudgetError>;
}

/// Budgets in this process's memory: what one server process needs.
#[derive(Debug, Default)]
pub struct LocalBudgets {
    buckets: Mutex<HashMap<Budget, (Bucket, Rate)>>,
}

impl LocalBudgets {
    /// No budget drawn on yet.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Budgets for LocalBudgets {
    async fn draw(&self, draws: &[Draw]) -> Result<Result<(), Duration>, BudgetError> {
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| BudgetError::Unavailable("the budgets' lock was poisoned".into()))?;
        let mut wait = None;
        for draw in draws {
            let (bucket, _) = buckets
                .entry(draw.budget.clone())
                .or_insert_with(|| (Bucket::full(draw.rate), draw.rate));
            if let Err(w) = bucket.peek(draw.rate) {
                wait = wait.max(Some(w));
            }
        }
        if let Some(wait) = wait {
            return Ok(Err(wait));
        }
        for draw in draws.iter().filter(|d| d.take) {
            if let Some((bucket, rate)) = buckets.get_mut(&draw.budget) {
                *rate = draw.rate;
                let _ = bucket.take(draw.rate);
            }
        }
        Ok(Ok(()))
    }

    async fn refill(&self, budget: &Budget) -> Result<(), BudgetError> {
        if let Ok(mut buckets) = self.buckets.lock() {
            buckets.remove(budget);
        }
        Ok(())
    }

    async fn prune(&self) -> Result<usize, BudgetError> {
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(0);
        };
        let before = buckets.len();
        buckets.retain(|_, (bucket, rate)| !bucket.is_full(*rate));
        Ok(before - buckets.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_draw_is_all_or_nothing_and_refills_with_time() {
        let budgets = LocalBudgets::new();
        let two = Rate {
            burst: 2,
            per_second: 1.0,
        };
        let a = Budget::Creates(ip("192.0.2.1"));
        let b = Budget::Lists(ip("192.0.2.1"));
        for _ in 0..2 {
            budgets
                .draw(&[Draw::take(a.clone(), two)])
                .await
                .unwrap()
                .unwrap();
        }
        // `a` is empty: drawing on both refuses, and `b` keeps its tokens.
        let wait = budgets
            .draw(&[Draw::take(b.clone(), two), Draw::take(a.clone(), two)])
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        for _ in 0..2 {
            budgets
                .draw(&[Draw::take(b.clone(), two)])
                .await
                .unwrap()
                .unwrap();
        }
        // Requiring a token takes none.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..3 {
            budgets
                .draw(&[Draw::require(a.clone(), two)])
                .await
                .unwrap()
                .unwrap();
        }
        budgets
            .draw(&[Draw::take(a.clone(), two)])
            .await
            .unwrap()
            .unwrap();
        assert!(
            budgets
                .draw(&[Draw::take(a.clone(), two)])
                .await
                .unwrap()
                .is_err()
        );
        // A refill makes it whole; a pruned full budget is forgotten.
        budgets.refill(&a).await.unwrap();
        budgets
            .draw(&[Draw::take(a.clone(), two)])
            .await
            .unwrap()
            .unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(budgets.prune().await.unwrap(), 2);
    }

    #[test]
    fn keys_name_the_limit_and_its_subject() {
        let name = Username::parse("alice").unwrap();
        assert_eq!(
            Budget::AccountFailures(name).key(),
            "failures/account/alice"
        );
        assert_eq!(
            Budget::AddressChecks(ip("2001:db8::")).key(),
            "checks/address/2001:db8::"
        );
    }
}
