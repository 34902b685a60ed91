//! One intercepted request: check its target, let the injection layer rewrite it, forward it
//! upstream, stream the answer back.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use tracing::{info, warn};

use super::connection::{ClientUpgrade, RequestBody, UpgradedClient};
use super::headers::{is_websocket_upgrade, request_host, strip_hop_by_hop};
use super::upstream::{self, GivenBack, PoolKey, Sender, UpstreamError, UpstreamPool};
use crate::addr::UpstreamAddr;
use crate::audit::{AuditEvent, EventLog, SecretUse};
use crate::injection::{
    decode, redact_headers, redact_reason_phrase, DecodeError, FrameRedactor, Injector,
    RedactingBody, Redactor, Verdict, Workload,
};
use crate::metrics::METRICS;
use crate::request_path::Readings;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Body of responses the proxy returns to clients.
pub type ProxyBody = BoxBody<Bytes, DecodeError>;

/// What every request on one intercepted connection shares.
pub struct ConnectionContext {
    /// The client's SNI name, verified by the TLS handshake with our leaf.
    pub server_name: Arc<str>,
    /// Where the client was going.
    pub upstream: UpstreamAddr,
    /// Who the client is.
    pub workload: Workload,
    /// The client's network namespace cookie.
    pub netns_cookie: u64,
    /// The client's container unit, when it runs in one.
    pub container: Option<Arc<str>>,
    /// The agent the workload belonged to when the connection opened.
    pub agent: Option<Arc<str>>,
    /// The injection layer.
    pub injector: Arc<dyn Injector>,
    /// Upstream connections.
    pub pool: Arc<UpstreamPool>,
    /// Where requests are audited.
    pub events: Arc<EventLog>,
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disposition {
    /// Sent upstream and answered.
    Forwarded,
    /// Refused before any decision: a method or path the proxy does not forward.
    Rejected,
    /// For another host than the TLS session's.
    Misdirected,
    /// Blocked by an access rule, or a secret that could not be injected.
    Blocked,
    /// The upstream failed, its answer was refused, or a secret it needs has no usable
    /// value.
    Failed,
}

impl Disposition {
    fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Rejected => "rejected",
            Self::Misdirected => "misdirected",
            Self::Blocked => "blocked",
            Self::Failed => "failed",
        }
    }
}

/// What a request's audit event says besides its method and status: every way out of
/// [`respond`] gives one, and [`serve`] records it, once.
struct Outcome {
    disposition: Disposition,
    /// The path decided on (the normalized one, once there is one).
    path: String,
    /// The secrets injected into the request.
    secrets: Vec<SecretUse>,
}

impl Outcome {
    fn new(disposition: Disposition, path: &str, secrets: Vec<SecretUse>) -> Self {
        Self {
            disposition,
            path: path.to_owned(),
            secrets,
        }
    }
}

impl ConnectionContext {
    fn audit(&self, method: http::Method, status: StatusCode, outcome: Outcome) {
        self.events.record(AuditEvent {
            agent: self.agent.clone(),
            cgroup_id: self.workload.cgroup_id.0,
            pid: self.workload.pid,
            netns_cookie: self.netns_cookie,
            container: self.container.clone(),
            secrets: outcome.secrets,
            host: Arc::clone(&self.server_name),
            method,
            path: outcome.path,
            status: status.as_u16(),
            outcome: outcome.disposition.as_str(),
        });
    }
}

/// Refuses an upstream's answer the agent must not get: a 502 saying why.
fn refuse_answer(
    method: &http::Method,
    path: &str,
    injected: Vec<SecretUse>,
    reason: &str,
) -> (Response<ProxyBody>, Outcome) {
    warn!(%method, %path, %reason, "refused the upstream's answer");
    (
        plain(StatusCode::BAD_GATEWAY, reason),
        Outcome::new(Disposition::Failed, path, injected),
    )
}

