//! HTTP plumbing shared by every module: problem bodies, extractor configuration, request
//! middleware, client addresses, list paging and the per-IP limiter.

pub mod client_ip;
pub mod extract;
pub mod middleware;
pub mod paging;
pub mod problem;
pub mod rate_limit;

pub use problem::Problem;
