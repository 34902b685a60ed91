//! The admin API: JSON over HTTP/1.1 on a Unix socket.
//!
//! Only root, the daemon's own user and members of the admin group may use it: the socket is
//! 0660 with that group, and each connection's SO_PEERCRED is checked as well (a socket file
//! opened by other means, or a group change, does not bypass it). Refusals are audited.
//!
//! The API is thin: [`routes`] maps each endpoint to a handler in the file of its resource,
//! which reads the input as the model's type and calls the [control layer](crate::control).

mod access_rules;
mod agents;
mod ca;
mod error;
mod events;
mod health;
mod routes;
mod secrets;

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::unistd::{Gid, Group, Uid, User};
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::{debug, warn};

pub use error::ApiError;
pub use routes::ROUTES;

use crate::control::Control;
use crate::proxy::stop_requested;

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    /// Another process serves the socket.
    #[error("{} is in use by a running process; is another appliance daemon running?", path.display())]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// The admin group does not exist.
    #[error("admin group {group:?} does not exist; create it (groupadd {group}) or choose another with --admin-group")]
    NoGroup {
        /// The group.
        group: String,
    },
    /// A file operation failed.
    #[error("{action} {} failed", path.display())]
    Io {
        /// What was done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// API settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiSettings {
    /// Socket path.
    pub socket: PathBuf,
    /// Group whose members may administer the appliance (root always may).
    pub admin_group: Option<String>,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Limit on receiving a request (headers and body).
    pub request_timeout: Duration,
}

struct Access {
    admin_gid: Option<Gid>,
}

impl Access {
    fn allows(&self, uid: u32, gid: u32) -> bool {
        if uid == 0 || Uid::from_raw(uid) == Uid::effective() {
            return true;
        }
        let Some(admin) = self.admin_gid else {
            return false;
        };
        if Gid::from_raw(gid) == admin {
            return true;
        }
        // Supplementary groups of the peer's user.
        User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .and_then(|user| {
                let name = CString::new(user.name).ok()?;
                nix::unistd::getgrouplist(&name, user.gid).ok()
            })
            .is_some_and(|groups| groups.contains(&admin))
    }
}

fn bind_socket(
    settings: &ApiSettings,
    admin_gid: Option<Gid>,
) -> Result<UnixListener, ApiStartError> {
    let path = &settings.socket;
    let io_error = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ApiStartError::Io {
            action,
            path,
            source,
        }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ApiStartError::InUse { path: path.clone() });
        }
        std::fs::remove_file(path).map_err(io_error("removing stale", path))?;
    }
    let listener = UnixListener::bind(path).map_err(io_error("binding", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_error("setting permissions of", path))?;
    if let Some(gid) = admin_gid {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|errno| io_error("changing the group of", path)(errno.into()))?;
    }
    Ok(listener)
}

/// A bound admin API socket, ready to serve.
pub struct AdminApi {
    listener: UnixListener,
    access: Arc<Access>,
    settings: Arc<ApiSettings>,
}

/// Creates the socket (0660, admin group) so that clients can connect as soon as this returns.
pub fn bind(settings: ApiSettings) -> Result<AdminApi, ApiStartError> {
    let admin_gid = match &settings.admin_group {
        None => None,
        Some(group) => Some(
            Group::from_name(group)
                .ok()
                .flatten()
                .ok_or_else(|| ApiStartError::NoGroup {
                    group: group.clone(),
                })?
                .gid,
        ),
    };
    let listener = bind_socket(&settings, admin_gid)?;
    Ok(AdminApi {
        listener,
        access: Arc::new(Access { admin_gid }),
        settings: Arc::new(settings),
    })
}

impl AdminApi {
    /// Serves until `shutdown`, then removes the socket.
    pub async fn serve(self, control: Arc<Control>, mut shutdown: watch::Receiver<bool>) {
        let Self {
            listener,
            access,
            settings,
        } = self;
        loop {
            let stream = tokio::select! {
                () = stop_requested(&mut shutdown) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        warn!(%error, "admin API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let allowed = stream
                .peer_cred()
                .map(|cred| (access.allows(cred.uid(), cred.gid()), cred))
                .ok();
            let control = Arc::clone(&control);
            let header_timeout = settings.request_timeout;
            let settings = Arc::clone(&settings);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let control = Arc::clone(&control);
                    let settings = Arc::clone(&settings);
                    async move {
                        Ok::<_, std::convert::Infallible>(match allowed {
                            Some((true, _)) => handle(&control, &settings, request).await,
                            Some((false, cred)) => {
                                warn!(
                                    target: "appliance::audit",
                                    event = "admin_refused",
                                    uid = cred.uid(),
                                    gid = cred.gid(),
                                    pid = ?cred.pid(),
                                    method = %request.method(),
                                    path = %request.uri().path(),
                                    "admin API refused a caller outside the admin group"
                                );
                                json_error(&ApiError::new(
                                    StatusCode::FORBIDDEN,
                                    "forbidden",
                                    "only root and members of the admin group may use this socket",
                                ))
                            }
                            None => json_error(&ApiError::new(
                                StatusCode::FORBIDDEN,
                                "forbidden",
                                "cannot identify the caller",
                            )),
                        })
                    }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = connection.await {
                    debug!(%error, "admin API connection ended");
                }
            });
        }
        let _ = std::fs::remove_file(&settings.socket);
    }
}

/// A JSON response.
fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    response
}

fn json_error(error: &ApiError) -> Response<Full<Bytes>> {
    json_response(error.status, &error.body())
}

/// Reads a JSON request body within the size and time limits.
async fn json_body(settings: &ApiSettings, request: Request<Incoming>) -> Result<Value, ApiError> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(';')
                .next()
                .is_some_and(|m| m.trim() == "application/json")
        });
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    let limited = Limited::new(request.into_body(), settings.max_body_bytes);
    let collected = tokio::time::timeout(settings.request_timeout, limited.collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the request body arrived too slowly",
            )
        })?
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {} bytes", settings.max_body_bytes),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&collected).map_err(|error| ApiError {
        status: StatusCode::BAD_REQUEST,
        kind: "validation",
        message: format!("the body is not valid JSON: {error}"),
        field: Some("body".into()),
    })
}

async fn handle(
    control: &Control,
    settings: &ApiSettings,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let Some((route, id)) = routes::find(&method, &path) else {
        let known_path = ROUTES
            .iter()
            .any(|route| routes::matches(route.path, &path).is_some());
        return json_error(&if known_path {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {path}"),
            )
        } else {
            ApiError::not_found(format!("no such endpoint: {path}"))
        });
    };
    let body = if route.takes_body {
        match json_body(settings, request).await {
            Ok(body) => body,
            Err(error) => return json_error(&error),
        }
    } else {
        Value::Null
    };
    let call = routes::Call {
        id: id.as_deref().unwrap_or_default(),
        query: &query,
        body,
    };
    match routes::dispatch(control, route, call).await {
        Ok(routes::Reply::Json(status, body)) => json_response(status, &body),
        Ok(routes::Reply::Empty) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        Ok(routes::Reply::Metrics(text)) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        Ok(routes::Reply::Pem(pem)) => {
            let mut response = Response::new(Full::new(Bytes::from(pem)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                "application/x-pem-file".parse().unwrap(),
            );
            response
        }
        Err(error) => json_error(&error),
    }
}
