//! The control API: HTTP + JSON on a loopback address, for the CLI, the tray and scripts.
//!
//! Every request must carry the API key from `config.toml` in the `X-API-Key` header (or
//! `Authorization: Bearer KEY`); without it the answer is 401 and nothing happens. Errors
//! are `{"error": "..."}` with a 4xx (the request was wrong) or 5xx status. Endpoints are
//! documented in `API.md`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};

use crate::config::FolderSettings;
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::config::FolderType;
use crate::daemon::DaemonHandle;
use crate::error::{Error, Result};
use crate::types::DeviceId;

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Invalid(_) | Error::DeviceId(_) | Error::Config(_) => StatusCode::BAD_REQUEST,
            Error::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

type ApiResult = std::result::Result<Json<Value>, ApiError>;

fn ok() -> ApiResult {
    Ok(Json(json!({ "ok": true })))
}

fn parse_device(s: &str) -> std::result::Result<DeviceId, ApiError> {
    s.parse::<DeviceId>()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid device ID: {e}")))
}

/// Binds `addr` (loopback only) and serves until `stop` fires.
pub async fn serve(
    handle: DaemonHandle,
    addr: &str,
    stop: oneshot::Receiver<()>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let sa: SocketAddr = addr
        .parse()
        .map_err(|e| Error::Config(format!("api.address {addr:?}: {e}")))?;
    if !sa.ip().is_loopback() {
        return Err(Error::Config(format!(
            "api.address {addr} is not a loopback address; the control API only listens on loopback"
        )));
    }
    let listener = tokio::net::TcpListener::bind(sa)
        .await
        .map_err(|e| Error::io(PathBuf::from(addr), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io(PathBuf::from(addr), e))?;
    let app = router(handle);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop.await;
            })
            .await;
    });
    Ok((bound, task))
}

pub fn router(handle: DaemonHandle) -> Router {
    Router::new()
        .route(
            "/rest/ping",
            get(|| async { Json(json!({ "ping": "pong" })) }),
        )
        .route("/rest/status", get(status))
        .route("/rest/devices", get(devices).post(device_add))
        .route("/rest/devices/pending", get(devices_pending))
        .route("/rest/devices/{id}", delete(device_remove))
        .route("/rest/devices/{id}/accept", post(device_accept))
        .route("/rest/devices/{id}/ignore", post(device_ignore))
        .route("/rest/folders", get(folders).post(folder_add))
        .route("/rest/folders/pending", get(folders_pending))
        .route(
            "/rest/folders/{id}",
            delete(folder_remove).patch(folder_set),
        )
        .route("/rest/folders/{id}/share", post(folder_share))
        .route("/rest/folders/{id}/accept", post(folder_accept))
        .route("/rest/folders/{id}/ignore", post(folder_ignore))
        .route("/rest/folders/{id}/revert", post(folder_revert))
        .route("/rest/scan", post(scan))
        .route("/rest/pause", post(pause))
        .route("/rest/resume", post(resume))
        .route("/rest/invite", post(invite))
        .route("/rest/join", post(join))
        .route("/rest/events", get(events))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint (see API.md)".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(handle.clone(), auth))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(handle)
}

async fn auth(
    State(h): State<DaemonHandle>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let key = h.config().api.key;
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string)
        });
    // Compare without an early exit on the first differing byte.
    let good = given.is_some_and(|g| {
        g.len() == key.len()
            && g.bytes()
                .zip(key.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    });
    if !good {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key (header X-API-Key, from config.toml)".into(),
        )
        .into_response();
    }
    next.run(req).await
}

/// Axum's own rejections (bad JSON, wrong method…) are plain text; make every error JSON.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.is_success() || is_json || status.is_informational() {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError(status, text).into_response()
}

async fn status(State(h): State<DaemonHandle>) -> ApiResult {
    Ok(Json(
        serde_json::to_value(h.status().await?).unwrap_or_default(),
    ))
}

async fn devices(State(h): State<DaemonHandle>) -> ApiResult {
    Ok(Json(json!(h.config().devices)))
}

#[derive(Deserialize)]
struct DeviceAdd {
    id: String,
    name: Option<String>,
    #[serde(default)]
    addresses: Vec<String>,
}

async fn device_add(State(h): State<DaemonHandle>, Json(b): Json<DeviceAdd>) -> ApiResult {
    let id = parse_device(&b.id)?;
    let own = h.device_id();
    h.update_config(|c| c.add_device(id, b.name, b.addresses, own))
        .await?;
    ok()
}

async fn device_remove(State(h): State<DaemonHandle>, Path(id): Path<String>) -> ApiResult {
    let id = parse_device(&id)?;
    h.update_config(|c| c.remove_device(&id)).await?;
    let _ = h.ctx().index.forget_device(id).await;
    ok()
}

async fn devices_pending(State(h): State<DaemonHandle>) -> ApiResult {
    Ok(Json(json!(h.config().pending_devices)))
}

