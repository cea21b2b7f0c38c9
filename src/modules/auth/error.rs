use actix_web::http::StatusCode;

use crate::infra::db::DbError;
use crate::infra::http::Problem;
use crate::modules::users::UsersError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Validation(String),
    #[error("email is already registered")]
    EmailTaken,
    #[error("wrong email or password")]
    InvalidCredentials,
    #[error("missing or malformed bearer token")]
    MissingToken,
    #[error("token is invalid, expired or revoked")]
    InvalidToken,
    #[error("refresh token is invalid, expired or revoked")]
    InvalidRefreshToken,
    #[error("refresh token was already used; the session is revoked")]
    RefreshTokenReused,
    #[error("this refresh token is being exchanged by another request; retry")]
    RefreshInProgress,
    #[error("admin role required")]
    AdminOnly,
    #[error("not your resource")]
    NotOwner,
    #[error("auth configuration: {0}")]
    Config(&'static str),
    #[error("token signing: {0}")]
    Token(String),
    #[error("password hashing: {0}")]
    Hashing(String),
    #[error(transparent)]
    Users(#[from] UsersError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

impl From<diesel::result::Error> for AuthError {
    fn from(e: diesel::result::Error) -> Self {
        AuthError::Db(e.into())
    }
}

impl From<AuthError> for Problem {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Validation(detail) => Problem::validation(detail),
            AuthError::EmailTaken => Problem::conflict("email_taken", e.to_string()),
            AuthError::InvalidCredentials => Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                e.to_string(),
            ),
            AuthError::MissingToken
            | AuthError::InvalidToken
            | AuthError::InvalidRefreshToken
            | AuthError::RefreshTokenReused => Problem::unauthorized(e.to_string()),
            AuthError::AdminOnly | AuthError::NotOwner => Problem::forbidden(),
            AuthError::RefreshInProgress => Problem::conflict("request_in_progress", e.to_string()),
            AuthError::Config(_) | AuthError::Token(_) | AuthError::Hashing(_) => {
                Problem::internal(&e)
            }
            AuthError::Users(e) => e.into(),
            AuthError::Db(e) => e.into(),
            AuthError::Redis(e) => e.into(),
        }
    }
}
