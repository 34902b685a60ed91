//! Connections to upstreams: marked TCP (capture lets it through), verified TLS, and a pool
//! of HTTP connections keyed by address, server name and protocol.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use super::connection::RequestBody;
use crate::addr::UpstreamAddr;
use crate::metrics::{self, OpenConnection, METRICS};
use crate::tls::{UpstreamTls, ALPN_H2};

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed.
    #[error("connecting to upstream {upstream} failed")]
    Connect {
        /// The upstream.
        upstream: UpstreamAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Connect or TLS handshake took too long.
    #[error("upstream {upstream} did not answer in time")]
    Timeout {
        /// The upstream.
        upstream: UpstreamAddr,
    },
    /// The upstream's certificate did not verify.
    #[error("upstream {upstream} presented a certificate that does not verify for {server_name}: {reason}")]
    Certificate {
        /// The upstream.
        upstream: UpstreamAddr,
        /// The name it had to prove.
        server_name: String,
        /// Verifier's reason.
        reason: String,
    },
    /// The TLS handshake failed otherwise.
    #[error("TLS with upstream {upstream} failed")]
    Tls {
        /// The upstream.
        upstream: UpstreamAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The SNI name is not a valid DNS name.
    #[error("{server_name:?} is not a valid server name")]
    ServerName {
        /// The name.
        server_name: String,
    },
    /// HTTP with the upstream failed.
    #[error("HTTP exchange with upstream failed")]
    Http(#[from] hyper::Error),
}

/// Opens a TCP connection to `upstream` carrying `mark` (0: none), so that capture does not
/// send it back to the engine even when the daemon runs inside an intercepted cgroup.
pub async fn connect_marked(
    upstream: UpstreamAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let connect_error = |source| UpstreamError::Connect { upstream, source };
    let socket = match upstream.0 {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(connect_error)?;
    if mark != 0 {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(|errno| connect_error(errno.into()))?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(upstream.0))
        .await
        .map_err(|_| UpstreamError::Timeout { upstream })?
        .map_err(connect_error)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Identifies interchangeable upstream connections.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Where the connection goes.
    pub upstream: UpstreamAddr,
    /// The TLS server name it verified.
    pub server_name: Arc<str>,
    /// Whether only HTTP/1.1 may be used (upgrades, and requests of HTTP/1.1 clients).
    pub http11_only: bool,
}

/// A ready connection's request handle.
pub enum Sender {
    /// HTTP/1.1: one request at a time.
    Http1(http1::SendRequest<RequestBody>),
    /// HTTP/2: shared by concurrent requests.
    Http2(http2::SendRequest<RequestBody>),
}

impl Sender {
    /// Whether this connection speaks HTTP/2.
    pub fn is_http2(&self) -> bool {
        matches!(self, Self::Http2(_))
    }
}

/// Settings of the pool.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// `SO_MARK` of upstream sockets.
    pub own_mark: u32,
    /// Limit on TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per key.
    pub max_idle_per_key: usize,
}

/// Upstream HTTP connections, reused across client connections.
pub struct UpstreamPool {
    tls: UpstreamTls,
    settings: PoolSettings,
    idle: Mutex<HashMap<PoolKey, Vec<Sender>>>,
}

impl UpstreamPool {
    /// An empty pool.
    pub fn new(tls: UpstreamTls, settings: PoolSettings) -> Self {
        Self {
            tls,
            settings,
            idle: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Sender>>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A ready connection for `key`: an idle one, or a new one.
    pub async fn checkout(&self, key: &PoolKey) -> Result<Sender, UpstreamError> {
        while let Some(mut sender) = self.take_idle(key) {
            // A connection given back as its answer ended may still be finishing that
            // exchange: a moment, or an error if it is closing.
            if let Sender::Http1(http1) = &mut sender {
                if http1.ready().await.is_err() {
                    continue;
                }
            }
            return Ok(sender);
        }
        // Boxed: the TCP and TLS handshakes' state would otherwise be part of every
        // request's future, which is allocated and moved for each request.
        Box::pin(self.connect(key)).await
    }

    fn take_idle(&self, key: &PoolKey) -> Option<Sender> {
        let mut idle = self.lock();
        let senders = idle.get_mut(key)?;
        senders.retain(|sender| match sender {
            Sender::Http1(sender) => !sender.is_closed(),
            Sender::Http2(sender) => !sender.is_closed(),
        });
        // HTTP/2 connections stay pooled and are shared; HTTP/1.1 ones are lent out, ready
        // ones first.
        let shared = senders.iter().find_map(|sender| match sender {
            Sender::Http2(sender) if sender.is_ready() => Some(Sender::Http2(sender.clone())),
            _ => None,
        });
        shared.or_else(|| {
            let http1 = |ready: bool| {
                senders.iter().position(|sender| match sender {
                    Sender::Http1(sender) => sender.is_ready() || !ready,
                    Sender::Http2(_) => false,
                })
            };
            let position = http1(true).or_else(|| http1(false))?;
            Some(senders.swap_remove(position))
        })
    }

    /// Takes an HTTP/1.1 connection back once the answer it carried was read to its end.
    fn give_back(&self, key: PoolKey, sender: http1::SendRequest<RequestBody>) {
        let mut idle = self.lock();
        let senders = idle.entry(key).or_default();
        if senders.len() < self.settings.max_idle_per_key {
            senders.push(Sender::Http1(sender));
        }
    }

    async fn connect(&self, key: &PoolKey) -> Result<Sender, UpstreamError> {
        let upstream = key.upstream;
        let server_name = ServerName::try_from(key.server_name.to_string()).map_err(|_| {
            UpstreamError::ServerName {
                server_name: key.server_name.to_string(),
            }
        })?;
        let config = if key.http11_only {
            Arc::clone(&self.tls.http11_only)
        } else {
            Arc::clone(&self.tls.any_version)
        };
        let timeout = self.settings.connect_timeout;
        let tls = tokio::time::timeout(timeout, async {
            let tcp = connect_marked(upstream, self.settings.own_mark, timeout).await?;
            TlsConnector::from(config)
                .connect(server_name, tcp)
                .await
                .map_err(|source| classify_tls_error(upstream, &key.server_name, source))
        })
        .await
        .map_err(|_| UpstreamError::Timeout { upstream })
        .and_then(|connected| connected)
        .inspect_err(|error| {
            let reason = match error {
                UpstreamError::Connect { .. } => "connect",
                UpstreamError::Timeout { .. } => "timeout",
                UpstreamError::Certificate { .. } => "certificate",
                _ => "protocol",
            };
            metrics::count(&METRICS.handshake_failures, &["upstream", reason]);
        })?;
        // Counted open until its connection task ends.
        let open = OpenConnection::upstream();
        let http2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
        let io = TokioIo::new(tls);
        if http2 {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                let _open = open;
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream HTTP/2 connection ended");
                }
            });
            self.lock()
                .entry(key.clone())
                .or_default()
                .push(Sender::Http2(sender.clone()));
            Ok(Sender::Http2(sender))
        } else {
            let (sender, connection) = http1::handshake(io).await?;
            tokio::spawn(async move {
                let _open = open;
                if let Err(error) = connection.with_upgrades().await {
                    tracing::debug!(%error, "upstream HTTP/1.1 connection ended");
                }
            });
            Ok(Sender::Http1(sender))
        }
    }
}

fn classify_tls_error(
    upstream: UpstreamAddr,
    server_name: &str,
    source: io::Error,
) -> UpstreamError {
    let certificate_problem = source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|error| match error {
            rustls::Error::InvalidCertificate(reason) => Some(format!("{reason:?}")),
            _ => None,
        });
    match certificate_problem {
        Some(reason) => UpstreamError::Certificate {
            upstream,
            server_name: server_name.to_owned(),
            reason,
        },
        None => UpstreamError::Tls { upstream, source },
    }
}

