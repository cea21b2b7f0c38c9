use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use tracing::Instrument;
use uuid::Uuid;

use super::admission::Ticket;
use super::model::{
    CreateOrderRequest, FlashSaleOrderRequest, Order, OrderStatusChange, OrderStatusView,
};
use crate::app::AppState;
use crate::infra::http::extract::parse_optional_json;
use crate::infra::http::paging::{Page, PageQuery};
use crate::infra::http::problem::ProblemBody;
use crate::infra::http::Problem;
use crate::infra::telemetry;
use crate::modules::auth::AuthUser;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/orders")
            .route("", web::post().to(place_order))
            .route(
                "/flash-sale/{product_id}",
                web::post().to(place_flash_sale_order),
            )
            .route(
                "/flash-sale/{product_id}/queue",
                web::get().to(waiting_room_place),
            )
            .route(
                "/flash-sale/{product_id}/queue/events",
                web::get().to(waiting_room_events),
            )
            .route("/user/{user_id}", web::get().to(list_user_orders))
            .route("/{id}", web::get().to(get_order))
            .route("/{id}/status", web::get().to(get_order_status))
            .route("/{id}/events", web::get().to(order_events))
            .route("/{id}/status", web::put().to(advance_order))
            .route("/{id}/cancel", web::put().to(cancel_order)),
    );
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(
    place_order,
    place_flash_sale_order,
    waiting_room_place,
    waiting_room_events,
    list_user_orders,
    get_order,
    get_order_status,
    order_events,
    advance_order,
    cancel_order
))]
pub struct OrdersApi;

#[utoipa::path(post, path = "/orders/flash-sale/{product_id}", tag = "orders", security(("bearer" = [])),
    params(("product_id" = Uuid, Path, description = "product on sale"),
           ("Idempotency-Key" = String, Header, description = "1 to 255 visible ASCII characters; scoped per user and product")),
    request_body(content = Option<FlashSaleOrderRequest>),
    responses((status = 201, body = Order, description = "accepted; the worker settles it to paid or failed"),
              (status = 202, body = Ticket, description = "the platform is settling as many orders as it can: a place in this sale's waiting room (one per buyer, in order of first arrival). Retry the same request with the same Idempotency-Key after Retry-After / retry_after_ms; it is admitted once the room's horizon reaches the ticket. The room never admits more buyers than units are left, and answers 409 sold_out to everyone once the stock is gone"),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "idempotency_key_required"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "sold_out (answered from memory for a moment once a sale sold out; a retry of a request that was accepted gets its order instead), sale_not_active, purchase_limit, request_in_progress"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "validation_failed, idempotency_key_reused, total_too_large (the order's total is larger than an order can hold)"),
              (status = 429, body = ProblemBody, content_type = "application/problem+json"), (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "overloaded (waiting room off), service_unavailable")))]
async fn place_flash_sale_order(
    state: web::Data<AppState>,
    caller: AuthUser,
    req: HttpRequest,
    product: web::Path<Uuid>,
    body: web::Bytes,
) -> Result<HttpResponse, Problem> {
    let key_digest = idempotency_digest(&req)?;
    let request: FlashSaleOrderRequest = parse_optional_json(&req, &body)?.unwrap_or_default();
    let state = state.into_inner();
    let product = product.into_inner();
    let answer = to_completion(async move {
        super::place_flash_sale_order(&state, &caller, product, &key_digest, &request).await
    })
    .await?;
    Ok(match answer {
        super::FlashSaleAnswer::Placed(placed) => created(placed),
        super::FlashSaleAnswer::Waiting(ticket) => HttpResponse::Accepted()
            .insert_header((header::RETRY_AFTER, ticket.retry_after_ms.div_ceil(1000)))
            .json(ticket),
    })
}

#[utoipa::path(get, path = "/orders/flash-sale/{product_id}/queue", tag = "orders", security(("bearer" = [])),
    params(("product_id" = Uuid, Path, description = "product on sale")),
    responses((status = 200, body = Ticket, description = "the caller's place in the sale's waiting room (position 0: admitted, retry the order now)"),
              (status = 401, body = ProblemBody, content_type = "application/problem+json"),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "the caller holds no ticket for this sale")))]
