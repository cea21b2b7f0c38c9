//! The business domains. Each module's `mod.rs` is its public API; modules call one another
//! only through it, in process.

pub mod auth;
pub mod notifications;
pub mod orders;
pub mod products;
pub mod stock;
pub mod users;
