use crate::infra::db::DbError;
use crate::infra::http::Problem;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("user not found")]
    NotFound,
    #[error("{0}")]
    Validation(String),
    #[error("address limit of {0} reached")]
    AddressLimit(i64),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

impl From<diesel::result::Error> for UsersError {
    fn from(e: diesel::result::Error) -> Self {
        UsersError::Db(e.into())
    }
}

impl From<UsersError> for Problem {
    fn from(e: UsersError) -> Self {
        match e {
            UsersError::NotFound => Problem::not_found("user"),
            UsersError::Validation(detail) => Problem::validation(detail),
            UsersError::AddressLimit(_) => Problem::validation(e.to_string()),
            UsersError::Corrupt(_) => Problem::internal(&e),
            UsersError::Db(e) => e.into(),
            UsersError::Redis(e) => e.into(),
        }
    }
}
