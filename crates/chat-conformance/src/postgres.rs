//! A PostgreSQL schema of its own for each test, on the server named by
//! `CHAT_TEST_DATABASE_URL` (which `.ci/run` starts and sets).
//!
//! Without the variable the PostgreSQL tests cannot run: [`TestDatabase::create`]
//! says so loudly on stderr and returns `None` (the test then returns), unless
//! `CI` is set, where a skipped test is a failure. Each test gets a fresh
//! schema (a `search_path` in its URL), dropped when the handle is dropped,
//! so tests run in parallel on one database without seeing each other.

use sqlx::Connection;

/// The variable that names the test server.
pub const URL_VARIABLE: &str = "CHAT_TEST_DATABASE_URL";

/// A fresh schema on the test server; dropped (with everything in it) when
/// this is.
pub struct TestDatabase {
    base: String,
    schema: String,
    /// The URL a store connects to: the server's, with this schema first
    /// on the search path.
    pub url: String,
}

impl std::fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDatabase")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl TestDatabase {
    /// A new schema for `test` (named in the skip message), or `None` if no
    /// test server is configured and this is not CI.
    pub async fn create(test: &str) -> Option<Self> {
        let Ok(base) = std::env::var(URL_VARIABLE) else {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: {URL_VARIABLE} is not set, and CI must run the PostgreSQL tests");
            }
            // Straight to the process's stderr: the test harness would
            // swallow `eprintln!` from a test that passes.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: set {URL_VARIABLE} (e.g. postgres://chat:chat@127.0.0.1/chat_test) \
                 to run the PostgreSQL tests"
            );
            return None;
        };
        let schema = format!("t_{:016x}", rand::random::<u64>());
        let mut admin = sqlx::PgConnection::connect(&base)
            .await
            .unwrap_or_else(|err| panic!("{test}: cannot connect to {URL_VARIABLE}: {err}"));
        // The name is ours: `t_` and hexadecimal digits.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|err| panic!("{test}: cannot create a schema: {err}"));
        let _ = admin.close().await;
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        Some(Self { base, schema, url })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (base, schema) = (self.base.clone(), self.schema.clone());
        // On a thread of its own: a drop cannot await, and may run inside a
        // runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&base).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE"
                )))
                .execute(&mut admin)
                .await
                .ok()?;
                admin.close().await.ok()
            })
        });
        let _ = dropped.join();
    }
}
