use crate::infra::db::DbError;
use crate::infra::http::Problem;

#[derive(Debug, thiserror::Error)]
pub enum ProductsError {
    #[error("product not found")]
    NotFound,
    #[error("{0}")]
    Validation(String),
    #[error("inventory cannot go below the {0} units already reserved")]
    BelowReserved(i64),
    #[error("catalogue read failed: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

impl From<diesel::result::Error> for ProductsError {
    fn from(e: diesel::result::Error) -> Self {
        ProductsError::Db(e.into())
    }
}

impl From<ProductsError> for Problem {
    fn from(e: ProductsError) -> Self {
        match e {
            ProductsError::NotFound => Problem::not_found("product"),
            ProductsError::Validation(detail) => Problem::validation(detail),
            ProductsError::BelowReserved(_) => {
                Problem::conflict("inventory_below_reserved", e.to_string())
            }
            ProductsError::Unavailable(_) => Problem::unavailable(&e),
            ProductsError::Db(e) => e.into(),
            ProductsError::Redis(e) => e.into(),
        }
    }
}
