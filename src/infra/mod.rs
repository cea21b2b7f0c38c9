//! Infrastructure adapters: databases, Redis, RabbitMQ, telemetry and HTTP plumbing.
//! Modules depend on these; these never depend on modules.

pub mod amqp;
pub mod db;
pub mod events;
pub mod http;
pub mod metrics;
pub mod redis;
pub mod telemetry;
