//! The control socket server: HTTP/1.1 (hyper) on a Unix socket, mode 0600. Each request becomes
//! an [`ApiCall`] answered by the node's main loop. Connections are capped; a stuck client only
//! holds its own connection.

use super::api::*;
use crate::proxy::dial::{DialRequest, Dialer};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;

const MAX_CONNECTIONS: usize = 32;
const MAX_BODY: usize = 64 * 1024;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the control socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "another meshd is already serving the control socket {}; stop it, or give this one its \
         own --socket",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("{what} {}: {error}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Bind the control socket: refuse if a live meshd serves it, replace a stale file.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |error| BindError::Io { what, path, error }
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io("setting the mode of", dir))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io("removing stale", path))?;
    }
    let l = UnixListener::bind(path).map_err(io("binding control socket", path))?;
    // Root only, or also the read-only group when it exists: root:GROUP 0660, and the socket's
    // own directory (meshd's, e.g. /run/meshd) group-traversable.
    let mode = match reader_group() {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(io("setting the group of", path))?;
            if let Some(dir) = path
                .parent()
                .filter(|d| d.file_name() == Some("meshd".as_ref()))
            {
                let _ = std::os::unix::fs::chown(dir, None, Some(gid));
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
            }
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("setting the mode of", path))?;
    Ok(l)
}

/// The group whose members may read through the control socket (status, metrics, ...):
/// `$MESHD_GROUP`, default `meshd`, when it exists.
pub fn reader_group() -> Option<u32> {
    let name = std::env::var("MESHD_GROUP").unwrap_or_else(|_| "meshd".into());
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam reads the group database; the returned pointer is only read at once.
    let g = unsafe { libc::getgrnam(cname.as_ptr()) };
    if g.is_null() {
        return None;
    }
    // SAFETY: non-null, valid until the next getgr* call in this thread.
    Some(unsafe { (*g).gr_gid })
}

/// Whether a caller with user id `uid` may change things (else it may only read).
fn may_write(uid: Option<u32>) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    uid.is_some_and(|u| u == 0 || u == me)
}

/// Serve until `shutdown`; removes the socket file on the way out.
/// With a dialer, `POST /v1/connect` upgrades the connection to a raw stream to the requested
/// target (`meshctl nc`).
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    calls: mpsc::Sender<ApiCall>,
    dialer: Option<Arc<dyn Dialer>>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { debug!(error = %e, "control accept failed"); continue; }
            },
        };
        let calls = calls.clone();
        let stop = shutdown.clone();
        let dialer = dialer.clone();
        let writer = may_write(stream.peer_cred().ok().map(|c| c.uid()));
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (calls, dialer) = (calls.clone(), dialer.clone());
                async move {
                    if !writer && req.method() != Method::GET {
                        return Ok(error(
                            403,
                            "this changes the node and needs root: run meshctl with sudo \
                             (members of the meshd group may only read: status, dns, services, \
                             netcheck, metrics)",
                        ));
                    }
                    handle(req, calls, dialer).await
                }
            });
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(error = %e, "control connection"); },
                _ = stop.cancelled() => {},
            }
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(v).expect("serializable");
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn error(status: u16, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &ApiErrorBody {
            error: message.into(),
        },
    )
}

/// A JSON body that must be present.
fn parse_required<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

/// A JSON body; an empty one means "all defaults".
fn parse<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, String> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

/// The upgrade protocol name of `/v1/connect`.
pub const STREAM_PROTOCOL: &str = "meshd-stream";

async fn connect(
    mut req: Request<Incoming>,
    dialer: Option<Arc<dyn Dialer>>,
) -> Response<Full<Bytes>> {
    let Some(dialer) = dialer else {
        return error(503, "this meshd cannot open streams");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(413, format!("request body rejected: {e}")),
    };
    let r: ConnectRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(400, format!("invalid JSON body: {e}")),
    };
    let dial = DialRequest {
        host: r.host.clone(),
        port: r.port,
        exit: r.exit.clone(),
    };
    let mut upstream = match dialer.dial(&dial).await {
        Ok(u) => u,
        Err(e) => return error(e.http_status(), e.to_string()),
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                let mut client = TokioIo::new(up);
                let _ = crate::proxy::splice::splice(&mut client, &mut upstream).await;
            }
            Err(e) => debug!(error = %e, "connect upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", STREAM_PROTOCOL)
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

