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
    Http1(http1::SendRequest<Incoming>),
    /// HTTP/2: shared by concurrent requests.
    Http2(http2::SendRequest<Incoming>),
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
        if let Some(sender) = self.take_idle(key) {
            return Ok(sender);
        }
        self.connect(key).await
    }

    fn take_idle(&self, key: &PoolKey) -> Option<Sender> {
        let mut idle = self.lock();
        let senders = idle.get_mut(key)?;
        senders.retain(|sender| match sender {
            Sender::Http1(sender) => !sender.is_closed(),
            Sender::Http2(sender) => !sender.is_closed(),
        });
        // HTTP/2 connections stay pooled and are shared; HTTP/1.1 ones are lent out.
        let shared = senders.iter().find_map(|sender| match sender {
            Sender::Http2(sender) if sender.is_ready() => Some(Sender::Http2(sender.clone())),
            _ => None,
        });
        shared.or_else(|| {
            let position = senders.iter().position(|sender| match sender {
                Sender::Http1(sender) => sender.is_ready(),
                Sender::Http2(_) => false,
            })?;
            Some(senders.swap_remove(position))
        })
    }

    /// Returns an HTTP/1.1 connection once its current response is fully read.
    pub fn recycle(self: &Arc<Self>, key: PoolKey, mut sender: http1::SendRequest<Incoming>) {
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = pool.lock();
                let senders = idle.entry(key).or_default();
                if senders.len() < pool.settings.max_idle_per_key {
                    senders.push(Sender::Http1(sender));
                }
            }
        });
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

/// Sends `request` on `sender`.
pub async fn send(
    sender: &mut Sender,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, UpstreamError> {
    Ok(match sender {
        Sender::Http1(sender) => sender.send_request(request).await?,
        Sender::Http2(sender) => sender.send_request(request).await?,
    })
}
