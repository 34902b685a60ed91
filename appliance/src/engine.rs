//! The engine: accepts redirected connections, learns where each was going from capture, and
//! hands it to the proxy.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument as _};

use crate::addr::{ClientAddr, EngineAddr};
use crate::capture::OriginalDestinations;
use crate::metrics::{self, METRICS};
use crate::proxy::{stop_requested, Proxy};

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

/// A bound engine, ready to serve.
pub struct Engine {
    listeners: Vec<TcpListener>,
    destinations: Arc<dyn OriginalDestinations>,
    proxy: Arc<Proxy>,
}

impl Engine {
    /// Binds a listener on each of `listen`.
    pub async fn bind(
        listen: &[SocketAddr],
        destinations: Arc<dyn OriginalDestinations>,
        proxy: Arc<Proxy>,
    ) -> Result<Self, EngineError> {
        let mut listeners = Vec::with_capacity(listen.len());
        for &addr in listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| EngineError::Bind { addr, source })?;
            listeners.push(listener);
        }
        Ok(Self {
            listeners,
            destinations,
            proxy,
        })
    }

    /// The first listener of the family (IPv6 when `ipv6`), which the sk_lookup program hands
    /// containers' connections to.
    pub fn primary_listener(&self, ipv6: bool) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd as _;
        self.listeners
            .iter()
            .find(|listener| {
                listener
                    .local_addr()
                    .is_ok_and(|addr| addr.is_ipv6() == ipv6)
            })
            .map(|listener| listener.as_fd())
    }

    /// The addresses actually bound (useful when a port was 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|listener| listener.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` turns true, then stops accepting, asks open connections to
    /// finish, and waits for them up to `drain`.
    pub async fn serve(self, shutdown: watch::Receiver<bool>, drain: Duration) {
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
        let mut stop = shutdown.clone();
        loop {
            tokio::select! {
                () = stop_requested(&mut stop) => break,
                Some((stream, peer)) = accepted_rx.recv() => {
                    let client = ClientAddr(peer);
                    let span = tracing::info_span!("connection", %client);
                    let handled = handle(
                        stream,
                        client,
                        Arc::clone(&self.destinations),
                        Arc::clone(&self.proxy),
                        shutdown.clone(),
                    );
                    connections.spawn(handled.instrument(span));
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
    stream: TcpStream,
    client: ClientAddr,
    destinations: Arc<dyn OriginalDestinations>,
    proxy: Arc<Proxy>,
    shutdown: watch::Receiver<bool>,
) {
    let engine = match stream.local_addr() {
        Ok(local) => EngineAddr(local),
        Err(error) => {
            warn!(%error, "cannot read the accepted connection's own address; closing");
            return;
        }
    };
    let mut redirect = match destinations.take(client, engine) {
        Ok(Some(redirect)) => redirect,
        Ok(None) => {
            warn!("connection was not redirected by capture (no original destination); closing");
            metrics::count(&METRICS.refused_connections, &["no_record"]);
            return;
        }
        Err(error) => {
            warn!(error = %error, "original destination lookup failed; closing");
            metrics::count(&METRICS.refused_connections, &["lookup_failed"]);
            return;
        }
    };
    if redirect.from_container {
        redirect.container =
            crate::capture::containers::container_unit(redirect.pid).map(Arc::from);
    }
    info!(
        event = "redirected",
        original_dst = %redirect.original_dst,
        cgroup_id = redirect.cgroup_id.0,
        pid = redirect.pid,
        netns_cookie = redirect.netns_cookie,
        container = redirect.container.as_deref().unwrap_or(""),
        "accepted redirected connection"
    );
    proxy.serve(stream, redirect, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::OrigDstAddr;
    use crate::capture::{CgroupId, FixedOriginalDestinations, Redirect};
    use crate::test_support::test_proxy;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpSocket;

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
        let listen = ["127.0.0.1:0".parse().unwrap()];
        let engine = Engine::bind(&listen, destinations, test_proxy())
            .await
            .unwrap();
        let addr = engine.local_addrs()[0];
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(engine.serve(stop_rx, Duration::from_secs(1)));
        (addr, stop_tx)
    }

    #[tokio::test]
    async fn a_connection_that_is_not_tls_passes_through_to_its_original_destination() {
        let upstream = echo_upstream().await;
        let destinations = Arc::new(FixedOriginalDestinations::default());
        let (engine_addr, _stop) = start(Arc::clone(&destinations)).await;

        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let client_addr = socket.local_addr().unwrap();
        destinations.insert(
            ClientAddr(client_addr),
            EngineAddr(engine_addr),
            Redirect {
                original_dst: OrigDstAddr(upstream),
                cgroup_id: CgroupId(1),
                pid: 1,
                netns_cookie: 1,
                from_container: false,
                container: None,
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