async fn device_accept(State(h): State<DaemonHandle>, Path(id): Path<String>) -> ApiResult {
    let id = parse_device(&id)?;
    let own = h.device_id();
    h.update_config(|c| {
        let p = c.pending_devices.iter().find(|p| p.id == id).cloned();
        let Some(p) = p else {
            return Err(Error::Invalid(format!("device {id} is not pending")));
        };
        let addrs = if p.address.is_empty() {
            vec![]
        } else {
            vec![p.address.clone()]
        };
        c.add_device(id, Some(p.name), addrs, own)
    })
    .await?;
    ok()
}

async fn device_ignore(State(h): State<DaemonHandle>, Path(id): Path<String>) -> ApiResult {
    let id = parse_device(&id)?;
    h.update_config(|c| {
        c.ignore_device(id);
        Ok(())
    })
    .await?;
    ok()
}

async fn folders(State(h): State<DaemonHandle>) -> ApiResult {
    Ok(Json(json!(h.config().folders)))
}

#[derive(Deserialize)]
struct FolderAdd {
    path: PathBuf,
    id: Option<String>,
    label: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn folder_add(State(h): State<DaemonHandle>, Json(b): Json<FolderAdd>) -> ApiResult {
    let kind = match b.kind.as_deref() {
        Some(k) => k.parse::<FolderType>()?,
        None => FolderType::SendReceive,
    };
    let id = h
        .update_config(|c| c.add_folder(&b.path, b.id, b.label, kind))
        .await?;
    Ok(Json(json!({ "ok": true, "id": id })))
}

async fn folder_set(
    State(h): State<DaemonHandle>,
    Path(id): Path<String>,
    Json(b): Json<FolderSettings>,
) -> ApiResult {
    h.update_config(|c| c.set_folder(&id, b)).await?;
    ok()
}

async fn folder_remove(State(h): State<DaemonHandle>, Path(id): Path<String>) -> ApiResult {
    h.update_config(|c| c.remove_folder(&id)).await?;
    ok()
}

#[derive(Deserialize)]
struct Share {
    device: String,
}

async fn folder_share(
    State(h): State<DaemonHandle>,
    Path(id): Path<String>,
    Json(b): Json<Share>,
) -> ApiResult {
    let dev = parse_device(&b.device)?;
    h.update_config(|c| c.share_folder(&id, dev)).await?;
    ok()
}

async fn folders_pending(State(h): State<DaemonHandle>) -> ApiResult {
    Ok(Json(json!(h.config().pending_folders)))
}

#[derive(Deserialize)]
struct Accept {
    path: PathBuf,
}

async fn folder_accept(
    State(h): State<DaemonHandle>,
    Path(id): Path<String>,
    Json(b): Json<Accept>,
) -> ApiResult {
    h.update_config(|c| c.accept_folder(&id, &b.path)).await?;
    ok()
}

async fn folder_revert(State(h): State<DaemonHandle>, Path(id): Path<String>) -> ApiResult {
    let n = h.revert(&id).await?;
    Ok(Json(json!({ "ok": true, "reverted": n })))
}

async fn folder_ignore(State(h): State<DaemonHandle>, Path(id): Path<String>) -> ApiResult {
    h.update_config(|c| {
        c.ignore_folder(&id);
        Ok(())
    })
    .await?;
    ok()
}

#[derive(Deserialize, Default)]
struct ScanReq {
    folder: Option<String>,
}

async fn scan(State(h): State<DaemonHandle>, body: Option<Json<ScanReq>>) -> ApiResult {
    let b = body.map(|b| b.0).unwrap_or_default();
    h.scan(b.folder.as_deref()).await?;
    ok()
}

async fn pause(State(h): State<DaemonHandle>) -> ApiResult {
    h.set_paused(true).await?;
    ok()
}

async fn resume(State(h): State<DaemonHandle>) -> ApiResult {
    h.set_paused(false).await?;
    ok()
}

#[derive(Deserialize, Default)]
struct InviteReq {
    folder: Option<String>,
}

async fn invite(State(h): State<DaemonHandle>, body: Option<Json<InviteReq>>) -> ApiResult {
    let b = body.map(|b| b.0).unwrap_or_default();
    let inv = h.invite(b.folder).await?;
    Ok(Json(
        json!({ "invite": inv, "expires_in_s": crate::daemon::INVITE_TTL.as_secs() }),
    ))
}

#[derive(Deserialize)]
struct JoinReq {
    invite: String,
    path: Option<PathBuf>,
}

async fn join(State(h): State<DaemonHandle>, Json(b): Json<JoinReq>) -> ApiResult {
    let msg = h.join(&b.invite, b.path).await?;
    Ok(Json(json!({ "ok": true, "message": msg })))
}

async fn events(
    State(h): State<DaemonHandle>,
) -> Sse<impl Stream<Item = std::result::Result<SseEvent, Infallible>>> {
    let rx = h.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let data = match rx.recv().await {
            Ok(ev) => serde_json::to_string(&ev).unwrap_or_default(),
            // A slow reader missed events: say how many, then carry on.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                json!({ "type": "lagged", "missed": n }).to_string()
            }
            Err(_) => return None,
        };
        Some((Ok(SseEvent::default().data(data)), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
