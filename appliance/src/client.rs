//! The CLI's side of the admin API: one HTTP/1.1 request per call over the Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("cannot reach the appliance daemon at {}: {source}; is the service running (systemctl status appliance)? is the socket path right (--socket, APPLIANCE_SOCKET)?", socket.display())]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Error type.
        kind: String,
        /// Message.
        message: String,
        /// Field, for validation errors.
        field: Option<String>,
    },
    /// The exchange itself failed.
    #[error("talking to the daemon failed: {0}")]
    Protocol(String),
}

/// A successful answer.
pub enum Answer {
    /// JSON.
    Json(Value),
    /// Text (PEM).
    Text(String),
    /// No content.
    Empty,
}

/// `text` percent-encoded but for unreserved characters: safe as a path segment and as a
/// query value.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

/// A client of one socket.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends one request.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                })?;
        let protocol = |error: &dyn std::fmt::Display| ClientError::Protocol(error.to_string());
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| protocol(&e))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "appliance");
        let payload = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(payload)).map_err(|e| protocol(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| protocol(&e))?;
        let status = response.status();
        let is_json = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| protocol(&e))?
            .to_bytes();
        if !status.is_success() {
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let error = &body["error"];
            return Err(ClientError::Api {
                status,
                kind: error["type"].as_str().unwrap_or("unknown").to_owned(),
                message: error["message"]
                    .as_str()
                    .map_or_else(|| format!("the daemon answered {status}"), str::to_owned),
                field: error["field"].as_str().map(str::to_owned),
            });
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(Answer::Empty);
        }
        if is_json {
            serde_json::from_slice(&bytes)
                .map(Answer::Json)
                .map_err(|e| protocol(&e))
        } else {
            Ok(Answer::Text(String::from_utf8_lossy(&bytes).into_owned()))
        }
    }
}