async fn waiting_room_place(
    state: web::Data<AppState>,
    caller: AuthUser,
    product: web::Path<Uuid>,
) -> Result<HttpResponse, Problem> {
    let ticket = state
        .orders
        .admission
        .ticket(&state, product.into_inner(), caller.user_id)
        .await?
        .ok_or(Problem::not_found("ticket"))?;
    Ok(HttpResponse::Ok().json(ticket))
}

#[utoipa::path(get, path = "/orders/flash-sale/{product_id}/queue/events", tag = "orders", security(("bearer" = [])),
    params(("product_id" = Uuid, Path, description = "product on sale"),
           ("Last-Event-ID" = Option<String>, Header, description = "the id of the last event received (EventSource sends it on reconnect): only what differs is sent")),
    responses((status = 200, content_type = "text/event-stream", body = String, description = "server-sent events: `position` (data: a Ticket; id: the position) whenever the caller's place changes, then `admitted` (id `admitted`: retry the order now with the same Idempotency-Key) or `sold_out`, and the stream ends. A `: heartbeat` comment every push.heartbeat_secs; the stream ends after push.max_stream_secs (reconnect with Last-Event-ID)"),
              (status = 204, description = "Last-Event-ID was `admitted` and the caller is admitted: nothing more to send"),
              (status = 401, body = ProblemBody, content_type = "application/problem+json"),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "the caller holds no ticket for this sale"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "overloaded: this process holds push.max_streams streams")))]
async fn waiting_room_events(
    state: web::Data<AppState>,
    caller: AuthUser,
    product: web::Path<Uuid>,
    req: HttpRequest,
) -> Result<HttpResponse, Problem> {
    let events =
        super::stream::queue_events(&state, &caller, product.into_inner(), last_event_id(&req))
            .await?;
    Ok(event_stream(events))
}

#[utoipa::path(get, path = "/orders/{id}/events", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "order id"),
           ("Last-Event-ID" = Option<String>, Header, description = "the id of the last event received (EventSource sends it on reconnect): only what differs is sent")),
    responses((status = 200, content_type = "text/event-stream", body = OrderStatusView, description = "server-sent events: `status` (data: the order's status as GET /orders/{id}/status answers it; id: the status) now and at each change, until the order is settled (anything but pending); then the stream ends. A `: heartbeat` comment every push.heartbeat_secs; the stream ends after push.max_stream_secs (reconnect with Last-Event-ID)"),
              (status = 204, description = "Last-Event-ID is the order's settled status: nothing more to send"),
              (status = 401, body = ProblemBody, content_type = "application/problem+json"),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "no such order, or another user's"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "overloaded: this process holds push.max_streams streams")))]
async fn order_events(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
    req: HttpRequest,
) -> Result<HttpResponse, Problem> {
    let events =
        super::stream::order_events(&state, &caller, id.into_inner(), last_event_id(&req)).await?;
    Ok(event_stream(events))
}

fn last_event_id(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .map(|id| id.trim().to_owned())
}

/// A `text/event-stream` response, or 204 when there is nothing more to send.
fn event_stream(events: Option<super::stream::Events>) -> HttpResponse {
    match events {
        Some(events) => HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            // nginx would otherwise buffer the stream.
            .insert_header(("X-Accel-Buffering", "no"))
            .streaming(events),
        None => HttpResponse::NoContent().finish(),
    }
}

fn idempotency_digest(req: &HttpRequest) -> Result<String, Problem> {
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok());
    Ok(super::idempotency_digest(key)?)
}

/// 201 with the order and its Location; a replay says so.
fn created(placed: super::Placed) -> HttpResponse {
    let mut response = HttpResponse::Created();
    response.insert_header((header::LOCATION, format!("/orders/{}", placed.order.id)));
    if placed.replayed {
        response.insert_header(("Idempotency-Replayed", "true"));
    }
    response.json(placed.order)
}

#[utoipa::path(post, path = "/orders", tag = "orders", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "1 to 255 visible ASCII characters; scoped per user")),
    request_body = CreateOrderRequest,
    responses((status = 201, body = Order, description = "accepted; the worker settles it to paid or failed"),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "idempotency_key_required"),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "a product does not exist"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "sold_out, sale_not_active (product on flash sale), request_in_progress"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "validation_failed, idempotency_key_reused, total_too_large (the order's total is larger than an order can hold)"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json")))]
