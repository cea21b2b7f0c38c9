//! The live invariant auditor (worker role; one replica per interval, through a Redis
//! lease). Per live sale it checks, and exports as `inventory_invariant_violations`
//! (units off; 0 when healthy):
//! - Redis: available + reserved + committed == the units the sale holds, and no buyer
//!   above the purchase limit (one script, so nothing moves while it counts);
//! - PostgreSQL: the on-hand count == the count at load plus every ledger row since.

use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use super::{books_off, due_sales, ProductsError, SaleState};
use crate::app::AppState;

/// One sale's findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaleFindings {
    pub product: Uuid,
    /// Units Redis holds beyond (or short of) what the sale holds.
    pub redis_units_off: i64,
    /// Buyers above the purchase limit.
    pub buyers_over_limit: i64,
    /// Units the on-hand count is off the ledger.
    pub books_units_off: i64,
}

impl SaleFindings {
    /// What the gauge shows: every unit off, and every buyer over the limit, counted once.
    pub fn violations(&self) -> i64 {
        self.redis_units_off.abs() + self.buyers_over_limit + self.books_units_off.abs()
    }
}

pub async fn run(state: AppState) {
    let interval_secs = state.settings.sales.audit_interval_secs;
    let mut tick = tokio::time::interval(Duration::from_secs(interval_secs));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        let lease_ms = (interval_secs * 1000).saturating_sub(100);
        if !state.redis.take_lease("auditor", lease_ms).await {
            continue;
        }
        match audit_once(&state).await {
            Ok(findings) => {
                for sale in findings.iter().filter(|f| f.violations() != 0) {
                    tracing::error!(?sale, "inventory invariant violated");
                }
            }
            Err(e) => tracing::warn!(error = %e, "inventory audit failed"),
        }
    }
}

/// One pass over every sale on now; records the gauges and the run.
pub async fn audit_once(state: &AppState) -> Result<Vec<SaleFindings>, ProductsError> {
    let now = Utc::now();
    let live: Vec<Uuid> = due_sales(state)
        .await?
        .iter()
        .filter(|p| p.sale_window().is_some_and(|(start, _)| start <= now))
        .map(|p| p.id)
        .collect();
    let books: std::collections::HashMap<Uuid, i64> =
        books_off(state, &live).await?.into_iter().collect();
    let mut findings = Vec::with_capacity(live.len());
    for product in live {
        let audit = state.products.stock.audit(&state.redis, product).await?;
        // A sale being rebuilt has no settled books in Redis yet: only the ledger counts.
        let redis_checked = audit.state == SaleState::Open;
        let found = SaleFindings {
            product,
            redis_units_off: if redis_checked { audit.units_off } else { 0 },
            buyers_over_limit: if redis_checked { audit.over_limit } else { 0 },
            books_units_off: books.get(&product).copied().unwrap_or(0),
        };
        metrics::gauge!("inventory_invariant_violations", "product_id" => product.to_string())
            .set(found.violations() as f64);
        findings.push(found);
    }
    metrics::counter!("inventory_audit_runs_total").increment(1);
    Ok(findings)
}
