//! flashsale: a flash-sale e-commerce platform in one binary, started in a role.
//! See README.md for the architecture; `main.rs` is the command line.

pub mod app;
pub mod config;
pub mod infra;
pub mod modules;
pub mod ops;
pub mod roles;
pub mod seed;