async fn place_order(
    state: web::Data<AppState>,
    caller: AuthUser,
    req: HttpRequest,
    body: web::Json<CreateOrderRequest>,
) -> Result<HttpResponse, Problem> {
    let key_digest = idempotency_digest(&req)?;
    let (state, body) = (state.into_inner(), body.into_inner());
    let placed =
        to_completion(async move { super::place_order(&state, &caller, &key_digest, &body).await })
            .await?;
    Ok(created(placed))
}

/// Runs an order's placement to its end even if the client goes away meanwhile (a proxy
/// then drops the request): stopped between its reservation and its acceptance or give-back,
/// it would leave the units reserved until the reconciler's timeout and the key in progress,
/// and the buyer's retry would read `purchase_limit` (seen at 200,000 shoppers).
async fn to_completion<T: Send + 'static>(
    placement: impl std::future::Future<Output = Result<T, super::OrdersError>> + Send + 'static,
) -> Result<T, Problem> {
    // In the request's span and trace context: the order's message carries it.
    let placement = placement.in_current_span();
    let traceparent = telemetry::current_traceparent();
    let traced = async move {
        match traceparent {
            Some(traceparent) => telemetry::with_traceparent(traceparent, placement).await,
            None => placement.await,
        }
    };
    match tokio::spawn(traced).await {
        Ok(placed) => Ok(placed?),
        Err(stopped) => Err(Problem::internal(&stopped)),
    }
}

#[utoipa::path(get, path = "/orders/{id}", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "order id")),
    responses((status = 200, body = Order), (status = 404, body = ProblemBody, content_type = "application/problem+json")))]
async fn get_order(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
) -> Result<web::Json<Order>, Problem> {
    Ok(web::Json(
        super::find_order(&state, &caller, id.into_inner()).await?,
    ))
}

#[utoipa::path(get, path = "/orders/{id}/status", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "order id")),
    responses((status = 200, body = OrderStatusView), (status = 404, body = ProblemBody, content_type = "application/problem+json")))]
async fn get_order_status(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
) -> Result<web::Json<OrderStatusView>, Problem> {
    let order = super::find_order(&state, &caller, id.into_inner()).await?;
    Ok(web::Json(OrderStatusView {
        id: order.id,
        status: order.status,
        updated_at: order.updated_at,
    }))
}

#[utoipa::path(get, path = "/orders/user/{user_id}", tag = "orders", security(("bearer" = [])),
    params(("user_id" = Uuid, Path, description = "buyer"), PageQuery),
    responses((status = 200, body = Page<Order>), (status = 403, body = ProblemBody, content_type = "application/problem+json")))]
async fn list_user_orders(
    state: web::Data<AppState>,
    caller: AuthUser,
    user: web::Path<Uuid>,
    page: web::Query<PageQuery>,
) -> Result<web::Json<Page<Order>>, Problem> {
    let user = user.into_inner();
    caller.require_self_or_admin(user)?;
    let page = page.validate()?;
    let rows = super::list_user_orders(&state, user, page).await?;
    Ok(web::Json(Page::from_rows(rows, page, |o| o.id)))
}

#[utoipa::path(put, path = "/orders/{id}/cancel", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "order id")),
    responses((status = 200, body = Order), (status = 404, body = ProblemBody, content_type = "application/problem+json"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "not_cancellable")))]
async fn cancel_order(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
) -> Result<web::Json<Order>, Problem> {
    Ok(web::Json(
        super::cancel_order(&state, &caller, id.into_inner()).await?,
    ))
}

#[utoipa::path(put, path = "/orders/{id}/status", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "order id")),
    request_body = OrderStatusChange,
    responses((status = 200, body = Order, description = "moved on (or already there: nothing changed); the buyer is notified"),
              (status = 403, body = ProblemBody, content_type = "application/problem+json", description = "admins only"),
              (status = 404, body = ProblemBody, content_type = "application/problem+json"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "invalid_transition: only paid -> shipped -> completed"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "a status other than shipped or completed")))]
async fn advance_order(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
    body: web::Json<OrderStatusChange>,
) -> Result<web::Json<Order>, Problem> {
    caller.require_admin()?;
    Ok(web::Json(
        super::advance_order(&state, &caller, id.into_inner(), body.status).await?,
    ))
}
