//! Password hashing with argon2id on the blocking pool, bounded so a burst of logins cannot
//! take all memory (each hash holds `memory_kib`) or starve the async workers.

use std::sync::Arc;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use super::error::AuthError;
use crate::config::Argon2Settings;

pub struct PasswordHasher {
    argon: Argon2<'static>,
    permits: Arc<Semaphore>,
    /// Verified against when the email is unknown, so both answers take the same time.
    dummy_hash: String,
}

impl PasswordHasher {
    pub fn new(settings: &Argon2Settings) -> Result<Self, AuthError> {
        let params = Params::new(
            settings.memory_kib,
            settings.iterations,
            settings.parallelism,
            None,
        )
        .map_err(|_| AuthError::Config("auth.argon2 parameters are out of range"))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let dummy_hash = hash_with(&argon, "flashsale-dummy-password")?;
        Ok(Self {
            argon,
            permits: Arc::new(Semaphore::new(settings.max_concurrent)),
            dummy_hash,
        })
    }

    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        let argon = self.argon.clone();
        self.run_blocking(move || hash_with(&argon, &password))
            .await?
    }

    /// Checks `password` against `stored`, or against the dummy hash when there is no user,
    /// so an unknown email costs as much as a wrong password.
    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, AuthError> {
        let argon = self.argon.clone();
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| self.dummy_hash.clone());
        let matched = self
            .run_blocking(move || {
                PasswordHash::new(&hash)
                    .map(|parsed| argon.verify_password(password.as_bytes(), &parsed).is_ok())
                    .unwrap_or(false)
            })
            .await?;
        Ok(known && matched)
    }

    async fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| AuthError::Config("password hasher closed"))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| AuthError::Hashing(e.to_string()))
    }
}

fn hash_with(argon: &Argon2<'static>, password: &str) -> Result<String, AuthError> {
    argon
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Hashing(e.to_string()))
}
