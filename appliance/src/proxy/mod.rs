//! The proxy: per redirected connection, read the TLS ClientHello, then either pass the
//! connection through untouched or terminate TLS and serve HTTP through the injection layer.
//!
//! Stages, each testable alone: [`read_client_hello`] (classify), [`Proxy::pass_through`]
//! (byte copy), TLS termination with leaves from [`crate::tls::LeafCache`],
//! [`connection::serve`] (HTTP on the client connection), [`request::serve`] (one request),
//! [`upstream::UpstreamPool`] (verified upstream connections).

pub mod admission;
pub mod connection;
pub mod headers;
pub mod request;
pub mod upstream;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::{Accepted, Acceptor};
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::addr::UpstreamAddr;
use crate::audit::EventLog;
use crate::capture::Redirect;
use crate::injection::{Injector, Workload};
use crate::metrics::{self, OpenConnection, METRICS};
use crate::swap::Swappable;
use crate::tls::{LeafCache, TlsConfigError, UpstreamTls};
use connection::HttpSettings;
use request::ConnectionContext;
use upstream::{PoolSettings, UpstreamPool};

/// Largest ClientHello we wait for; real ones are a few kilobytes.
const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// What happens to connections the appliance has no reason to intercept (no secret for the
/// host, no SNI, or not TLS at all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unintercepted {
    /// Carry them to their destination byte for byte.
    PassThrough,
    /// Close them.
    Refuse,
}

/// Limits and policies of the proxy.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// `SO_MARK` of upstream sockets (0: none).
    pub own_mark: u32,
    /// Limit on connecting (TCP and TLS) to an upstream.
    pub connect_timeout: Duration,
    /// Limit on receiving the ClientHello and completing the client TLS handshake.
    pub handshake_timeout: Duration,
    /// Limit on receiving a request's headers (also the keep-alive idle limit).
    pub header_read_timeout: Duration,
    /// Largest request header block accepted.
    pub max_header_bytes: usize,
    /// Policy for connections not intercepted.
    pub unintercepted: Unintercepted,
    /// How many connections are held at once, in all and per cgroup.
    pub limits: admission::Limits,
}

/// How a connection opened.
enum Opening {
    /// A complete TLS ClientHello, and every byte read so far.
    Tls {
        accepted: Box<Accepted>,
        seen: Vec<u8>,
    },
    /// Not TLS (or not parseable): the bytes read so far.
    Other { seen: Vec<u8> },
}

/// Reads until a whole ClientHello has arrived, keeping the bytes so that a connection that
/// will not be intercepted can be replayed upstream unchanged.
async fn read_client_hello(stream: &mut TcpStream) -> io::Result<Opening> {
    let mut acceptor = Acceptor::default();
    // Read straight into `seen`: a buffer on the stack would stay in every connection's
    // task for the connection's whole life.
    let mut seen = Vec::new();
    loop {
        let start = seen.len();
        seen.reserve(4096);
        let read = stream.read_buf(&mut seen).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if seen.len() > MAX_CLIENT_HELLO {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "ClientHello too large",
            ));
        }
        let mut fresh = &seen[start..];
        while !fresh.is_empty() {
            if acceptor.read_tls(&mut fresh)? == 0 {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Ok(Opening::Tls {
                    accepted: Box::new(accepted),
                    seen,
                })
            }
            Ok(None) => continue,
            // Not TLS: `seen` already holds every byte, for a faithful replay.
            Err(_) => return Ok(Opening::Other { seen }),
        }
    }
}

/// The proxy shared by all connections.
pub struct Proxy {
    injector: Arc<dyn Injector>,
    server_config: Arc<ServerConfig>,
    events: Arc<EventLog>,
    runtime: Swappable<Runtime>,
    admission: admission::Admission,
}

/// What a reload may replace. A connection keeps the runtime it started with, so a reload
/// never drops one.
struct Runtime {
    pool: Arc<UpstreamPool>,
    settings: ProxySettings,
}

impl Runtime {
    fn new(upstream_tls: UpstreamTls, settings: ProxySettings) -> Self {
        let pool = UpstreamPool::new(
            upstream_tls,
            PoolSettings {
                own_mark: settings.own_mark,
                connect_timeout: settings.connect_timeout,
                max_idle_per_key: 64,
            },
        );
        Self {
            pool: Arc::new(pool),
            settings,
        }
    }
}

impl Proxy {
    /// A proxy that terminates TLS with leaves from `leaves` and verifies upstreams with
    /// `upstream_tls`.
    pub fn new(
        injector: Arc<dyn Injector>,
        leaves: Arc<LeafCache>,
        upstream_tls: UpstreamTls,
        events: Arc<EventLog>,
        settings: ProxySettings,
    ) -> Result<Self, TlsConfigError> {
        Ok(Self {
            injector,
            server_config: crate::tls::server_config(leaves)?,
            events,
            runtime: Swappable::new(Runtime::new(upstream_tls, settings)),
            admission: admission::Admission::default(),
        })
    }

    /// Replaces upstream trust and settings for new connections; open ones keep theirs.
    pub fn reconfigure(&self, upstream_tls: UpstreamTls, settings: ProxySettings) {
        self.runtime.store(Runtime::new(upstream_tls, settings));
    }

