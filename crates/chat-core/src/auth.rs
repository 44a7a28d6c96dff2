//! Passwords: what a valid one is, how it is stored (argon2id PHC strings,
//! hashed off the async workers with a bound on how many at once), and how
//! failed attempts are throttled.
//!
//! A password never leaves this module except as its hash: [`Password`]'s
//! `Debug` prints no text, errors never quote it, and nothing here logs it.

use std::net::IpAddr;
use std::sync::Arc;

use argon2::password_hash::PasswordHasher;
use argon2::{Algorithm, Argon2, Params, PasswordVerifier, Version};
use tokio::sync::{OnceCell, Semaphore};

use crate::budgets::{Budget, Budgets, Draw};
use crate::error::ChatError;
use crate::limits::Rate;
use crate::types::Username;

/// Fewest Unicode scalar values a password may have.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Most Unicode scalar values a password may have.
pub const MAX_PASSWORD_CHARS: usize = 256;

/// A password that meets the rules: [`MIN_PASSWORD_CHARS`] to
/// [`MAX_PASSWORD_CHARS`] Unicode scalar values, no control characters.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Checks `raw` against the rules; the error never contains the text.
    pub fn parse(raw: &str) -> Result<Self, ChatError> {
        let count = raw.chars().count();
        if count < MIN_PASSWORD_CHARS {
            return Err(ChatError::InvalidPassword(format!(
                "a password has at least {MIN_PASSWORD_CHARS} characters"
            )));
        }
        if count > MAX_PASSWORD_CHARS {
            return Err(ChatError::InvalidPassword(format!(
                "a password has at most {MAX_PASSWORD_CHARS} characters"
            )));
        }
        if raw.chars().any(char::is_control) {
            return Err(ChatError::InvalidPassword(
                "a password cannot contain control characters".into(),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

/// How passwords are hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashingConfig {
    /// Argon2id memory cost, KiB (default 19,456: 19 MiB).
    pub memory_kib: u32,
    /// Argon2id passes over the memory (default 2).
    pub iterations: u32,
    /// Argon2id lanes (default 1).
    pub parallelism: u32,
    /// Most hashes computed at once (default: one less than the machine's
    /// cores, at least one), so a storm of logins cannot take every thread.
    pub max_concurrent: usize,
}

impl Default for HashingConfig {
    /// The OWASP recommendation for argon2id (19 MiB, 2 passes, 1 lane).
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
            // Leave a core to the async workers, so a storm of logins cannot
            // take every thread that delivers messages.
            max_concurrent: std::thread::available_parallelism()
                .map_or(1, |n| usize::from(n).saturating_sub(1).max(1)),
        }
    }
}

impl HashingConfig {
    /// The cheapest parameters argon2 allows: for tests only, never for
    /// stored passwords anyone cares about.
    pub fn cheap_for_tests() -> Self {
        Self {
            memory_kib: 8,
            iterations: 1,
            parallelism: 1,
            max_concurrent: 4,
        }
    }
}

/// Hashes and verifies passwords on the blocking pool, a bounded number at
/// once.
#[derive(Debug, Clone)]
pub(crate) struct Hashing {
    params: Params,
    permits: Arc<Semaphore>,
    /// A hash of nothing anyone knows, verified against when an account
    /// does not exist, so that a login for a missing name costs what a
    /// wrong password does.
    decoy: Arc<OnceCell<String>>,
}

impl Hashing {
    /// Hashing with `config`, raised to argon2's minimums where it is below
    /// them (at least one pass and one lane, 8 KiB of memory per lane).
    pub(crate) fn new(config: HashingConfig) -> Self {
        let parallelism = config.parallelism.clamp(1, 0x00FF_FFFF);
        let iterations = config.iterations.max(1);
        let memory_kib = config.memory_kib.max(8 * parallelism);
        let params = Params::new(memory_kib, iterations, parallelism, None).unwrap_or_else(|err| {
            tracing::warn!(%err, "argon2 refuses these parameters; using its defaults");
            Params::default()
        });
        Self {
            params,
            permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            decoy: Arc::default(),
        }
    }

    fn argon2(params: Params) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }

    /// The PHC string of `password`, with a fresh random salt.
    pub(crate) async fn hash(&self, password: &Password) -> Result<String, ChatError> {
        let password = password.clone();
        self.on_pool(move |argon2| {
            argon2
                .hash_password(password.as_bytes())
                .map(|hash| hash.to_string())
                .map_err(|_| hashing_failed())
        })
        .await?
    }

    /// Whether `password` matches `stored`; with no stored hash (no such
    /// account, or one without a password), it verifies against a decoy
    /// and answers `false`, in the same time.
    pub(crate) async fn verify(
        &self,
        password: &Password,
        stored: Option<&str>,
    ) -> Result<bool, ChatError> {
        let (phc, real) = match stored {
            Some(phc) => (phc.to_owned(), true),
            None => (self.decoy().await?, false),
        };
        let password = password.clone();
        let matched = self
            .on_pool(move |argon2| {
                argon2
                    .verify_password(password.as_bytes(), phc.as_str())
                    .is_ok()
            })
            .await?;
        Ok(real && matched)
    }

    /// Runs `work` with this configuration's hasher on the blocking pool,
    /// once one of the permits is free. The permit moves into the blocking
    /// task: a hash keeps its place until it is done, even if the caller
    /// stops waiting.
    async fn on_pool<T: Send + 'static>(
        &self,
        work: impl FnOnce(Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, ChatError> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| hashing_failed())?;
        let params = self.params.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(Self::argon2(params))
        })
        .await
        .map_err(|_| hashing_failed())
    }

    /// Computes the decoy now (at start), so that the first login for a
    /// missing name does not take two hashes' time.
    pub(crate) async fn prepare(&self) {
        let _ = self.decoy().await;
    }

    /// A hash with this configuration's parameters, for checks that have
    /// no real one. Its password does not matter: [`Hashing::verify`]
    /// answers `false` for a decoy whatever matched; only its cost must
    /// equal a real check's.
    async fn decoy(&self) -> Result<String, ChatError> {
        self.decoy
            .get_or_try_init(|| async {
                let decoy = Password("decoy password".into());
                self.hash(&decoy).await
            })
            .await
            .cloned()
    }
}

