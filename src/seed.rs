//! `flashsale seed`: generated data for demos and benchmarks. User ids derive from their
//! emails, so a rerun finds the same users and adds only what is missing.

use uuid::Uuid;

use crate::app::AppState;
use crate::modules::{auth, users};

const BATCH: u64 = 1_000;
/// Every seeded user signs in with this password; printed by the command.
pub const SEED_PASSWORD: &str = "flashsale-seed-password";
const SEED_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_2b5e_7c3a_4e8f_9a0b_1c2d_3e4f_5a6b);

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Users(#[from] users::UsersError),
}

pub fn seed_email(index: u64) -> String {
    format!("user{index}@seed.flashsale.test")
}

/// The id `seed` gives the user with `email`.
pub fn seed_user_id(email: &str) -> Uuid {
    Uuid::new_v5(&SEED_NAMESPACE, email.as_bytes())
}

/// Creates users `user0..user{count-1}@seed.flashsale.test`; answers how many were new.
pub async fn seed_users(state: &AppState, count: u64) -> Result<u64, SeedError> {
    let password_hash = auth::hash_password(state, SEED_PASSWORD).await?;
    let mut created = 0;
    let mut start = 0;
    while start < count {
        let end = (start + BATCH).min(count);
        let batch: Vec<users::NewUser> = (start..end)
            .map(|i| {
                let email = seed_email(i);
                users::NewUser {
                    id: seed_user_id(&email),
                    email,
                    password_hash: password_hash.clone(),
                    full_name: Some(format!("Seed User {i}")),
                    phone: None,
                }
            })
            .collect();
        let claims: Vec<(String, Uuid)> = batch.iter().map(|u| (u.email.clone(), u.id)).collect();
        auth::claim_emails(state, &claims).await?;
        created += users::create_many(state, &batch).await? as u64;
        start = end;
        tracing::info!(done = end, total = count, "seeding users");
    }
    Ok(created)
}