/// An upstream answer's body that gives its HTTP/1.1 connection back to the pool when read
/// to the end, so that no task has to wait for the connection to be free (one spawned per
/// request cost 3% of the engine's CPU, docs/benchmarks.md). Dropped before its end, the
/// connection goes with it: hyper cannot reuse a connection with an unread answer.
pub struct GivenBack {
    body: Incoming,
    lent: Option<(Arc<UpstreamPool>, PoolKey, http1::SendRequest<RequestBody>)>,
}

impl GivenBack {
    /// `body`, whose connection `sender` returns to `pool` under `key` at its end.
    pub fn lent(
        body: Incoming,
        pool: Arc<UpstreamPool>,
        key: PoolKey,
        sender: http1::SendRequest<RequestBody>,
    ) -> Self {
        let mut given = Self {
            body,
            lent: Some((pool, key, sender)),
        };
        // An answer without a body (HEAD, 204, 304) may never be polled.
        if hyper::body::Body::is_end_stream(&given.body) {
            given.give_back();
        }
        given
    }

    /// `body` of a connection that is not lent: shared HTTP/2, or upgraded.
    pub fn kept(body: Incoming) -> Self {
        Self { body, lent: None }
    }

    fn give_back(&mut self) {
        if let Some((pool, key, sender)) = self.lent.take() {
            pool.give_back(key, sender);
        }
    }
}

impl hyper::body::Body for GivenBack {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.give_back(),
            std::task::Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.give_back(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Sends `request` on `sender`.
pub async fn send(
    sender: &mut Sender,
    request: Request<RequestBody>,
) -> Result<Response<Incoming>, UpstreamError> {
    Ok(match sender {
        Sender::Http1(sender) => sender.send_request(request).await?,
        Sender::Http2(sender) => sender.send_request(request).await?,
    })
}
