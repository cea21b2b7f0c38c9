//! Users and addresses in the user's shard, plus the profile cache in Redis.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::error::UsersError;
use super::model::{Address, Credentials, NewAddress, NewUser, Role, UpdateUser, User};
use crate::infra::db::{Databases, ReadFrom};
use crate::infra::http::paging::PageRequest;
use crate::infra::redis::Redis;

diesel::table! {
    users (id) {
        id -> Uuid,
        email -> Text,
        password_hash -> Text,
        full_name -> Nullable<Text>,
        phone -> Nullable<Text>,
        role -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    addresses (id) {
        id -> Uuid,
        user_id -> Uuid,
        line1 -> Text,
        line2 -> Nullable<Text>,
        city -> Text,
        postal_code -> Text,
        country -> Text,
        is_default -> Bool,
        created_at -> Timestamptz,
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = users)]
struct UserRow {
    id: Uuid,
    email: String,
    full_name: Option<String>,
    phone: Option<String>,
    role: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<UserRow> for User {
    type Error = UsersError;

    fn try_from(row: UserRow) -> Result<Self, UsersError> {
        Ok(User {
            id: row.id,
            email: row.email,
            full_name: row.full_name,
            phone: row.phone,
            role: Role::parse(&row.role)?,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = users)]
struct UserInsert<'a> {
    id: Uuid,
    email: &'a str,
    password_hash: &'a str,
    full_name: Option<&'a str>,
    phone: Option<&'a str>,
}

#[derive(AsChangeset)]
#[diesel(table_name = users)]
struct UserChanges<'a> {
    full_name: Option<&'a str>,
    phone: Option<&'a str>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = addresses)]
struct AddressRow {
    id: Uuid,
    line1: String,
    line2: Option<String>,
    city: String,
    postal_code: String,
    country: String,
    is_default: bool,
}

impl From<AddressRow> for Address {
    fn from(row: AddressRow) -> Self {
        Address {
            id: row.id,
            line1: row.line1,
            line2: row.line2,
            city: row.city,
            postal_code: row.postal_code,
            country: row.country,
            is_default: row.is_default,
        }
    }
}

pub async fn insert_user(db: &Databases, new: &NewUser) -> Result<User, UsersError> {
    let mut conn = db.shard_for(new.id).write_conn().await?;
    let row: UserRow = diesel::insert_into(users::table)
        .values(UserInsert {
            id: new.id,
            email: &new.email,
            password_hash: &new.password_hash,
            full_name: new.full_name.as_deref(),
            phone: new.phone.as_deref(),
        })
        .returning(UserRow::as_returning())
        .get_result(&mut conn)
        .await?;
    row.try_into()
}

pub async fn load_user(db: &Databases, id: Uuid, from: ReadFrom) -> Result<User, UsersError> {
    let mut conn = db.shard_for(id).read_conn(from).await?;
    let row: Option<UserRow> = users::table
        .find(id)
        .select(UserRow::as_select())
        .first(&mut conn)
        .await
        .optional()?;
    row.ok_or(UsersError::NotFound)?.try_into()
}

pub async fn load_credentials(db: &Databases, id: Uuid) -> Result<Option<Credentials>, UsersError> {
    // Credentials come from the primary: a login right after a password or role change must
    // see it, and logins are rare next to catalogue reads.
    let mut conn = db.shard_for(id).write_conn().await?;
    let row: Option<(String, String)> = users::table
        .find(id)
        .select((users::password_hash, users::role))
        .first(&mut conn)
        .await
        .optional()?;
    row.map(|(password_hash, role)| {
        Ok(Credentials {
            password_hash,
            role: Role::parse(&role)?,
        })
    })
    .transpose()
}

pub async fn update_user(
    db: &Databases,
    id: Uuid,
    changes: &UpdateUser,
) -> Result<User, UsersError> {
    let mut conn = db.shard_for(id).write_conn().await?;
    let row: Option<UserRow> = diesel::update(users::table.find(id))
        .set((
            UserChanges {
                full_name: changes.full_name.as_deref().map(str::trim),
                phone: changes.phone.as_deref().map(str::trim),
            },
            users::updated_at.eq(diesel::dsl::now),
        ))
        .returning(UserRow::as_returning())
        .get_result(&mut conn)
        .await
        .optional()?;
    row.ok_or(UsersError::NotFound)?.try_into()
}

pub async fn set_role(db: &Databases, id: Uuid, role: Role) -> Result<(), UsersError> {
    let mut conn = db.shard_for(id).write_conn().await?;
    let updated = diesel::update(users::table.find(id))
        .set((
            users::role.eq(role.as_str()),
            users::updated_at.eq(diesel::dsl::now),
        ))
        .execute(&mut conn)
        .await?;
    if updated == 0 {
        return Err(UsersError::NotFound);
    }
    Ok(())
}

pub async fn list_addresses(
    db: &Databases,
    user_id: Uuid,
    page: PageRequest,
    from: ReadFrom,
) -> Result<Vec<Address>, UsersError> {
    let mut conn = db.shard_for(user_id).read_conn(from).await?;
    let mut query = addresses::table
        .filter(addresses::user_id.eq(user_id))
        .select(AddressRow::as_select())
        .order(addresses::id.asc())
        .limit(page.limit + 1)
        .into_boxed();
    if let Some(after) = page.after {
        query = query.filter(addresses::id.gt(after));
    }
    let rows: Vec<AddressRow> = query.load(&mut conn).await?;
    Ok(rows.into_iter().map(Address::from).collect())
}

pub async fn insert_address(
    db: &Databases,
    user_id: Uuid,
    new: &NewAddress,
    max_addresses: i64,
) -> Result<Address, UsersError> {
    let mut pooled = db.shard_for(user_id).write_conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    let id = Uuid::now_v7();
    let row = conn
        .transaction(async |conn| {
            // Locking the user row serialises concurrent inserts, so the cap and the single
            // default address hold.
            let owner: Option<Uuid> = users::table
                .find(user_id)
                .select(users::id)
                .for_update()
                .first(conn)
                .await
                .optional()?;
            if owner.is_none() {
                return Err(UsersError::NotFound);
            }
            let count: i64 = addresses::table
                .filter(addresses::user_id.eq(user_id))
                .count()
                .get_result(conn)
                .await?;
            if count >= max_addresses {
                return Err(UsersError::AddressLimit(max_addresses));
            }
            // The first address is the default whether or not the client asked.
            let is_default = new.is_default || count == 0;
            if is_default {
                diesel::update(addresses::table.filter(addresses::user_id.eq(user_id)))
                    .set(addresses::is_default.eq(false))
                    .execute(conn)
                    .await?;
            }
            let row: AddressRow = diesel::insert_into(addresses::table)
                .values((
                    addresses::id.eq(id),
                    addresses::user_id.eq(user_id),
                    addresses::line1.eq(new.line1.trim()),
                    addresses::line2.eq(new.line2.as_deref().map(str::trim)),
                    addresses::city.eq(new.city.trim()),
                    addresses::postal_code.eq(new.postal_code.trim()),
                    addresses::country.eq(&new.country),
                    addresses::is_default.eq(is_default),
                ))
                .returning(AddressRow::as_returning())
                .get_result(conn)
                .await?;
            Ok::<_, UsersError>(row)
        })
        .await?;
    Ok(row.into())
}

/// The cached profile (if any) and where a database read must go, in one round trip.
pub async fn cached_user(redis: &Redis, id: Uuid) -> Result<(Option<User>, ReadFrom), UsersError> {
    let (cached, recent_write): (Option<String>, Option<String>) = redis::cmd("MGET")
        .arg(profile_key(redis, id))
        .arg(recent_write_key(redis, id))
        .query_async(&mut redis.conn())
        .await?;
    // An undecodable entry (an older format) is a miss; the reload overwrites it.
    let user = cached.and_then(|json| serde_json::from_str(&json).ok());
    Ok((user, read_from(recent_write.is_some())))
}

pub async fn recently_wrote(redis: &Redis, id: Uuid) -> Result<ReadFrom, UsersError> {
    let marker: Option<String> = redis::cmd("GET")
        .arg(recent_write_key(redis, id))
        .query_async(&mut redis.conn())
        .await?;
    Ok(read_from(marker.is_some()))
}

fn read_from(recent_write: bool) -> ReadFrom {
    if recent_write {
        ReadFrom::Primary
    } else {
        ReadFrom::Replica
    }
}

pub async fn cache_user(redis: &Redis, user: &User, ttl_secs: u64) -> Result<(), UsersError> {
    let json = serde_json::to_string(user).map_err(|e| UsersError::Corrupt(e.to_string()))?;
    redis::cmd("SET")
        .arg(profile_key(redis, user.id))
        .arg(json)
        .arg("EX")
        .arg(ttl_secs)
        .query_async::<()>(&mut redis.conn())
        .await?;
    Ok(())
}

/// After a write: drop the cached profile and send this user's reads to the primary until
/// replicas have caught up.
pub async fn after_write(
    redis: &Redis,
    id: Uuid,
    primary_window_secs: u64,
) -> Result<(), UsersError> {
    redis::pipe()
        .atomic()
        .del(profile_key(redis, id))
        .ignore()
        .set_ex(recent_write_key(redis, id), 1, primary_window_secs.max(1))
        .ignore()
        .query_async::<()>(&mut redis.conn())
        .await?;
    Ok(())
}

// One hash tag per user: `after_write` changes both keys in one transaction (one slot).
fn profile_key(redis: &Redis, id: Uuid) -> String {
    redis.key(format_args!("{{u:{}}}:profile", id.simple()))
}

fn recent_write_key(redis: &Redis, id: Uuid) -> String {
    redis.key(format_args!("{{u:{}}}:wrote", id.simple()))
}

/// Bulk insert for seeding: one multi-row INSERT per shard; rows that exist are skipped.
pub async fn insert_users_batch(db: &Databases, batch: &[NewUser]) -> Result<usize, UsersError> {
    let mut inserted = 0;
    for (index, shard) in db.shards().iter().enumerate() {
        let rows: Vec<UserInsert<'_>> = batch
            .iter()
            .filter(|u| crate::infra::db::shard_index(u.id, db.shard_count()) == index)
            .map(|u| UserInsert {
                id: u.id,
                email: &u.email,
                password_hash: &u.password_hash,
                full_name: u.full_name.as_deref(),
                phone: u.phone.as_deref(),
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let mut conn = shard.write_conn().await?;
        inserted += diesel::insert_into(users::table)
            .values(&rows)
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await?;
    }
    Ok(inserted)
}