fn plain(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(format!("appliance: {message}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serves one request. Never fails: problems become error responses.
pub async fn serve(
    context: Arc<ConnectionContext>,
    request: Request<RequestBody>,
) -> Response<ProxyBody> {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let (response, outcome) = respond(&context, request).await;
    METRICS
        .request_duration
        .observe(started.elapsed().as_secs_f64());
    context.audit(method, response.status(), outcome);
    response
}

async fn respond(
    context: &ConnectionContext,
    mut request: Request<RequestBody>,
) -> (Response<ProxyBody>, Outcome) {
    // CONNECT would turn the connection into a tunnel the proxy cannot inspect, and TRACE
    // echoes the request, injected credentials included: neither has a place here.
    if matches!(
        *request.method(),
        http::Method::CONNECT | http::Method::TRACE
    ) {
        warn!(method = %request.method(), "refused a method that is not forwarded on intercepted connections");
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT and TRACE are not forwarded on intercepted connections",
        );
        response.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        let outcome = Outcome::new(Disposition::Rejected, request.uri().path(), Vec::new());
        return (response, outcome);
    }
    // A request for another host than the TLS session was made for must not get that host's
    // credentials (RFC 9110 §7.4, 421 Misdirected Request).
    let default_port = context.upstream.0.port();
    match request_host(request.uri(), request.headers()) {
        Some((host, port))
            if host == *context.server_name && port.unwrap_or(default_port) == default_port => {}
        _ => {
            // Host and path only: an agent's own key may sit in the query.
            warn!(server_name = %context.server_name, host = ?request_host(request.uri(), request.headers()), path = %request.uri().path(), "request for another host than the TLS server name");
            return (
                plain(
                    StatusCode::MISDIRECTED_REQUEST,
                    "this connection only serves the host named in its TLS handshake",
                ),
                Outcome::new(Disposition::Misdirected, request.uri().path(), Vec::new()),
            );
        }
    }
    let version = request.version();
    let upgrade = version == Version::HTTP_11 && is_websocket_upgrade(request.headers());
    let client_upgrade = if upgrade {
        request.extensions_mut().remove::<ClientUpgrade>()
    } else {
        None
    };
    let (mut parts, body) = request.into_parts();
    let method = parts.method.clone();
    // Decide on every reading of the path, and forward it as sent: what the rules saw
    // covers however the upstream resolves it, and a signature over it stays valid.
    let readings = match Readings::of(parts.uri.path()) {
        Ok(readings) => readings,
        Err(error) => {
            // The path only: an agent's own key may sit in the query.
            info!(%method, path = %parts.uri.path(), %error, "request refused: its path cannot be read unambiguously");
            return (
                plain(StatusCode::BAD_REQUEST, &error.to_string()),
                Outcome::new(Disposition::Rejected, parts.uri.path(), Vec::new()),
            );
        }
    };
    let path = readings.normalized().to_owned();
    let (injected, redactors) = match context.injector.prepare(
        &context.server_name,
        context.agent.as_deref(),
        &readings,
        &mut parts,
    ) {
        Verdict::Forward {
            injected,
            redactors,
        } => (injected, redactors),
        Verdict::Block { reason } => {
            // Without the path: the agent chooses it, and the audit keeps it, cut to size.
            info!(%method, %reason, "request blocked");
            return (
                plain(StatusCode::FORBIDDEN, &reason),
                Outcome::new(Disposition::Blocked, &path, Vec::new()),
            );
        }
        Verdict::Unavailable { secret, reason } => {
            return (
                plain(StatusCode::BAD_GATEWAY, &reason),
                Outcome::new(Disposition::Failed, &path, vec![secret]),
            );
        }
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade && !redactors.is_empty() {
        // Compressed messages (permessage-deflate) would hide an echoed secret.
        parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    }
    // The client already got its 100 Continue from us as soon as the body was wanted.
    parts.headers.remove(header::EXPECT);
    if !redactors.is_empty() {
        // A compressed answer could hide an echoed secret from the redactor.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }

    let key = PoolKey {
        upstream: context.upstream,
        server_name: Arc::clone(&context.server_name),
        // An HTTP/1.1 client gets its own upstream HTTP/1.1 connection per request in flight:
        // funnelling every such client into one shared HTTP/2 connection serialized them on
        // its single connection task (measured: 33% -> 37% of direct in cargo xtask bench).
        http11_only: upgrade || version == Version::HTTP_11,
    };
    let result = async {
        let mut sender = context.pool.checkout(&key).await?;
        let request = upstream_request(parts, body, &sender, context)?;
        let sent = std::time::Instant::now();
        let response = upstream::send(&mut sender, request).await?;
        METRICS
            .upstream_latency
            .observe(sent.elapsed().as_secs_f64());
        let (parts, body) = response.into_parts();
        let body = match sender {
            Sender::Http1(sender) if !upgrade => {
                GivenBack::lent(body, Arc::clone(&context.pool), key, sender)
            }
            _ => GivenBack::kept(body),
        };
        Ok::<_, UpstreamError>(Response::from_parts(parts, body))
    }
    .await;
    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            return (
                upstream_failure(&error),
                Outcome::new(Disposition::Failed, &path, injected),
            );
        }
    };
    let status = response.status();
    if status == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_none() {
        return refuse_answer(
            &method,
            &path,
            injected,
            "the upstream switched protocols without being asked to",
        );
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // The appliance removed the offer, so that messages stay readable.
        if !redactors.is_empty()
            && response
                .headers()
                .contains_key(header::SEC_WEBSOCKET_EXTENSIONS)
        {
            return refuse_answer(
                &method,
                &path,
                injected,
                "the upstream chose a WebSocket extension that was not offered",
            );
        }
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(splice_upgraded(
                client_upgrade.claim(),
                upstream_upgrade,
                redactors.clone(),
            ));
        }
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(
        &mut parts.headers,
        status == StatusCode::SWITCHING_PROTOCOLS,
    );
    let body = if redactors.is_empty() {
        body.map_err(Into::into).boxed()
    } else {
        let echoed_in_headers = redact_headers(&redactors, &mut parts.headers) > 0;
        if redact_reason_phrase(&redactors, &mut parts.extensions) | echoed_in_headers {
            warn!(%method, %path, "the upstream echoed an injected secret in the status line or headers; masked");
        }
        match inspected_body(body, &mut parts.headers, redactors) {
            Ok(body) => body,
            Err(coding) => {
                return refuse_answer(
                    &method,
                    &path,
                    injected,
                    &format!("the upstream answered in content-coding {coding:?}, which cannot be inspected for echoed secrets"),
                )
            }
        }
    };
    (
        Response::from_parts(parts, body),
        Outcome::new(Disposition::Forwarded, &path, injected),
    )
}

/// The body of an answer to a request that carried secrets, with their echoes masked. An
/// upstream that compressed despite Accept-Encoding: identity has its body decoded (and
/// `headers` lose Content-Encoding and Content-Length), so that what the agent reads is what
/// was inspected; a content-coding that cannot be decoded is returned as the error.
fn inspected_body(
    body: GivenBack,
    headers: &mut http::HeaderMap,
    redactors: Vec<Arc<Redactor>>,
) -> Result<ProxyBody, String> {
    let coding = headers
        .get(header::CONTENT_ENCODING)
        .map(|coding| coding.to_str().unwrap_or("(not text)").to_owned())
        .filter(|coding| !coding.trim().eq_ignore_ascii_case("identity"));
    let Some(coding) = coding else {
        return Ok(RedactingBody::new(body, redactors)
            .map_err(Into::into)
            .boxed());
    };
    let decoded = decode(body, &coding).ok_or_else(|| coding.clone())?;
    info!(%coding, "the upstream compressed its answer despite Accept-Encoding: identity; decoding it for inspection");
    headers.remove(header::CONTENT_ENCODING);
    headers.remove(header::CONTENT_LENGTH);
    Ok(RedactingBody::new(decoded, redactors).boxed())
}

fn upstream_request(
    mut parts: http::request::Parts,
    body: RequestBody,
    sender: &Sender,
    context: &ConnectionContext,
) -> Result<Request<RequestBody>, UpstreamError> {
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let port = context.upstream.0.port();
    let authority_text = if port == 443 {
        context.server_name.to_string()
    } else {
        format!("{}:{port}", context.server_name)
    };
    let invalid = |_| UpstreamError::ServerName {
        server_name: context.server_name.to_string(),
    };
    let authority: Authority = authority_text.parse().map_err(invalid)?;
    if sender.is_http2() {
        parts.version = Version::HTTP_2;
        parts.uri = Uri::builder()
            .scheme(Scheme::HTTPS)
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| UpstreamError::ServerName {
                server_name: context.server_name.to_string(),
            })?;
        parts.headers.remove(header::HOST);
    } else {
        parts.version = Version::HTTP_11;
        parts.uri = Uri::from(path_and_query);
        let host =
            HeaderValue::from_str(authority.as_str()).map_err(|_| UpstreamError::ServerName {
                server_name: context.server_name.to_string(),
            })?;
        parts.headers.insert(header::HOST, host);
    }
    Ok(Request::from_parts(parts, body))
}

fn upstream_failure(error: &UpstreamError) -> Response<ProxyBody> {
    warn!(error = %error, "upstream request failed");
    let status = match error {
        UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    plain(status, &error.to_string())
}

/// Relays an upgraded (WebSocket) connection. When the request carried secrets, the
/// upstream's frames pass through a [`FrameRedactor`]; the client's go out as they are.
async fn splice_upgraded(
    client: tokio::sync::oneshot::Receiver<UpgradedClient>,
    upstream: hyper::upgrade::OnUpgrade,
    redactors: Vec<Arc<Redactor>>,
) {
    let upstream = match upstream.await {
        Ok(upstream) => upstream,
        Err(error) => {
            warn!(%error, "protocol upgrade failed");
            return;
        }
    };
    let Ok(mut client) = client.await else {
        tracing::debug!("the client connection ended before its upgrade");
        return;
    };
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if redactors.is_empty() {
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(%error, "upgraded connection ended");
        }
        return;
    }
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let outbound = async {
        let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
    };
    let inbound = async {
        let mut frames = FrameRedactor::new(redactors);
        let mut buffer = vec![0u8; 16 * 1024];
        let mut out = Vec::new();
        loop {
            let read = match upstream_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            if let Err(error) = frames.feed(&buffer[..read], &mut out) {
                warn!(%error, "closing a WebSocket connection");
                let _ = client_write.shutdown().await;
                return;
            }
            if client_write.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        frames.finish(&mut out);
        let _ = client_write.write_all(&out).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(outbound, inbound);
}