    /// Serves one redirected connection until it ends, or until `shutdown` asks HTTP
    /// connections to finish their current requests and close.
    pub async fn serve(
        self: Arc<Self>,
        mut stream: TcpStream,
        redirect: Redirect,
        shutdown: watch::Receiver<bool>,
    ) {
        let runtime = self.runtime.load();
        let _admitted = match self
            .admission
            .admit(redirect.cgroup_id, runtime.settings.limits)
        {
            Ok(admitted) => admitted,
            Err(refusal) => {
                // Counted, not logged one by one: a flood of them would flood the journal.
                debug!(
                    cgroup_id = redirect.cgroup_id.0,
                    reason = refusal.reason(),
                    "connection limit reached; closing"
                );
                metrics::count(&METRICS.refused_connections, &[refusal.reason()]);
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let workload = Workload {
            cgroup_id: redirect.cgroup_id,
            pid: redirect.pid,
        };
        let upstream = UpstreamAddr::from(redirect.original_dst);
        let opening = match tokio::time::timeout(
            runtime.settings.handshake_timeout,
            // Boxed: rustls' acceptor is large, and only needed until the ClientHello.
            Box::pin(read_client_hello(&mut stream)),
        )
        .await
        {
            Ok(Ok(opening)) => opening,
            Ok(Err(error)) => {
                debug!(%error, "connection closed before a ClientHello");
                return;
            }
            Err(_) => {
                debug!("no ClientHello in time; closing");
                return;
            }
        };
        let (accepted, seen, server_name) = match opening {
            Opening::Tls { accepted, seen } => {
                let name = accepted
                    .client_hello()
                    .server_name()
                    .map(str::to_ascii_lowercase);
                (Some(accepted), seen, name)
            }
            Opening::Other { seen } => (None, seen, None),
        };
        // The agent is resolved once, here, and carried down: interception, injection,
        // access rules and the audit trail of this connection all see the same one.
        let agent = match (&accepted, &server_name) {
            (Some(_), Some(_)) => self.injector.agent(&workload),
            _ => None,
        };
        match (accepted, server_name) {
            (Some(accepted), Some(name)) if self.injector.intercepts(&name, agent.as_deref()) => {
                // The handshake starts over from the bytes received, on a connection of our own.
                drop(accepted);
                // Debug: one line per connection is the journal's load at handshake rates;
                // the audit log has every request with its connection's facts.
                debug!(event = "intercepted", server_name = %name, "terminating TLS");
                metrics::count(&METRICS.connections, &["intercepted"]);
                let _open = OpenConnection::of("intercepted");
                // Built before the handshake, so that the connection's facts live once, here,
                // and not also in every state of the task that serves it.
                let context = Arc::new(ConnectionContext {
                    agent,
                    server_name: Arc::from(name),
                    upstream,
                    workload,
                    netns_cookie: redirect.netns_cookie,
                    container: redirect.container,
                    injector: Arc::clone(&self.injector),
                    pool: Arc::clone(&runtime.pool),
                    events: Arc::clone(&self.events),
                });
                self.intercept(&runtime, stream, seen, context, shutdown)
                    .await;
            }
            (_, name) => match runtime.settings.unintercepted {
                Unintercepted::PassThrough => {
                    debug!(server_name = ?name, "passing through");
                    metrics::count(&METRICS.connections, &["pass_through"]);
                    let _open = OpenConnection::of("pass_through");
                    pass_through(&runtime, stream, &seen, upstream).await;
                }
                Unintercepted::Refuse => {
                    info!(event = "refused", server_name = ?name, "no secret for this host; refusing by policy");
                    metrics::count(&METRICS.connections, &["refused"]);
                }
            },
        }
    }
}

async fn pass_through(
    runtime: &Runtime,
    mut client: TcpStream,
    seen: &[u8],
    upstream: UpstreamAddr,
) {
    let result = async {
        let mut server = upstream::connect_marked(
            upstream,
            runtime.settings.own_mark,
            runtime.settings.connect_timeout,
        )
        .await
        .map_err(io::Error::other)?;
        server.write_all(seen).await?;
        tokio::io::copy_bidirectional(&mut client, &mut server).await
    }
    .await;
    match result {
        Ok((sent, received)) => debug!(%upstream, sent, received, "pass-through closed"),
        Err(error) => debug!(%upstream, %error, "pass-through ended with an error"),
    }
}

impl Proxy {
    async fn intercept(
        &self,
        runtime: &Runtime,
        stream: TcpStream,
        // Taken by the TLS stream, which frees it once the handshake has consumed it.
        received: Vec<u8>,
        context: Arc<ConnectionContext>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let server_name = &context.server_name;
        // Boxed, as is the stream it yields: an idle connection's task then holds pointers,
        // not the TLS state twice over.
        let handshake = Box::pin(crate::tls::stream::accept(
            stream,
            Arc::clone(&self.server_config),
            received,
        ));
        let tls = match tokio::time::timeout(runtime.settings.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => Box::new(tls),
            Ok(Err(error)) => {
                // Typically a client that does not trust the appliance CA.
                warn!(%server_name, %error, "client TLS handshake failed; does the client trust the appliance CA?");
                let reason = client_handshake_failure(&error);
                metrics::count(&METRICS.handshake_failures, &["client", reason]);
                return;
            }
            Err(_) => {
                debug!(%server_name, "client TLS handshake timed out");
                metrics::count(&METRICS.handshake_failures, &["client", "timeout"]);
                return;
            }
        };
        let handler = move |request| request::serve(Arc::clone(&context), request);
        let settings = HttpSettings {
            header_read_timeout: runtime.settings.header_read_timeout,
            max_header_bytes: runtime.settings.max_header_bytes,
        };
        let served = connection::serve(tls, settings, handler, &mut shutdown).await;
        debug!(
            requests = served.requests,
            idle_releases = served.idle_releases,
            "client connection closed"
        );
    }
}

/// Why a client's handshake failed, as a bounded metric label: the client refused our leaf
/// (it does not trust the appliance CA), the client spoke bad TLS, or the connection broke.
fn client_handshake_failure(error: &io::Error) -> &'static str {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::UnsupportedCertificate,
        )) => "certificate_rejected",
        Some(_) => "protocol",
        None => "io",
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
