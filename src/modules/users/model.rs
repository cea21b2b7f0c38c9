use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::UsersError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
        }
    }

    pub(crate) fn parse(value: &str) -> Result<Self, UsersError> {
        match value {
            "customer" => Ok(Role::Customer),
            "admin" => Ok(Role::Admin),
            other => Err(UsersError::Corrupt(format!("unknown role `{other}`"))),
        }
    }
}

/// A user's profile as clients see it (and as it is cached).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub full_name: Option<String>,
    pub phone: Option<String>,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What registration stores; the password is already hashed.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub id: Uuid,
    pub email: String,
    pub password_hash: String,
    pub full_name: Option<String>,
    pub phone: Option<String>,
}

/// What login needs to check a password and mint a token.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub password_hash: String,
    pub role: Role,
}

/// `PUT /users/{id}`: omitted fields stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    pub full_name: Option<String>,
    pub phone: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Address {
    pub id: Uuid,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub country: String,
    pub is_default: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAddress {
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 code, e.g. "DE".
    pub country: String,
    #[serde(default)]
    pub is_default: bool,
}

const MAX_NAME_CHARS: usize = 200;
const MAX_PHONE_CHARS: usize = 32;
const MAX_LINE_CHARS: usize = 200;
const MAX_POSTAL_CHARS: usize = 20;

/// Checks an optional free-text field: trimmed, non-empty, at most `max` characters.
pub(crate) fn check_text(field: &str, value: &str, max: usize) -> Result<(), UsersError> {
    let chars = value.trim().chars().count();
    if chars == 0 || chars > max {
        return Err(UsersError::Validation(format!(
            "{field} must be 1 to {max} characters"
        )));
    }
    Ok(())
}

pub(crate) fn check_name(value: &str) -> Result<(), UsersError> {
    check_text("full_name", value, MAX_NAME_CHARS)
}

pub(crate) fn check_phone(value: &str) -> Result<(), UsersError> {
    check_text("phone", value, MAX_PHONE_CHARS)?;
    let valid = value
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '(' | ')'));
    if !valid {
        return Err(UsersError::Validation(
            "phone may hold digits, spaces and + - ( ) only".into(),
        ));
    }
    Ok(())
}

impl UpdateUser {
    pub(crate) fn validate(&self) -> Result<(), UsersError> {
        if let Some(name) = &self.full_name {
            check_name(name)?;
        }
        if let Some(phone) = &self.phone {
            check_phone(phone)?;
        }
        Ok(())
    }
}

impl NewAddress {
    pub(crate) fn validate(&self) -> Result<(), UsersError> {
        check_text("line1", &self.line1, MAX_LINE_CHARS)?;
        if let Some(line2) = &self.line2 {
            check_text("line2", line2, MAX_LINE_CHARS)?;
        }
        check_text("city", &self.city, MAX_LINE_CHARS)?;
        check_text("postal_code", &self.postal_code, MAX_POSTAL_CHARS)?;
        let country_ok =
            self.country.len() == 2 && self.country.bytes().all(|b| b.is_ascii_uppercase());
        if !country_ok {
            return Err(UsersError::Validation(
                "country must be an ISO 3166-1 alpha-2 code such as \"DE\"".into(),
            ));
        }
        Ok(())
    }
}
