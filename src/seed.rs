//! `flashsale seed`: generated data for demos and benchmarks. User ids derive from their
//! emails, so a rerun finds the same users and adds only what is missing.

use bigdecimal::BigDecimal;
use chrono::{Duration, Utc};
use uuid::Uuid;

use crate::app::AppState;
use crate::modules::{auth, products, users};

const BATCH: u64 = 1_000;
/// Rows per multi-row INSERT of products (13 columns; PostgreSQL allows 65,535 binds).
const PRODUCT_BATCH: u64 = 4_000;
const CATEGORIES: u64 = 200;
const BRANDS: [&str; 16] = [
    "Acme",
    "Northwind",
    "Contoso",
    "Globex",
    "Initech",
    "Umbrella Co",
    "Hooli",
    "Vandelay",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
    "Aperture",
    "Massive Dynamic",
    "Oscorp",
];
const ADJECTIVES: [&str; 24] = [
    "Compact",
    "Wireless",
    "Organic",
    "Ergonomic",
    "Vintage",
    "Smart",
    "Portable",
    "Classic",
    "Premium",
    "Rugged",
    "Silent",
    "Foldable",
    "Waterproof",
    "Lightweight",
    "Heated",
    "Solar",
    "Modular",
    "Magnetic",
    "Insulated",
    "Adjustable",
    "Cordless",
    "Ceramic",
    "Bamboo",
    "Titanium",
];
const NOUNS: [&str; 60] = [
    "Headphones",
    "Backpack",
    "Coffee Grinder",
    "Desk Lamp",
    "Sneakers",
    "Blender",
    "Keyboard",
    "Water Bottle",
    "Tent",
    "Watch",
    "Speaker",
    "Jacket",
    "Monitor",
    "Mouse",
    "Kettle",
    "Toaster",
    "Sleeping Bag",
    "Hiking Boots",
    "Sunglasses",
    "Umbrella",
    "Wallet",
    "Suitcase",
    "Drone",
    "Camera",
    "Tripod",
    "Router",
    "Charger",
    "Power Bank",
    "Earbuds",
    "Fitness Tracker",
    "Yoga Mat",
    "Dumbbell",
    "Bicycle Helmet",
    "Scooter",
    "Skillet",
    "Cookware Set",
    "Knife Set",
    "Cutting Board",
    "Air Fryer",
    "Rice Cooker",
    "Vacuum Cleaner",
    "Air Purifier",
    "Humidifier",
    "Space Heater",
    "Desk Chair",
    "Standing Desk",
    "Bookshelf",
    "Lamp Shade",
    "Pillow",
    "Duvet",
    "Towel Set",
    "Shower Head",
    "Toothbrush",
    "Hair Dryer",
    "Shaver",
    "Perfume",
    "Notebook",
    "Fountain Pen",
    "Board Game",
    "Guitar",
];
/// Every seeded user signs in with this password; printed by the command.
pub const SEED_PASSWORD: &str = "flashsale-seed-password";
const SEED_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_2b5e_7c3a_4e8f_9a0b_1c2d_3e4f_5a6b);

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Users(#[from] users::UsersError),
    #[error(transparent)]
    Products(#[from] products::ProductsError),
}

pub fn seed_email(index: u64) -> String {
    format!("user{index}@seed.flashsale.test")
}

/// The id `seed` gives the user with `email`.
pub fn seed_user_id(email: &str) -> Uuid {
    Uuid::new_v5(&SEED_NAMESPACE, email.as_bytes())
}

/// Creates users `user0..user{count-1}@seed.flashsale.test`; answers how many were new.
/// `progress` hears how many are done after each batch.
pub async fn seed_users(
    state: &AppState,
    count: u64,
    progress: impl Fn(u64),
) -> Result<u64, SeedError> {
    let password_hash = auth::hash_password(state, SEED_PASSWORD).await?;
    let mut created = 0;
    let mut start = 0;
    while start < count {
        let end = (start + BATCH).min(count);
        let batch: Vec<users::NewUser> = (start..end)
            .map(|i| {
                let email = seed_email(i);
                users::NewUser {
                    id: seed_user_id(&email),
                    email,
                    password_hash: password_hash.clone(),
                    full_name: Some(format!("Seed User {i}")),
                    phone: None,
                }
            })
            .collect();
        let claims: Vec<(String, Uuid)> = batch.iter().map(|u| (u.email.clone(), u.id)).collect();
        auth::claim_emails(state, &claims).await?;
        created += users::create_many(state, &batch).await? as u64;
        start = end;
        progress(end);
    }
    Ok(created)
}

/// The id `seed` gives product number `index`.
pub fn seed_product_id(index: u64) -> Uuid {
    Uuid::new_v5(&SEED_NAMESPACE, format!("product-{index}").as_bytes())
}

/// Product number `index`: varied names, categories and prices, all derived from the index
/// so a rerun produces the same catalogue. The first `flash_sales` are on sale now (until
/// two hours from now).
fn seed_product(index: u64, flash_sales: u64) -> products::Product {
    let now = Utc::now();
    // The index read in mixed radix: every brand x adjective x noun combination occurs.
    let brand = BRANDS[(index % BRANDS.len() as u64) as usize];
    let rest = index / BRANDS.len() as u64;
    let adjective = ADJECTIVES[(rest % ADJECTIVES.len() as u64) as usize];
    let noun = NOUNS[((rest / ADJECTIVES.len() as u64) % NOUNS.len() as u64) as usize];
    let cents = 499 + (index * 7919) % 50_000;
    let price = BigDecimal::new(cents.into(), 2);
    let on_sale = index < flash_sales;
    products::Product {
        id: seed_product_id(index),
        name: format!("{brand} {adjective} {noun} {index}"),
        description: format!(
            "The {} {} from {brand}, model {index}, seeded for demos and benchmarks.",
            adjective.to_lowercase(),
            noun.to_lowercase()
        ),
        price: price.clone(),
        inventory: 100 + (index % 900) as i32,
        category_id: Some(Uuid::new_v5(
            &SEED_NAMESPACE,
            format!("category-{}", index % CATEGORIES).as_bytes(),
        )),
        is_flash_sale: on_sale,
        flash_sale_price: on_sale.then(|| (price / BigDecimal::from(2)).with_scale(2)),
        flash_sale_start: on_sale.then(|| now - Duration::minutes(1)),
        flash_sale_end: on_sale.then(|| now + Duration::hours(2)),
        created_at: now,
        updated_at: now,
    }
}

/// Creates products 0..count (the first `flash_sales` on sale now); answers how many were
/// new. `progress` hears how many are done after each batch.
pub async fn seed_products(
    state: &AppState,
    count: u64,
    flash_sales: u64,
    progress: impl Fn(u64),
) -> Result<u64, SeedError> {
    let mut created = 0;
    let mut start = 0;
    while start < count {
        let end = (start + PRODUCT_BATCH).min(count);
        let batch: Vec<products::Product> =
            (start..end).map(|i| seed_product(i, flash_sales)).collect();
        created += products::create_many(state, &batch).await? as u64;
        start = end;
        progress(end);
    }
    Ok(created)
}
