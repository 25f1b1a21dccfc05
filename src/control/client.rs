//! The control API client used by `meshctl` and `meshd leave`.

use super::api::ApiErrorBody;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach meshd at {}: {source}. Is meshd running? Start it with `meshd run` \
         (or `meshd init` / `meshd join`); if it uses another socket, pass --socket or set MESHD_SOCKET",
        socket.display()
    )]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "not allowed to talk to meshd at {}: run meshctl with sudo, or, to read (status, \
         metrics), join the meshd group: sudo usermod -aG meshd $USER",
        socket.display()
    )]
    Denied { socket: PathBuf },
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("talking to meshd: {0}")]
    Protocol(String),
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, Bytes::new()).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let b = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call(Method::POST, path, Bytes::from(b)).await
    }

    /// An HTTP/1.1 connection to meshd (driven by a background task that supports upgrades).
    async fn open(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::PermissionDenied {
                    ClientError::Denied {
                        socket: self.socket.clone(),
                    }
                } else {
                    ClientError::Connect {
                        socket: self.socket.clone(),
                        source,
                    }
                }
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// `POST /v1/connect`: a raw byte stream to `host:port` through the mesh (or `exit`).
    pub async fn connect(
        &self,
        req: &super::api::ConnectRequest,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        let mut sender = self.open().await?;
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let r = Request::builder()
            .method(Method::POST)
            .uri("/v1/connect")
            .header("host", "meshd")
            .header("connection", "upgrade")
            .header("upgrade", super::server::STREAM_PROTOCOL)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut resp = sender
            .send_request(r)
            .await
            .map_err(|e| ClientError::Protocol(format!("{e} (did meshd stop?)")))?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status().as_u16();
            return Err(api_error(status, &body_bytes(resp).await?));
        }
        let up = hyper::upgrade::on(&mut resp)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(TokioIo::new(up))
    }

    /// A GET whose answer is text (Prometheus metrics).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let bytes = self.raw(Method::GET, path, Bytes::new()).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        let bytes = self.raw(method, path, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("unexpected answer: {e}")))
    }

    async fn raw(&self, method: Method, path: &str, body: Bytes) -> Result<Bytes, ClientError> {
        let mut sender = self.open().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "meshd")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(format!("{e} (did meshd stop?)")))?;
        let status = resp.status();
        let bytes = body_bytes(resp).await?;
        if !status.is_success() {
            return Err(api_error(status.as_u16(), &bytes));
        }
        Ok(bytes)
    }
}

async fn body_bytes(resp: hyper::Response<hyper::body::Incoming>) -> Result<Bytes, ClientError> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .to_bytes())
}

/// The `{"error": ...}` body of a failed call (or its text, if it is not JSON).
fn api_error(status: u16, bytes: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ApiErrorBody>(bytes)
        .map(|b| b.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
    ClientError::Api { status, message }
}

#[cfg(test)]
mod tests {
    use super::super::api::*;
    use super::super::server;
    use super::*;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn calls_round_trip_and_errors_carry_their_message() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("s.sock");
        let l = server::bind(&sock).unwrap();
        // A second daemon on the same socket is refused.
        assert!(server::bind(&sock)
            .unwrap_err()
            .to_string()
            .contains("already serving"));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ApiCall>(4);
        let stop = CancellationToken::new();
        tokio::spawn(server::serve(l, sock.clone(), tx, None, stop.clone()));
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                let r = match call.request {
                    ApiRequest::Remove(r) if r.node == "x" => {
                        Ok(ApiReply::Remove(RemoveResponse {
                            name: "x".into(),
                            node_id: "00".into(),
                        }))
                    }
                    ApiRequest::Remove(r) => {
                        Err(ApiFailure::not_found(format!("no node {}", r.node)))
                    }
                    _ => Err(ApiFailure::internal("unexpected")),
                };
                let _ = call.reply.send(r);
            }
        });
        let c = Client::new(&sock);
        let ok: RemoveResponse = c
            .post("/v1/remove", &RemoveRequest { node: "x".into() })
            .await
            .unwrap();
        assert_eq!(ok.name, "x");
        let e = c
            .post::<_, RemoveResponse>("/v1/remove", &RemoveRequest { node: "y".into() })
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Api { status: 404, .. }));
        assert_eq!(e.to_string(), "no node y");
        let e = c.get::<serde_json::Value>("/v1/nope").await.unwrap_err();
        assert!(matches!(e, ClientError::Api { status: 404, .. }));
        stop.cancel();
        // The server removes its socket on shutdown; then clients get the "is meshd running" hint.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while sock.exists() {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let e = c.get::<serde_json::Value>("/v1/status").await.unwrap_err();
        assert!(e.to_string().contains("Is meshd running?"), "{e}");
    }
}