async fn handle(
    req: Request<Incoming>,
    calls: mpsc::Sender<ApiCall>,
    dialer: Option<Arc<dyn Dialer>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == Method::POST && req.uri().path() == "/v1/connect" {
        return Ok(connect(req, dialer).await);
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(error(413, format!("request body rejected: {e}"))),
    };
    let request = match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/v1/status") => Ok(ApiRequest::Status),
        (&Method::POST, "/v1/invite") => parse(&body).map(ApiRequest::Invite),
        (&Method::POST, "/v1/remove") => parse_required(&body).map(ApiRequest::Remove),
        (&Method::POST, "/v1/leave") => Ok(ApiRequest::Leave),
        (&Method::GET, "/v1/dns") => Ok(ApiRequest::Dns),
        (&Method::GET, "/v1/services") => Ok(ApiRequest::Services),
        (&Method::POST, "/v1/services") => parse_required(&body).map(ApiRequest::ServiceAdd),
        (&Method::POST, "/v1/services/remove") => {
            parse_required(&body).map(ApiRequest::ServiceRemove)
        }
        (&Method::POST, "/v1/expose") => parse_required(&body).map(ApiRequest::Expose),
        (&Method::POST, "/v1/unexpose") => parse_required(&body).map(ApiRequest::Unexpose),
        (&Method::POST, "/v1/gateway") => parse_required(&body).map(ApiRequest::Gateway),
        (&Method::POST, "/v1/proxy") => parse_required(&body).map(ApiRequest::Proxy),
        (&Method::POST, "/v1/exit-node") => parse_required(&body).map(ApiRequest::ExitNode),
        (&Method::GET, "/v1/metrics") => Ok(ApiRequest::Metrics),
        (&Method::GET, "/v1/sd") => Ok(ApiRequest::Discovery),
        (&Method::POST, "/v1/log-level") => parse_required(&body).map(ApiRequest::LogLevel),
        (&Method::POST, "/v1/config") => parse_required(&body).map(ApiRequest::Config),
        (&Method::POST, "/v1/relay") => parse_required(&body).map(ApiRequest::Relay),
        (&Method::GET, "/v1/workloads") => Ok(ApiRequest::Workloads),
        (&Method::POST, "/v1/workloads") => parse_required(&body).map(ApiRequest::WorkloadsSet),
        (&Method::POST, "/v1/workload/add") => parse_required(&body).map(ApiRequest::WorkloadAdd),
        (&Method::POST, "/v1/workload/rm") => parse_required(&body).map(ApiRequest::WorkloadRemove),
        (&Method::POST, "/v1/ping") => parse_required(&body).map(ApiRequest::Ping),
        (&Method::GET, "/v1/netcheck") => Ok(ApiRequest::Netcheck),
        (_, p) => {
            return Ok(error(
                404,
                format!("no such endpoint: {} {p}", parts.method),
            ))
        }
    };
    let request = match request {
        Ok(r) => r,
        Err(m) => return Ok(error(400, m)),
    };
    let (tx, rx) = oneshot::channel();
    if calls.send(ApiCall { request, reply: tx }).await.is_err() {
        return Ok(error(503, "meshd is shutting down"));
    }
    Ok(answer(rx).await)
}

/// The node's answer to a call, as an HTTP response.
async fn answer(rx: oneshot::Receiver<crate::control::ApiResult>) -> Response<Full<Bytes>> {
    match tokio::time::timeout(CALL_TIMEOUT, rx).await {
        Ok(Ok(Ok(ApiReply::Metrics(text)))) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(text)))
            .expect("valid response"),
        Ok(Ok(Ok(v))) => json(StatusCode::OK, &v),
        Ok(Ok(Err(f))) => error(f.status, f.message),
        Ok(Err(_)) => error(503, "meshd is shutting down"),
        Err(_) => error(504, "meshd did not answer in time"),
    }
}

/// Port of the metrics listener on the node's mesh address.
pub const METRICS_PORT: u16 = 9586;

/// Serve `GET /metrics` and `GET /sd` (nothing else: read-only) on `listener`, the node's
/// mesh address, until `shutdown`. Reachable only through the tunnels.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    calls: mpsc::Sender<ApiCall>,
    shutdown: CancellationToken,
) {
    let handler = move |stream: tokio::net::TcpStream, _peer| {
        let calls = calls.clone();
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let calls = calls.clone();
                async move {
                    let request = match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics") => ApiRequest::Metrics,
                        (&Method::GET, "/sd") => ApiRequest::Discovery,
                        (_, p) => {
                            return Ok::<_, hyper::Error>(error(
                                404,
                                format!(
                                    "no such endpoint: {p} (this port serves /metrics and /sd)"
                                ),
                            ))
                        }
                    };
                    let (tx, rx) = oneshot::channel();
                    if calls.send(ApiCall { request, reply: tx }).await.is_err() {
                        return Ok(error(503, "meshd is shutting down"));
                    }
                    Ok(answer(rx).await)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    };
    crate::proxy::listen::accept_loop(listener, 64, None, shutdown, "metrics", handler).await;
}
