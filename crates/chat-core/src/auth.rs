//! Passwords: what a valid one is, how it is stored (argon2id PHC strings,
//! hashed off the async workers with a bound on how many at once), and how
//! failed attempts are throttled.
//!
//! A password never leaves this module except as its hash: [`Password`]'s
//! `Debug` prints no text, errors never quote it, and nothing here logs it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use argon2::password_hash::PasswordHasher;
use argon2::{Algorithm, Argon2, Params, PasswordVerifier, Version};
use tokio::sync::{OnceCell, Semaphore};

use crate::error::ChatError;
use crate::limits::{Bucket, Rate};
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
    /// Most hashes computed at once (default: the machine's cores), so a
    /// storm of logins cannot take every thread.
    pub max_concurrent: usize,
}

impl Default for HashingConfig {
    /// The OWASP recommendation for argon2id (19 MiB, 2 passes, 1 lane).
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
            max_concurrent: std::thread::available_parallelism().map_or(2, usize::from),
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
        let params = Params::new(memory_kib, iterations, parallelism, None).unwrap_or_default();
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
        let _permit = self.permits.acquire().await.map_err(|_| hashing_failed())?;
        let params = self.params.clone();
        let password = password.clone();
        tokio::task::spawn_blocking(move || {
            Self::argon2(params)
                .hash_password(password.as_bytes())
                .map(|hash| hash.to_string())
                .map_err(|_| hashing_failed())
        })
        .await
        .map_err(|_| hashing_failed())?
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
        let _permit = self.permits.acquire().await.map_err(|_| hashing_failed())?;
        let params = self.params.clone();
        let password = password.clone();
        let matched = tokio::task::spawn_blocking(move || {
            Self::argon2(params)
                .verify_password(password.as_bytes(), phc.as_str())
                .is_ok()
        })
        .await
        .map_err(|_| hashing_failed())?;
        Ok(real && matched)
    }

    async fn decoy(&self) -> Result<String, ChatError> {
        self.decoy
            .get_or_try_init(|| async {
                let random: [u8; 16] = rand_bytes();
                let text: String = random.iter().map(|b| format!("{b:02x}")).collect();
                self.hash(&Password(text)).await
            })
            .await
            .cloned()
    }
}

fn rand_bytes() -> [u8; 16] {
    // The decoy's password only has to be unguessable; the salt that
    // argon2 draws from the OS is random anyway.
    let mut bytes = [0u8; 16];
    let seed = std::collections::hash_map::RandomState::new();
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        use std::hash::BuildHasher;
        chunk.copy_from_slice(&seed.hash_one(i).to_le_bytes());
    }
    bytes
}

fn hashing_failed() -> ChatError {
    ChatError::StoreUnavailable("password hashing failed".into())
}

/// Failed-attempt budgets: per account and per peer address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleConfig {
    /// Failed attempts one account may take (default: 5 at once, then one
    /// a minute).
    pub per_account: Rate,
    /// Failed attempts one peer address may make, over all accounts
    /// (default: 20 at once, then ten a minute).
    pub per_address: Rate,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            per_account: Rate::per_minute(5, 1.0),
            per_address: Rate::per_minute(20, 10.0),
        }
    }
}

/// Throttles failed password attempts: an attempt is refused without
/// being checked while the account's or the address's budget is spent.
#[derive(Debug)]
pub(crate) struct Throttle {
    config: ThrottleConfig,
    accounts: Mutex<HashMap<Username, Bucket>>,
    addresses: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Throttle {
    pub(crate) fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            accounts: Mutex::default(),
            addresses: Mutex::default(),
        }
    }

    /// Whether an attempt on `account` from `peer` may be checked now.
    pub(crate) fn allow(&self, account: &Username, peer: Option<IpAddr>) -> Result<(), ChatError> {
        let refused = |retry_after| ChatError::TooManyAttempts { retry_after };
        if let Ok(mut accounts) = self.accounts.lock()
            && let Some(bucket) = accounts.get_mut(account)
        {
            bucket.peek(self.config.per_account).map_err(refused)?;
        }
        if let (Some(peer), Ok(mut addresses)) = (peer, self.addresses.lock())
            && let Some(bucket) = addresses.get_mut(&peer)
        {
            bucket.peek(self.config.per_address).map_err(refused)?;
        }
        Ok(())
    }

    /// An attempt failed: it costs both budgets.
    pub(crate) fn failed(&self, account: &Username, peer: Option<IpAddr>) {
        let rate = self.config.per_account;
        if let Ok(mut accounts) = self.accounts.lock() {
            let _ = accounts
                .entry(account.clone())
                .or_insert_with(|| Bucket::full(rate))
                .take(rate);
        }
        let rate = self.config.per_address;
        if let (Some(peer), Ok(mut addresses)) = (peer, self.addresses.lock()) {
            let _ = addresses
                .entry(peer)
                .or_insert_with(|| Bucket::full(rate))
                .take(rate);
        }
    }

    /// An attempt succeeded: the account's budget is whole again (its
    /// owner knows the password); the address's is not.
    pub(crate) fn succeeded(&self, account: &Username) {
        if let Ok(mut accounts) = self.accounts.lock() {
            accounts.remove(account);
        }
    }

    /// Forgets budgets that have refilled; returns how many.
    pub(crate) fn prune(&self) -> usize {
        let mut pruned = 0;
        if let Ok(mut accounts) = self.accounts.lock() {
            let before = accounts.len();
            accounts.retain(|_, b| !b.is_full(self.config.per_account));
            pruned += before - accounts.len();
        }
        if let Ok(mut addresses) = self.addresses.lock() {
            let before = addresses.len();
            addresses.retain(|_, b| !b.is_full(self.config.per_address));
            pruned += before - addresses.len();
        }
        pruned
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
