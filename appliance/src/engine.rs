//! The engine: accepts redirected connections, learns where each was going, and carries it
//! there on a socket that capture never redirects.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument as _};

use crate::addr::{ClientAddr, UpstreamAddr};
use crate::capture::{OriginalDestinations, Redirect};

/// Errors that stop the engine from starting.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A listener could not be bound.
    #[error("binding the engine listener on {addr} failed; is another appliance (or program) using that port? choose another with --port")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Errors of one proxied connection; they end that connection only.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("connecting to upstream {upstream} failed")]
    Connect {
        upstream: UpstreamAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to upstream {upstream} timed out")]
    ConnectTimeout { upstream: UpstreamAddr },
}

/// How the engine listens and connects.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Listener addresses; capture redirects to these.
    pub listen: Vec<SocketAddr>,
    /// `SO_MARK` set on upstream sockets so capture lets them through; 0 sets none.
    pub own_mark: u32,
    /// Limit on establishing an upstream connection.
    pub connect_timeout: Duration,
}

/// A bound engine, ready to serve.
pub struct Engine {
    listeners: Vec<TcpListener>,
    destinations: Arc<dyn OriginalDestinations>,
    settings: EngineSettings,
}

impl Engine {
    /// Binds every listener in `settings`.
    pub async fn bind(
        settings: EngineSettings,
        destinations: Arc<dyn OriginalDestinations>,
    ) -> Result<Self, EngineError> {
        let mut listeners = Vec::with_capacity(settings.listen.len());
        for &addr in &settings.listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| EngineError::Bind { addr, source })?;
            listeners.push(listener);
        }
        Ok(Self {
            listeners,
            destinations,
            settings,
        })
    }

    /// The addresses actually bound (useful when a port was 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|listener| listener.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` turns true, then stops accepting and waits for open
    /// connections up to `drain`.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>, drain: Duration) {
        let settings = Arc::new(self.settings);
        let mut connections = JoinSet::new();
        let mut acceptors = JoinSet::new();
        let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel(1024);
        for listener in self.listeners {
            let accepted_tx = accepted_tx.clone();
            acceptors.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok(accepted) => {
                            if accepted_tx.send(accepted).await.is_err() {
                                return;
                            }
                        }
                        // Out of file descriptors and similar: back off instead of spinning.
                        Err(error) => {
                            warn!(%error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        drop(accepted_tx);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                Some((stream, peer)) = accepted_rx.recv() => {
                    let client = ClientAddr(peer);
                    let destinations = Arc::clone(&self.destinations);
                    let settings = Arc::clone(&settings);
                    let span = tracing::info_span!("connection", %client);
                    connections.spawn(handle(stream, client, destinations, settings).instrument(span));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        acceptors.abort_all();
        info!(
            open = connections.len(),
            "engine stopped accepting; draining"
        );
        if tokio::time::timeout(drain, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!(
                open = connections.len(),
                "drain deadline passed; closing remaining connections"
            );
            connections.abort_all();
        }
    }
}

async fn handle(
    client_stream: TcpStream,
    client: ClientAddr,
    destinations: Arc<dyn OriginalDestinations>,
    settings: Arc<EngineSettings>,
) {
    let redirect = match destinations.take(client) {
        Ok(Some(redirect)) => redirect,
        Ok(None) => {
            warn!("connection was not redirected by capture (no original destination); closing");
            return;
        }
        Err(error) => {
            warn!(error = %error, "original destination lookup failed; closing");
            return;
        }
    };
    let Redirect {
        original_dst,
        cgroup_id,
        pid,
    } = redirect;
    info!(
        event = "redirected",
        original_dst = %original_dst,
        cgroup_id = cgroup_id.0,
        pid,
        "accepted redirected connection"
    );
    let upstream = UpstreamAddr::from(original_dst);
    match pass_through(client_stream, upstream, &settings).await {
        Ok((sent, received)) => debug!(%upstream, sent, received, "connection closed"),
        Err(error) => warn!(error = %error, "connection failed"),
    }
}

/// Opens a socket to `upstream` carrying the appliance's mark, so that capture does not send
/// it back to the engine even when the daemon runs inside an intercepted cgroup.
async fn connect_upstream(
    upstream: UpstreamAddr,
    settings: &EngineSettings,
) -> Result<TcpStream, ConnectionError> {
    let connect_error = |source| ConnectionError::Connect { upstream, source };
    let socket = match upstream.0 {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(connect_error)?;
    if settings.own_mark != 0 {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &settings.own_mark)
            .map_err(|errno| connect_error(errno.into()))?;
    }
    tokio::time::timeout(settings.connect_timeout, socket.connect(upstream.0))
        .await
        .map_err(|_| ConnectionError::ConnectTimeout { upstream })?
        .map_err(connect_error)
}

async fn pass_through(
    mut client: TcpStream,
    upstream: UpstreamAddr,
    settings: &EngineSettings,
) -> Result<(u64, u64), ConnectionError> {
    let mut upstream_stream = connect_upstream(upstream, settings).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream_stream)
        .await
        .map_err(|source| ConnectionError::Connect { upstream, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::OrigDstAddr;
    use crate::capture::{CgroupId, FixedOriginalDestinations};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn settings() -> EngineSettings {
        EngineSettings {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            // Marking needs CAP_NET_ADMIN, and these tests run unprivileged.
            own_mark: 0,
            connect_timeout: Duration::from_secs(5),
        }
    }

    async fn echo_upstream() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn start(
        destinations: Arc<FixedOriginalDestinations>,
    ) -> (SocketAddr, watch::Sender<bool>) {
        let engine = Engine::bind(settings(), destinations).await.unwrap();
        let addr = engine.local_addrs()[0];
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(engine.serve(stop_rx, Duration::from_secs(1)));
        (addr, stop_tx)
    }

    #[tokio::test]
    async fn redirected_connection_reaches_its_original_destination() {
        let upstream = echo_upstream().await;
        let destinations = Arc::new(FixedOriginalDestinations::default());
        let (engine_addr, _stop) = start(Arc::clone(&destinations)).await;

        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let client_addr = socket.local_addr().unwrap();
        destinations.insert(
            ClientAddr(client_addr),
            Redirect {
                original_dst: OrigDstAddr(upstream),
                cgroup_id: CgroupId(1),
                pid: 1,
            },
        );
        let mut stream = socket.connect(engine_addr).await.unwrap();
        stream.write_all(b"hello through the engine").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, b"hello through the engine");
    }

    #[tokio::test]
    async fn connection_without_record_is_closed_without_contacting_anyone() {
        let destinations = Arc::new(FixedOriginalDestinations::default());
        let (engine_addr, _stop) = start(destinations).await;
        let mut stream = TcpStream::connect(engine_addr).await.unwrap();
        let mut buf = Vec::new();
        let read = stream.read_to_end(&mut buf).await;
        assert!(
            matches!(read, Ok(0)) || read.is_err(),
            "engine must close the connection"
        );
    }
}
