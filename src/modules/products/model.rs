use bigdecimal::BigDecimal;
use chrono::{DateTime, Utc};
use diesel::{Insertable, Queryable, Selectable};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::ProductsError;

const MAX_NAME_CHARS: usize = 200;
const MAX_DESCRIPTION_CHARS: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::store::products)]
pub struct Product {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// Decimal string, e.g. "19.99".
    #[schema(value_type = String)]
    pub price: BigDecimal,
    /// Unsold units on hand.
    pub inventory: i32,
    pub category_id: Option<Uuid>,
    pub is_flash_sale: bool,
    #[schema(value_type = Option<String>)]
    pub flash_sale_price: Option<BigDecimal>,
    pub flash_sale_start: Option<DateTime<Utc>>,
    pub flash_sale_end: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Product {
    /// The sale window when this product is on flash sale.
    pub fn sale_window(&self) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        match (
            self.is_flash_sale,
            self.flash_sale_start,
            self.flash_sale_end,
        ) {
            (true, Some(start), Some(end)) => Some((start, end)),
            _ => None,
        }
    }
}

/// `POST /products`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[schema(value_type = String)]
    pub price: BigDecimal,
    pub inventory: i32,
    pub category_id: Option<Uuid>,
    #[serde(default)]
    pub is_flash_sale: bool,
    #[schema(value_type = Option<String>)]
    pub flash_sale_price: Option<BigDecimal>,
    pub flash_sale_start: Option<DateTime<Utc>>,
    pub flash_sale_end: Option<DateTime<Utc>>,
}

/// `PATCH /products/{id}`: fields present are set, fields absent stay.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    #[schema(value_type = Option<String>)]
    pub price: Option<BigDecimal>,
    pub category_id: Option<Uuid>,
    pub is_flash_sale: Option<bool>,
    #[schema(value_type = Option<String>)]
    pub flash_sale_price: Option<BigDecimal>,
    pub flash_sale_start: Option<DateTime<Utc>>,
    pub flash_sale_end: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryUpdate {
    pub inventory: i32,
}

/// A product on flash sale with its live remaining stock.
#[derive(Debug, Serialize, ToSchema)]
pub struct FlashSaleItem {
    #[serde(flatten)]
    pub product: Product,
    /// Units neither reserved nor sold.
    pub remaining: i64,
    /// "upcoming" or "active".
    pub sale_status: &'static str,
}

impl NewProduct {
    pub(crate) fn into_product(self, id: Uuid, now: DateTime<Utc>) -> Product {
        Product {
            id,
            name: self.name.trim().to_owned(),
            description: self.description,
            price: self.price,
            inventory: self.inventory,
            category_id: self.category_id,
            is_flash_sale: self.is_flash_sale,
            flash_sale_price: self.flash_sale_price,
            flash_sale_start: self.flash_sale_start,
            flash_sale_end: self.flash_sale_end,
            created_at: now,
            updated_at: now,
        }
    }
}

impl ProductPatch {
    pub(crate) fn apply(self, mut product: Product, now: DateTime<Utc>) -> Product {
        if let Some(name) = self.name {
            product.name = name.trim().to_owned();
        }
        if let Some(description) = self.description {
            product.description = description;
        }
        if let Some(price) = self.price {
            product.price = price;
        }
        if self.category_id.is_some() {
            product.category_id = self.category_id;
        }
        // Setting any flash_sale_* field schedules a sale unless is_flash_sale says otherwise.
        let touches_sale = self.flash_sale_price.is_some()
            || self.flash_sale_start.is_some()
            || self.flash_sale_end.is_some();
        product.is_flash_sale = self
            .is_flash_sale
            .unwrap_or(product.is_flash_sale || touches_sale);
        if self.flash_sale_price.is_some() {
            product.flash_sale_price = self.flash_sale_price;
        }
        if self.flash_sale_start.is_some() {
            product.flash_sale_start = self.flash_sale_start;
        }
        if self.flash_sale_end.is_some() {
            product.flash_sale_end = self.flash_sale_end;
        }
        product.updated_at = now;
        product
    }
}

fn check_money(field: &str, value: &BigDecimal) -> Result<(), ProductsError> {
    let ok = value >= &BigDecimal::from(0)
        && value.fractional_digit_count() <= 2
        && value < &BigDecimal::from(10_000_000_000i64);
    if !ok {
        return Err(ProductsError::Validation(format!(
            "{field} must be a non-negative amount with at most 2 decimals"
        )));
    }
    Ok(())
}

/// Checks a whole product (after a create or a patch is applied).
pub(crate) fn validate(product: &Product) -> Result<(), ProductsError> {
    let name_chars = product.name.chars().count();
    if name_chars == 0 || name_chars > MAX_NAME_CHARS {
        return Err(ProductsError::Validation(format!(
            "name must be 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    if product.description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(ProductsError::Validation(format!(
            "description must be at most {MAX_DESCRIPTION_CHARS} characters"
        )));
    }
    check_money("price", &product.price)?;
    check_inventory(product.inventory)?;
    if product.is_flash_sale {
        let (Some(price), Some(start), Some(end)) = (
            &product.flash_sale_price,
            product.flash_sale_start,
            product.flash_sale_end,
        ) else {
            return Err(ProductsError::Validation(
                "a flash sale needs flash_sale_price, flash_sale_start and flash_sale_end".into(),
            ));
        };
        check_money("flash_sale_price", price)?;
        if end <= start {
            return Err(ProductsError::Validation(
                "flash_sale_end must be after flash_sale_start".into(),
            ));
        }
    }
    Ok(())
}

pub(crate) fn check_inventory(inventory: i32) -> Result<(), ProductsError> {
    if inventory < 0 {
        return Err(ProductsError::Validation(
            "inventory must not be negative".into(),
        ));
    }
    Ok(())
}
