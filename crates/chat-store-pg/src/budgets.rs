//! Rate budgets in the database, drawn on by every server process
//! ([`chat_core::budgets`]).
//!
//! A budget is a row of `budgets`: the tokens left when it was last drawn
//! on, and when that was in the database's clock. A draw locks its rows in
//! key order (creating missing ones full first), refills them by the time
//! passed, and takes its tokens in one transaction, all or nothing; two
//! processes drawing on one budget at once are serialized by the row lock,
//! so a budget with room for one attempt lets exactly one through.

use std::time::Duration;

use async_trait::async_trait;
use chat_core::budgets::{BudgetError, Budgets, Draw};
use sqlx::PgPool;

use crate::PgStore;

/// How many times a draw that lost a deadlock (or a row it made) is tried
/// again.
const DEADLOCK_RETRIES: usize = 3;

/// The longest wait a refusal names (a rate of zero would otherwise say
/// "forever"), as the in-process budgets do.
const LONGEST_WAIT: f64 = 86_400.0;

/// [`Budgets`] in a PostgreSQL database. Cheap to clone (a pool).
#[derive(Debug, Clone)]
pub struct PgBudgets {
    pool: PgPool,
}

impl PgBudgets {
    /// Budgets in `store`'s database.
    pub fn new(store: &PgStore) -> Self {
        Self {
            pool: store.pool().clone(),
        }
    }

    /// One try at a draw; `None` if a row vanished between its creation
    /// and its lock (a refill or prune came between), and `vanished` is not
    /// allowed: the draw is tried again.
    async fn try_draw(
        &self,
        draws: &[Draw],
        vanished: bool,
    ) -> Result<Option<Result<(), Duration>>, sqlx::Error> {
        // Key order everywhere, so two draws never wait for each other's
        // rows in opposite orders.
        let mut draws: Vec<(String, &Draw)> = draws.iter().map(|d| (d.budget.key(), d)).collect();
        draws.sort_by(|a, b| a.0.cmp(&b.0));
        draws.dedup_by(|a, b| a.0 == b.0);
        let keys: Vec<String> = draws.iter().map(|(key, _)| key.clone()).collect();
        let bursts: Vec<f64> = draws.iter().map(|(_, d)| f64::from(d.rate.burst)).collect();
        let mut tx = self.pool.begin().await?;
        // A budget nobody drew on yet is full.
        sqlx::query(
            "INSERT INTO budgets (key, tokens, updated, full_at) \
             SELECT k, b, extract(epoch FROM clock_timestamp()), extract(epoch FROM clock_timestamp()) \
             FROM unnest($1::text[], $2::float8[]) AS t(k, b) ORDER BY k COLLATE \"C\" \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(&keys)
        .bind(&bursts)
        .execute(&mut *tx)
        .await?;
        let rows: Vec<(String, f64, f64)> = sqlx::query_as(
            "SELECT key, tokens, updated FROM budgets WHERE key = ANY($1) ORDER BY key FOR UPDATE",
        )
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?;
        if rows.len() < keys.len() && !vanished {
            return Ok(None);
        }
        // Read once the rows are ours: no draw on them can come between.
        let now: f64 = sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
            .fetch_one(&mut *tx)
            .await?;
        let mut wait: Option<f64> = None;
        let mut taken = (Vec::new(), Vec::new(), Vec::new());
        for (key, draw) in &draws {
            let rate = draw.rate;
            let burst = f64::from(rate.burst);
            let (tokens, updated) = rows
                .iter()
                .find(|(k, _, _)| k == key)
                .map_or((burst, now), |(_, t, u)| (*t, *u));
            let tokens = (tokens + (now - updated).max(0.0) * rate.per_second).min(burst);
            if tokens < 1.0 {
                let w = if rate.per_second > 0.0 {
                    ((1.0 - tokens) / rate.per_second).min(LONGEST_WAIT)
                } else {
                    LONGEST_WAIT
                };
                wait = Some(wait.map_or(w, |longest| longest.max(w)));
            } else if draw.take {
                let left = tokens - 1.0;
                let full_in = if rate.per_second > 0.0 {
                    (burst - left) / rate.per_second
                } else {
                    LONGEST_WAIT
                };
                taken.0.push(key.clone());
                taken.1.push(left);
                taken.2.push(now + full_in);
            }
        }
        if let Some(wait) = wait {
            // Rolled back: a refusal takes nothing.
            return Ok(Some(Err(Duration::from_secs_f64(wait))));
        }
        // An upsert: a row deleted since it was read (a refill, a prune of
        // a full one) is charged all the same.
        sqlx::query(
            "INSERT INTO budgets (key, tokens, updated, full_at) \
             SELECT key, tokens, $4, full_at \
             FROM unnest($1::text[], $2::float8[], $3::float8[]) AS t(key, tokens, full_at) \
             ORDER BY key COLLATE \"C\" \
             ON CONFLICT (key) DO UPDATE SET tokens = EXCLUDED.tokens, updated = EXCLUDED.updated, \
                 full_at = EXCLUDED.full_at",
        )
        .bind(&taken.0)
        .bind(&taken.1)
        .bind(&taken.2)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(Ok(())))
    }
}

fn unavailable(err: sqlx::Error) -> BudgetError {
    BudgetError::Unavailable(format!("PostgreSQL: {err}"))
}

fn is_deadlock(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40P01")
}

#[async_trait]
impl Budgets for PgBudgets {
    async fn draw(&self, draws: &[Draw]) -> Result<Result<(), Duration>, BudgetError> {
        let mut tries = 0;
        loop {
            // The last try takes a vanished row as full (what it was).
            match self.try_draw(draws, tries == DEADLOCK_RETRIES).await {
                Ok(Some(drawn)) => return Ok(drawn),
                Ok(None) => tries += 1,
                Err(err) if is_deadlock(&err) && tries < DEADLOCK_RETRIES => tries += 1,
                Err(err) => return Err(unavailable(err)),
            }
        }
    }

    async fn refill(&self, budget: &chat_core::budgets::Budget) -> Result<(), BudgetError> {
        sqlx::query("DELETE FROM budgets WHERE key = $1")
            .bind(budget.key())
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn prune(&self) -> Result<usize, BudgetError> {
        let pruned = sqlx::query(
            "DELETE FROM budgets WHERE key IN ( \
                 SELECT key FROM budgets WHERE full_at <= extract(epoch FROM clock_timestamp()) \
                 FOR UPDATE SKIP LOCKED)",
        )
        .execute(&self.pool)
        .await
        .map_err(unavailable)?
        .rows_affected();
        Ok(pruned as usize)
    }
}
