//! The global email directory: email -> user id, the one place email uniqueness is decided.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use super::error::AuthError;
use crate::infra::db::Databases;

diesel::table! {
    email_directory (email) {
        email -> Text,
        user_id -> Uuid,
    }
}

/// Claims `email` for `user_id`; false when another user holds it. Two racing claims of
/// one email: the primary key lets exactly one through.
pub async fn claim_email(db: &Databases, email: &str, user_id: Uuid) -> Result<bool, AuthError> {
    let mut conn = db.global().write_conn().await?;
    let inserted = diesel::insert_into(email_directory::table)
        .values((
            email_directory::email.eq(email),
            email_directory::user_id.eq(user_id),
        ))
        .on_conflict_do_nothing()
        .execute(&mut conn)
        .await?;
    Ok(inserted == 1)
}

/// Undoes a claim whose user row could not be written.
pub async fn release_email(db: &Databases, email: &str, user_id: Uuid) -> Result<(), AuthError> {
    let mut conn = db.global().write_conn().await?;
    diesel::delete(
        email_directory::table
            .filter(email_directory::email.eq(email))
            .filter(email_directory::user_id.eq(user_id)),
    )
    .execute(&mut conn)
    .await?;
    Ok(())
}

pub async fn user_id_for_email(db: &Databases, email: &str) -> Result<Option<Uuid>, AuthError> {
    // The primary: a login right after registering must find the new address.
    let mut conn = db.global().write_conn().await?;
    Ok(email_directory::table
        .find(email)
        .select(email_directory::user_id)
        .first(&mut conn)
        .await
        .optional()?)
}

/// Bulk claim for seeding; emails already claimed are skipped.
pub async fn claim_emails(db: &Databases, claims: &[(String, Uuid)]) -> Result<usize, AuthError> {
    let rows: Vec<_> = claims
        .iter()
        .map(|(email, id)| {
            (
                email_directory::email.eq(email.as_str()),
                email_directory::user_id.eq(*id),
            )
        })
        .collect();
    let mut conn = db.global().write_conn().await?;
    Ok(diesel::insert_into(email_directory::table)
        .values(&rows)
        .on_conflict_do_nothing()
        .execute(&mut conn)
        .await?)
}
