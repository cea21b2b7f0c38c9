//! Shared pieces of the load generators: latency histograms and their report, the sale
//! they buy from.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies (microseconds, 1 µs .. 60 s, 3 significant digits) and status counts.
pub struct Recorder {
    latencies: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            latencies: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("valid histogram bounds"),
            statuses: BTreeMap::new(),
            errors: 0,
        }
    }
}

impl Recorder {
    pub fn record(&mut self, latency: Duration, status: Option<u16>) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latencies.saturating_record(micros.max(1));
        match status {
            Some(code) => *self.statuses.entry(code).or_default() += 1,
            None => self.errors += 1,
        }
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.latencies
            .add(&other.latencies)
            .expect("same histogram bounds");
        for (code, n) in &other.statuses {
            *self.statuses.entry(*code).or_default() += n;
        }
        self.errors += other.errors;
    }

    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    pub fn report(&self, elapsed: Duration) -> String {
        let ms = |q: f64| self.latencies.value_at_quantile(q) as f64 / 1000.0;
        let total = self.latencies.len();
        format!(
            "requests {total} in {:.2}s = {:.0}/s | latency ms p50 {:.2} p95 {:.2} p99 {:.2} max {:.2} | statuses {:?} transport errors {}",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64(),
            ms(0.50),
            ms(0.95),
            ms(0.99),
            self.latencies.max() as f64 / 1000.0,
            self.statuses,
            self.errors,
        )
    }
}

/// Creates a product on flash sale now (for two hours) with `stock` units, as an admin whose
/// token is minted with the server's signing key.
pub async fn create_flash_sale(
    client: &reqwest::Client,
    base_url: &str,
    stock: i64,
    keys: &flashsale::modules::auth::TokenKeys,
) -> uuid::Uuid {
    let now = chrono::Utc::now();
    let body = serde_json::json!({
        "name": "Load-test gadget", "price": "99.00", "inventory": stock, "is_flash_sale": true,
        "flash_sale_price": "9.99", "flash_sale_start": now - chrono::Duration::seconds(5),
        "flash_sale_end": now + chrono::Duration::hours(2),
    });
    create_product(client, base_url, keys, &body).await
}

/// Creates a product sold only through regular orders, with `stock` units.
pub async fn create_regular_product(
    client: &reqwest::Client,
    base_url: &str,
    stock: i64,
    keys: &flashsale::modules::auth::TokenKeys,
) -> uuid::Uuid {
    let body = serde_json::json!({
        "name": "Load-test staple", "price": "9.99", "inventory": stock,
    });
    create_product(client, base_url, keys, &body).await
}

async fn create_product(
    client: &reqwest::Client,
    base_url: &str,
    keys: &flashsale::modules::auth::TokenKeys,
    body: &serde_json::Value,
) -> uuid::Uuid {
    use flashsale::modules::users::Role;
    let admin = keys
        .issue(uuid::Uuid::now_v7(), Role::Admin, uuid::Uuid::new_v4())
        .expect("admin token");
    let res = client
        .post(format!("{base_url}/products"))
        .bearer_auth(admin)
        .json(body)
        .send()
        .await
        .expect("create product");
    assert_eq!(res.status(), 201, "create product: {:?}", res.text().await);
    let product: serde_json::Value = res.json().await.expect("product body");
    product["id"].as_str().expect("id").parse().expect("uuid")
}