fn hashing_failed() -> ChatError {
    ChatError::StoreUnavailable("password hashing failed".into())
}

/// Password-check budgets: failures per account and per peer address, and
/// all checks per address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleConfig {
    /// Failed attempts one account may take (default: 5 at once, then one
    /// a minute).
    pub per_account: Rate,
    /// Failed attempts one peer address may make, over all accounts
    /// (default: 20 at once, then ten a minute).
    pub per_address: Rate,
    /// Password checks of any outcome one address may ask for (default:
    /// 100 at once, then 60 a minute): each costs a hash, so even correct
    /// passwords repeated cannot occupy the hashing threads.
    pub checks_per_address: Rate,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            per_account: Rate::per_minute(5, 1.0),
            per_address: Rate::per_minute(20, 10.0),
            checks_per_address: Rate::per_minute(100, 60.0),
        }
    }
}

/// Throttles password attempts, on budgets every engine on the store
/// shares (see [`crate::budgets`]). An attempt is charged to its account's
/// failure budget and its address's checks budget before it is checked (so
/// attempts made in parallel cannot all pass a budget that has room for
/// one), and a right password refills the account's failure budget; an
/// attempt is refused unchecked while a budget is spent.
pub(crate) struct Throttle {
    config: ThrottleConfig,
    budgets: Arc<dyn Budgets>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn too_many(retry_after: std::time::Duration) -> ChatError {
    ChatError::TooManyAttempts { retry_after }
}

impl Throttle {
    pub(crate) fn new(config: ThrottleConfig, budgets: Arc<dyn Budgets>) -> Self {
        Self { config, budgets }
    }

    /// Charges an attempt on `account` from `peer` (an address key, see
    /// [`crate::limits::address_key`]), or refuses it if a budget is spent.
    pub(crate) async fn charge(
        &self,
        account: &Username,
        peer: Option<IpAddr>,
    ) -> Result<(), ChatError> {
        let config = &self.config;
        // The account's failure budget and the address's checks budget are
        // charged now; the address's failures only once one is known (many
        // users behind one address may log in at once, and the checks
        // budget already bounds how fast that address can guess).
        let mut draws = vec![Draw::take(
            Budget::AccountFailures(account.clone()),
            config.per_account,
        )];
        if let Some(peer) = peer {
            draws.push(Draw::require(
                Budget::AddressFailures(peer),
                config.per_address,
            ));
            draws.push(Draw::take(
                Budget::AddressChecks(peer),
                config.checks_per_address,
            ));
        }
        self.budgets.draw(&draws).await?.map_err(too_many)
    }

    /// The attempt was wrong: it costs the address's failure budget too
    /// (nothing, if that is spent already).
    pub(crate) async fn failed(&self, peer: Option<IpAddr>) {
        let Some(peer) = peer else { return };
        let draw = Draw::take(Budget::AddressFailures(peer), self.config.per_address);
        if let Err(err) = self.budgets.draw(&[draw]).await {
            tracing::warn!(%err, "could not charge a failed password attempt");
        }
    }

    /// The attempt was right: the account's failure budget is whole again
    /// (its owner knows the password); the checks budget keeps the charge.
    pub(crate) async fn succeeded(&self, account: &Username) {
        let budget = Budget::AccountFailures(account.clone());
        if let Err(err) = self.budgets.refill(&budget).await {
            tracing::warn!(%err, "could not refill an account's password budget");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_follow_the_rules_and_never_show() {
        assert!(Password::parse("correct horse").is_ok());
        assert!(Password::parse(&"é".repeat(MAX_PASSWORD_CHARS)).is_ok());
        for bad in [
            "short",
            "",
            "tab\there!",
            &"x".repeat(MAX_PASSWORD_CHARS + 1),
        ] {
            let err = Password::parse(bad).unwrap_err();
            assert_eq!(err.code(), crate::ErrorCode::InvalidPassword);
            if !bad.is_empty() {
                assert!(!err.to_string().contains(bad), "{err}");
            }
        }
        let secret = Password::parse("hunter22hunter22").unwrap();
        assert!(!format!("{secret:?}").contains("hunter"));
    }

    #[tokio::test]
    async fn hashes_are_argon2id_and_verify() {
        let hashing = Hashing::new(HashingConfig::cheap_for_tests());
        let password = Password::parse("correct horse").unwrap();
        let phc = hashing.hash(&password).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{phc}");
        assert!(!phc.contains("correct"));
        assert!(hashing.verify(&password, Some(&phc)).await.unwrap());
        let wrong = Password::parse("incorrect horse").unwrap();
        assert!(!hashing.verify(&wrong, Some(&phc)).await.unwrap());
        assert!(
            !hashing.verify(&password, None).await.unwrap(),
            "no hash: no match"
        );
        let again = hashing.hash(&password).await.unwrap();
        assert_ne!(phc, again, "a fresh salt each time");
    }
}
