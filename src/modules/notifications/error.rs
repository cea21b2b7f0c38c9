use crate::infra::amqp::PublishError;
use crate::infra::http::Problem;
use crate::modules::users::UsersError;

#[derive(Debug, thiserror::Error)]
pub enum NotificationsError {
    #[error("{0}")]
    Validation(String),
    #[error("notification queue: {0}")]
    Queue(String),
    #[error("corrupt notification data: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Users(#[from] UsersError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

impl From<lapin::Error> for NotificationsError {
    fn from(e: lapin::Error) -> Self {
        NotificationsError::Queue(e.to_string())
    }
}

impl From<PublishError> for NotificationsError {
    fn from(e: PublishError) -> Self {
        NotificationsError::Queue(e.to_string())
    }
}

impl From<NotificationsError> for Problem {
    fn from(e: NotificationsError) -> Self {
        match e {
            NotificationsError::Validation(detail) => Problem::validation(detail),
            NotificationsError::Queue(_) => Problem::unavailable(&e),
            NotificationsError::Corrupt(_) => Problem::internal(&e),
            NotificationsError::Users(e) => e.into(),
            NotificationsError::Redis(e) => e.into(),
        }
    }
}
