//! The seed brief's naive design, for a baseline measured the same way as ours: stock in a
//! PostgreSQL row, decremented synchronously inside the request
//! (`UPDATE ... SET inventory = inventory - q WHERE inventory >= q`), the order written to
//! the buyer's shard before answering. Same binary config, same pools, same token check.
//!
//!     naive_server --config-dir config --env development --port 8081
//!     order_load --base-url http://127.0.0.1:8081 --product <id> --path /naive/{product} ...

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use clap::Parser;
use diesel::sql_types::{Numeric, Uuid as SqlUuid};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::config::Settings;
use flashsale::infra::db::Databases;
use flashsale::modules::auth::TokenKeys;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "config")]
    config_dir: PathBuf,
    #[arg(long, default_value = "development")]
    env: String,
    #[arg(long, default_value_t = 8081)]
    port: u16,
}

struct Naive {
    db: Databases,
    keys: TokenKeys,
}

#[derive(QueryableByName)]
struct Price {
    #[diesel(sql_type = Numeric)]
    price: diesel::data_types::PgNumeric,
}

async fn buy(
    state: web::Data<Arc<Naive>>,
    req: HttpRequest,
    product: web::Path<Uuid>,
) -> HttpResponse {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(claims) = token.and_then(|t| state.keys.verify(t).ok()) else {
        return HttpResponse::Unauthorized().finish();
    };
    let product = product.into_inner();
    let Ok(mut global) = state.db.global().primary().get().await else {
        return HttpResponse::ServiceUnavailable().finish();
    };
    let taken: Result<Vec<Price>, _> = diesel::sql_query(
        "UPDATE products SET inventory = inventory - 1 WHERE id = $1 AND inventory >= 1 \
         RETURNING flash_sale_price AS price",
    )
    .bind::<SqlUuid, _>(product)
    .load(&mut global)
    .await;
    let price = match taken {
        Ok(mut rows) => match rows.pop() {
            Some(row) => row.price,
            None => return HttpResponse::Conflict().body("sold_out"),
        },
        Err(_) => return HttpResponse::ServiceUnavailable().finish(),
    };
    drop(global);
    let order = Uuid::now_v7();
    let Ok(mut shard) = state.db.shard_for(claims.sub).primary().get().await else {
        return HttpResponse::ServiceUnavailable().finish();
    };
    let conn: &mut AsyncPgConnection = &mut shard;
    let written = conn
        .transaction(async |conn| {
            diesel::sql_query(
                "INSERT INTO orders (id, user_id, status, kind, total_amount, payment_method, created_at) \
                 VALUES ($1, $2, 'paid', 'flash_sale', $3, 'card', now())",
            )
            .bind::<SqlUuid, _>(order)
            .bind::<SqlUuid, _>(claims.sub)
            .bind::<Numeric, _>(&price)
            .execute(conn)
            .await?;
            diesel::sql_query("INSERT INTO order_items (order_id, product_id, quantity, price) VALUES ($1, $2, 1, $3)")
                .bind::<SqlUuid, _>(order)
                .bind::<SqlUuid, _>(product)
                .bind::<Numeric, _>(&price)
                .execute(conn)
                .await?;
            Ok::<_, diesel::result::Error>(())
        })
        .await;
    match written {
        Ok(()) => HttpResponse::Created().json(serde_json::json!({"id": order, "status": "paid"})),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let settings = Settings::load_for(&args.config_dir, &args.env).expect("configuration loads");
    let naive = Arc::new(Naive {
        db: Databases::connect(&settings.database)
            .await
            .expect("databases"),
        keys: TokenKeys::new(&settings.auth).expect("keys"),
    });
    let data = web::Data::new(naive);
    let listener = TcpListener::bind(("127.0.0.1", args.port))?;
    println!("naive baseline on {}", listener.local_addr()?);
    HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/naive/{product}", web::post().to(buy))
    })
    .listen(listener)?
    .run()
    .await
}
