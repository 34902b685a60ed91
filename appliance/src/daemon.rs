//! The daemon: loads capture, starts the engine, attaches the selected cgroups, and runs until
//! told to stop.

use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::api::{self, ApiSettings};
use crate::audit::{AuditFileSettings, EventLog};
use crate::capture::changes::ChangeEvents;
use crate::capture::containers::ContainerSettings;
use crate::capture::{
    self, Capture, CaptureControl, CaptureSettings, Cgroup, ContainerSelection, Delivery,
};
use crate::config::{
    Config, ContainerSelectionConfig, ForeignNetns, OnePasswordConfig, UninterceptedConfig,
    ValuesConfig,
};
use crate::control::{Control, Parts};
use crate::engine::Engine;
use crate::injection::SecretInjector;
use crate::proxy::{Proxy, ProxySettings, Unintercepted};
use crate::store::{KeySource, MasterKey, Store};
use crate::tls::{CertificateAuthority, LeafCache, UpstreamTls};
use crate::trust::TrustFiles;
use crate::values::{ConnectSettings, SourceSettings, Sources};

/// Everything the daemon needs to run.
#[derive(Clone, Debug)]
pub struct DaemonSettings {
    /// eBPF setup.
    pub capture: CaptureSettings,
    /// Serving containers (other network namespaces); `None` refuses or allows them as
    /// `capture.refuse_foreign_netns` says.
    pub containers: Option<ContainerSettings>,
    /// Engine listener addresses.
    pub listen: Vec<std::net::SocketAddr>,
    /// Addresses the daemon adds to `lo` before listening (the engine's container addresses,
    /// when containers are served).
    pub local_addresses: Vec<std::net::IpAddr>,
    /// Proxy limits and policies.
    pub proxy: ProxySettings,
    /// Directory of the daemon's persistent state (the CA).
    pub state_dir: PathBuf,
    /// CA files trusted for upstreams besides the system store.
    pub upstream_ca_files: Vec<PathBuf>,
    /// Leaf certificates kept in memory.
    pub leaf_cache_capacity: usize,
    /// systemd's `$CREDENTIALS_DIRECTORY`, holding the master key when set.
    pub credentials_dir: Option<PathBuf>,
    /// Admin API.
    pub api: ApiSettings,
    /// Parent cgroup of `appliance exec` cgroups; created when missing, always intercepted.
    pub agents_cgroup: PathBuf,
    /// Further cgroups to intercept; they must exist.
    pub cgroups: Vec<PathBuf>,
    /// How long open connections may finish after a stop signal.
    pub drain: Duration,
    /// Where to serve Prometheus metrics over TCP, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The durable audit log.
    pub audit: AuditFileSettings,
    /// Values fetched from their sources.
    pub values: ValuesConfig,
    /// 1Password Connect.
    pub onepassword: OnePasswordConfig,
}

impl DaemonSettings {
    /// The runtime settings `config` asks for.
    pub fn from_config(config: &Config) -> Self {
        let capture = CaptureSettings {
            bpffs_dir: config.capture.bpffs_dir.clone(),
            engine_v4: config.listen.ipv4,
            engine_v6: config.listen.ipv6,
            engine_port: config.listen.port,
            intercepted_ports: config.capture.intercept_ports.clone(),
            own_mark: config.capture.mark,
            refuse_foreign_netns: config.capture.foreign_netns != ForeignNetns::Allow,
            redirect_unserved_netns: !config.container_listen_addresses().is_empty(),
            container_v4: config.listen.containers_ipv4,
            container_v6: config.listen.containers_ipv6,
            container_mark: config.capture.container_mark,
            private_listener: config.metrics.enabled.then_some(config.metrics.listen),
            ebpf_log_level: if tracing::enabled!(target: "appliance_ebpf", tracing::Level::DEBUG) {
                4
            } else {
                3
            },
        };
        let client_timeout = Duration::from_secs(config.proxy.client_timeout_seconds);
        let proxy = ProxySettings {
            own_mark: config.capture.mark,
            connect_timeout: Duration::from_secs(config.upstream.connect_timeout_seconds),
            handshake_timeout: client_timeout,
            header_read_timeout: client_timeout,
            max_header_bytes: config.proxy.max_header_bytes,
            limits: crate::proxy::admission::Limits {
                total: config.proxy.max_connections,
                per_cgroup: config.proxy.max_connections_per_cgroup,
            },
            unintercepted: match config.proxy.unintercepted {
                UninterceptedConfig::PassThrough => Unintercepted::PassThrough,
                UninterceptedConfig::Refuse => Unintercepted::Refuse,
            },
        };
        let containers = match config.capture.foreign_netns {
            ForeignNetns::Refuse | ForeignNetns::Allow => None,
            ForeignNetns::Tproxy => Some(Delivery::Tproxy),
            ForeignNetns::Redirect => Some(Delivery::Redirect),
        }
        .map(|delivery| ContainerSettings {
            delivery,
            selection: match config.capture.container_selection {
                ContainerSelectionConfig::Namespace => ContainerSelection::Namespace,
                ContainerSelectionConfig::Cgroup => ContainerSelection::Cgroups,
            },
            mark: config.capture.container_mark,
            routing_table: config.capture.routing_table,
            rule_preference: config.capture.rule_preference,
            ports: config.capture.intercept_ports.clone(),
            rescan: Duration::from_secs(config.capture.container_rescan_seconds),
        });
        let mut listen = vec![
            SocketAddr::new(config.listen.ipv4.into(), config.listen.port),
            SocketAddr::new(config.listen.ipv6.into(), config.listen.port),
        ];
        let local_addresses = config.container_listen_addresses();
        listen.extend(
            local_addresses
                .iter()
                .map(|&address| SocketAddr::new(address, config.listen.port)),
        );
        Self {
            capture,
            containers,
            listen,
            local_addresses,
            proxy,
            state_dir: config.state.dir.clone(),
            upstream_ca_files: config.upstream.ca_files.clone(),
            leaf_cache_capacity: 10_000,
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            api: ApiSettings {
                socket: config.api.socket.clone(),
                admin_group: Some(config.api.admin_group.clone()).filter(|group| !group.is_empty()),
                max_body_bytes: config.api.max_body_bytes,
                request_timeout: Duration::from_secs(10),
            },
            agents_cgroup: config.capture.agents_cgroup.clone(),
            cgroups: config.capture.cgroups.clone(),
            drain: Duration::from_secs(config.proxy.drain_seconds),
            metrics_listen: config.metrics.enabled.then_some(config.metrics.listen),
            audit: AuditFileSettings {
                dir: config.state.dir.join("audit"),
                max_file_bytes: config.audit.max_file_bytes,
                keep_files: config.audit.keep_files,
            },
            values: config.values.clone(),
            onepassword: config.onepassword.clone(),
        }
    }
}

/// 1Password Connect as the daemon's environment (`OP_CONNECT_HOST`, `OP_CONNECT_TOKEN`, as
/// 1Password's SDKs read it) or its configuration says; `None` when neither names a server.
fn connect_settings(
    config: &OnePasswordConfig,
    credentials_dir: Option<&std::path::Path>,
) -> anyhow::Result<Option<ConnectSettings>> {
    let from_env = |name| std::env::var(name).ok().filter(|value| !value.is_empty());
    let Some(host) = from_env("OP_CONNECT_HOST")
        .or_else(|| Some(config.connect_host.clone()).filter(|host| !host.is_empty()))
    else {
        return Ok(None);
    };
    let host: http::Uri = host.parse().with_context(|| {
        format!("1Password Connect host {host:?} (OP_CONNECT_HOST or onepassword.connect_host) is not a URL such as http://localhost:8080")
    })?;
    if !matches!(host.scheme_str(), Some("http" | "https")) || host.authority().is_none() {
        anyhow::bail!("1Password Connect host {host} (OP_CONNECT_HOST or onepassword.connect_host) must be an http:// or https:// URL with a host, such as http://localhost:8080");
    }
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|token| token.trim().to_owned())
            .with_context(|| {
                format!(
                    "reading the 1Password Connect token from {}",
                    path.display()
                )
            })
    };
    let credential = credentials_dir
        .map(|dir| dir.join(&config.token_credential))
        .filter(|path| path.exists());
    let token = match (from_env("OP_CONNECT_TOKEN"), &credential) {
        (Some(token), _) => token,
        (None, Some(path)) => read(path)?,
        (None, None) if !config.token_file.as_os_str().is_empty() => read(&config.token_file)?,
        (None, None) => anyhow::bail!(
            "1Password Connect is configured at {host} but has no token: set OP_CONNECT_TOKEN, give the daemon the credential {} (LoadCredential=), or set onepassword.token_file",
            config.token_credential
        ),
    };
    info!(host = %host, "1Password Connect configured");
    Ok(Some(ConnectSettings {
        host,
        token: Arc::new(zeroize::Zeroizing::new(token)),
    }))
}

/// Removes what the daemon adds to the host for containers, beside the pinned programs: the
/// policy routing rules and the engine's container addresses on `lo`.
pub fn remove_container_host_side(config: &Config) -> anyhow::Result<()> {
    capture::containers::remove_host_side(
        config.capture.routing_table,
        config.capture.rule_preference,
    )
    .context("removing the container routing rules")?;
    // Whatever the mode now: an earlier daemon may have run with `redirect`.
    capture::containers::remove_engine_addresses(&config.container_addresses())
        .context("removing the engine's container addresses from lo")
}

/// Runs the daemon until SIGTERM or SIGINT. SIGHUP calls `reload` for fresh settings and
/// applies what can change without dropping connections.
///
/// `ready` is called once, when the daemon serves: the binary gives back to the system what
/// start-up freed (its allocator is the binary's choice).
pub async fn run(
    settings: DaemonSettings,
    reload: impl Fn() -> anyhow::Result<DaemonSettings>,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    raise_descriptor_limit();
    let (key, key_source) =
        MasterKey::load_or_create(settings.credentials_dir.as_deref(), &settings.state_dir)
            .context("loading the master key")?;
    match &key_source {
        KeySource::Created(path) => {
            warn!(path = %path.display(), "created a new master key; back it up with the store")
        }
        KeySource::File(path) | KeySource::Credential(path) => {
            info!(path = %path.display(), "master key loaded")
        }
    }
    let store =
        Store::open(&settings.state_dir.join("store"), &key).context("opening the store")?;
    drop(key);
    let injector = Arc::new(SecretInjector::default());
    let events = Arc::new(
        EventLog::open(RECENT_EVENTS, settings.audit.clone()).context("opening the audit log")?,
    );

    let mut capture = Capture::load(&settings.capture).context("starting capture")?;
    spawn_ebpf_log_reader(&mut capture)?;

    let ca_dir = settings.state_dir.join("ca");
    let ca = CertificateAuthority::load_or_create(&ca_dir).context("loading the appliance CA")?;
    let leaves = Arc::new(LeafCache::new(ca, settings.leaf_cache_capacity));
    let api_leaves = Arc::clone(&leaves);
    let upstream_tls = UpstreamTls::new(&settings.upstream_ca_files)
        .context("loading trusted upstream certificates")?;
    let value_source_tls = upstream_tls.clone();
    let proxy = Arc::new(Proxy::new(
        Arc::clone(&injector) as Arc<dyn crate::injection::Injector>,
        leaves,
        upstream_tls,
        Arc::clone(&events),
        settings.proxy.clone(),
    )?);
    let destinations = Arc::new(capture.original_destinations()?);
    capture::containers::add_engine_addresses(&settings.local_addresses)
        .context("adding the engine's container addresses to lo")?;
    // Listen before attaching, so the first redirected connection finds the engine.
    let engine = Engine::bind(&settings.listen, destinations, Arc::clone(&proxy)).await?;
    let listening = engine.local_addrs();
    if settings
        .containers
        .as_ref()
        .is_some_and(|containers| containers.delivery == Delivery::Tproxy)
    {
        capture
            .steer_to(
                engine.primary_listener(false),
                engine.primary_listener(true),
            )
            .context("steering container connections to the engine")?;
    }

    let mut base = vec![Cgroup::create(&settings.agents_cgroup)
        .context("creating the agents cgroup (--agents-cgroup)")?];
    for path in &settings.cgroups {
        base.push(Cgroup::open(path).context("opening a selected cgroup (--cgroup)")?);
    }
    warn_if_self_selected(&base);

    let capture = CaptureControl::new(capture, base, settings.containers.clone())
        .context("taking over the host side of container delivery")?;
    let sources = Arc::new(Sources::new(SourceSettings {
        ttl: Duration::from_secs(settings.values.ttl_seconds),
        max_stale: Duration::from_secs(settings.values.max_stale_seconds),
        timeout: Duration::from_secs(settings.values.timeout_seconds),
        allow_commands: settings.values.allow_commands,
        file_dirs: settings.values.file_dirs.clone(),
        onepassword: connect_settings(&settings.onepassword, settings.credentials_dir.as_deref())?,
        credentials_dir: settings.credentials_dir.clone(),
        own_mark: settings.proxy.own_mark,
        tls: Some(Arc::clone(&value_source_tls.http11_only)),
    }));
    let trust = Arc::new(TrustFiles::new(crate::trust::dir_for_socket(
        &settings.api.socket,
    )));
    if let Err(error) = trust.write(api_leaves.ca().certificate_pem()) {
        warn!(error = %format!("{:#}", anyhow::Error::new(error)), "writing the trust files failed; appliance exec cannot make clients trust the CA");
    }
    let control = Arc::new(Control::new(Parts {
        store,
        injector,
        leaves: api_leaves,
        ca_dir,
        events: Arc::clone(&events),
        capture: Box::new(capture),
        sources: Arc::clone(&sources),
        trust: Arc::clone(&trust),
    }));
    let loaded = control
        .reload()
        .context("loading the secrets, access rules and agents of the store")?;
    info!(
        secrets = loaded.secrets,
        rules = loaded.rules,
        intercepted = loaded.intercepted,
        "state loaded"
    );
    // Values that live elsewhere are fetched before the daemon says it is ready, so that the
    // first requests find them; a source that does not answer in time is retried by the
    // refresher, and requests that need it fail meanwhile.
    let first_fetch = Duration::from_secs(settings.values.timeout_seconds) * 2;
    if tokio::time::timeout(first_fetch, sources.refresh_due())
        .await
        .is_err()
    {
        warn!(
            seconds = first_fetch.as_secs(),
            "not every secret value could be fetched before starting; requests that need one get 502 until its source answers"
        );
    }

    let admin_api = api::bind(settings.api.clone()).context("starting the admin API")?;
    let metrics_listener =
        match settings.metrics_listen {
            Some(address) => Some(tokio::net::TcpListener::bind(address).await.with_context(
                || format!("listening for metrics scrapers on {address} (metrics.listen)"),
            )?),
            None => None,
        };
    let (stop_tx, stop_rx) = watch::channel(false);
    let api_task = tokio::spawn(admin_api.serve(Arc::clone(&control), stop_rx.clone()));
    let served = tokio::spawn(engine.serve(stop_rx.clone(), settings.drain));
    tokio::spawn(Arc::clone(&sources).run(stop_rx.clone()));
    tokio::spawn(follow_system_roots(
        trust,
        Arc::clone(&control),
        stop_rx.clone(),
    ));
    if let Some(listener) = metrics_listener {
        tokio::spawn(serve_metrics(
            listener,
            Arc::clone(&control),
            stop_rx.clone(),
        ));
    }
    if let Some(containers) = &settings.containers {
        tokio::spawn(follow_containers(
            Arc::clone(&control),
            containers.rescan,
            stop_rx,
        ));
    }
    info!(
        event = "ready",
        socket = %settings.api.socket.display(),
        listen = ?listening,
        ports = ?settings.capture.intercepted_ports,
        "appliance ready"
    );

    notify("READY=1\nSTATUS=intercepting");
    ready();

    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                info!("SIGTERM received; stopping");
                break;
            }
            _ = interrupt.recv() => {
                info!("SIGINT received; stopping");
                break;
            }
            _ = hangup.recv() => {
                notify("RELOADING=1");
                match reload().and_then(|fresh| apply_reload(&settings, &fresh, &proxy, &control)) {
                    Ok(()) => {
                        info!(event = "reloaded", "configuration reloaded");
                        crate::metrics::count(&crate::metrics::METRICS.reloads, &["ok"]);
                    }
                    Err(error) => {
                        warn!(error = %format!("{error:#}"), "reload failed; keeping the running configuration");
                        crate::metrics::count(&crate::metrics::METRICS.reloads, &["failed"]);
                    }
                }
                notify("READY=1\nSTATUS=intercepting");
            }
        }
    }
    notify("STOPPING=1");
    // Redirection stays pinned: while the daemon is away, intercepted connections fail
    // instead of bypassing it. `appliance daemon --detach-all` ends interception.
    let _ = stop_tx.send(true);
    served.await.context("engine task failed")?;
    api_task.await.context("admin API task failed")?;
    // Every event of the drained connections is on disk before the daemon exits.
    events.close();
    info!("appliance stopped");
    Ok(())
}

/// Raises the soft limit on open descriptors to the hard one: every intercepted connection
/// holds two, and the usual soft limit of 1024 is soon reached.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid rlimit.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        info!(
            open_files = limit.rlim_cur,
            "descriptor limit raised to the hard limit"
        );
    } else {
        warn!(error = %std::io::Error::last_os_error(), "cannot raise the descriptor limit; the daemon may run out of descriptors under load");
    }
}

/// Events kept in memory for `/v1/events` (and read back from the audit log at start).
const RECENT_EVENTS: usize = 10_000;

/// How long the follower lets a burst of events settle before it reconciles: a runtime
/// starting one container announces several link and cgroup changes.
const EVENT_SETTLE: Duration = Duration::from_millis(20);

/// Serves container namespaces as they come and go: at once when a link or cgroup
/// event says something changed (the intercepted cgroups too: the new ones are watched from
/// then on), and every `rescan` for what no event announces. Until a new namespace is set up
/// its connections reach the engine at its container address, without a guard on its veth.
async fn follow_containers(
    control: Arc<Control>,
    rescan: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let events = ChangeEvents::open()
        .inspect_err(|error| warn!(%error, rescan_seconds = rescan.as_secs(), "cannot follow link and cgroup events; containers are found by the periodic rescan only"))
        .ok();
    let mut ticks = tokio::time::interval(rescan);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = async {
            match &events {
                Some(events) => events.changed(EVENT_SETTLE).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = ticks.tick() => {}
            () = changed => {}
            () = control.selection_changed() => {
                // Watched before the look below, so a process joining a new cgroup is seen
                // by one or the other.
                if let Some(events) = &events {
                    events.watch_cgroups(&control.selected_paths());
                }
            }
        }
        let refreshing = Arc::clone(&control);
        let refreshed = tokio::task::spawn_blocking(move || refreshing.refresh_containers()).await;
        match refreshed {
            Ok(Ok(selected)) => {
                // Events that arrived while reconciling stay pending: they may be news the
                // reconcile already missed, and cost one more look at most.
                if let Some(events) = &events {
                    events.watch_cgroups(&selected);
                }
            }
            Ok(Err(error)) => {
                warn!(error = %format!("{:#}", anyhow::Error::new(error)), "following containers failed")
            }
            Err(error) => warn!(%error, "following containers panicked"),
        }
    }
}

/// How often the system's root bundle is looked at for changes.
const SYSTEM_ROOTS_CHECK: Duration = Duration::from_secs(30);

/// Rebuilds the trust files when the system's roots change (a CA package update, or
/// `appliance trust install`), so the bundle clients get keeps the current roots.
async fn follow_system_roots(
    trust: Arc<TrustFiles>,
    control: Arc<Control>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(SYSTEM_ROOTS_CHECK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = ticks.tick() => {}
        }
        if trust.system_roots_changed() {
            info!("the system's root certificates changed; rebuilding the trust files");
            let trust = Arc::clone(&trust);
            let pem = control.ca_pem();
            let written = tokio::task::spawn_blocking(move || trust.write(&pem)).await;
            if let Ok(Err(error)) = written {
                warn!(error = %format!("{:#}", anyhow::Error::new(error)), "rebuilding the trust files failed");
            }
        }
    }
}

/// Serves `GET /metrics` to scrapers until `stop`.
/// Metrics connections open at once.
const METRICS_CONNECTIONS: usize = 32;
/// How long one metrics connection may stay open (Prometheus reconnects as it needs).
const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    control: Arc<Control>,
    mut stop: watch::Receiver<bool>,
) {
    use http_body_util::Full;
    // A scraper needs one connection and a second: idle or slow connections cannot pile up
    // until the daemon runs out of descriptors.
    let open = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            debug!("metrics connection limit reached; closing a new connection");
            continue;
        };
        let control = Arc::clone(&control);
        let service =
            hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let control = Arc::clone(&control);
                async move {
                    if request.method() == http::Method::GET && request.uri().path() == "/metrics" {
                        let text = tokio::task::spawn_blocking(move || control.metrics())
                            .await
                            .unwrap_or_default();
                        http::Response::builder()
                            .header(http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)
                            .body(Full::new(bytes::Bytes::from(text)))
                    } else {
                        http::Response::builder()
                            .status(http::StatusCode::NOT_FOUND)
                            .body(Full::new(bytes::Bytes::from_static(
                                b"metrics are at /metrics\n",
                            )))
                    }
                }
            });
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(METRICS_CONNECTION_LIFETIME, served).await;
            drop(permit);
        });
    }
}

/// Applies what a reload may change without dropping connections: upstream trust and proxy
/// settings (for new connections), and secrets, rules and agents re-read from the store.
/// Settings that need a restart are named in a warning and left as they are.
fn apply_reload(
    running: &DaemonSettings,
    fresh: &DaemonSettings,
    proxy: &Proxy,
    control: &Control,
) -> anyhow::Result<()> {
    let restart_only = [
        ("listen", running.listen != fresh.listen),
        ("capture", running.capture != fresh.capture),
        (
            "capture.agents_cgroup",
            running.agents_cgroup != fresh.agents_cgroup,
        ),
        ("capture.cgroups", running.cgroups != fresh.cgroups),
        ("state.dir", running.state_dir != fresh.state_dir),
        ("api", running.api != fresh.api),
        ("metrics", running.metrics_listen != fresh.metrics_listen),
        ("audit", running.audit != fresh.audit),
        ("values", running.values != fresh.values),
        ("onepassword", running.onepassword != fresh.onepassword),
    ];
    for (key, _) in restart_only.iter().filter(|(_, changed)| *changed) {
        warn!(
            key,
            "changed in the configuration; takes effect at the next restart"
        );
    }
    let upstream_tls = UpstreamTls::new(&fresh.upstream_ca_files)
        .context("loading trusted upstream certificates")?;
    proxy.reconfigure(upstream_tls, fresh.proxy.clone());
    control
        .reload()
        .context("reloading the secrets, access rules and agents of the store")?;
    Ok(())
}

/// Tells systemd about the daemon's state (`sd_notify`), when it runs under systemd.
fn notify(state: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        if let Err(error) = notify_to(std::path::Path::new(&path), state) {
            warn!(%error, "cannot notify systemd");
        }
    }
}

fn notify_to(path: &std::path::Path, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_os_str().as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    socket.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}

/// The engine's own sockets carry a mark that capture skips, so selecting the daemon's own
/// cgroup (or an ancestor) works; it is still worth knowing about.
fn warn_if_self_selected(selected: &[Cgroup]) {
    let own = match capture::cgroup::own_cgroup_path() {
        Ok(own) => own,
        Err(error) => {
            warn!(%error, "cannot tell which cgroup the daemon runs in");
            return;
        }
    };
    for cgroup in selected.iter().filter(|cgroup| cgroup.contains(&own)) {
        warn!(
            cgroup = %cgroup.path().display(),
            daemon_cgroup = %own.display(),
            "a selected cgroup contains the daemon itself; its upstream connections are exempt by SO_MARK, other processes there are intercepted"
        );
    }
}

fn spawn_ebpf_log_reader(capture: &mut Capture) -> anyhow::Result<()> {
    let logger = capture.logger()?;
    // SAFETY: the logger owns its ring buffer's file descriptor for as long as it lives, and
    // always reports that same descriptor.
    let mut readable = unsafe { AsyncFd::register(logger) }
        .map_err(|error| error.into_parts().1)
        .context("registering the eBPF log ring buffer with tokio")?;
    tokio::spawn(async move {
        loop {
            let mut guard = match readable.readable_mut().await {
                Ok(guard) => guard,
                Err(error) => {
                    warn!(%error, fd = readable.get_ref().as_raw_fd(), "eBPF log reader stopped");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::notify_to;

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let path = std::env::temp_dir().join(format!("appliance-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        notify_to(&path, "READY=1").unwrap();
        let mut buffer = [0u8; 64];
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"READY=1");
        std::fs::remove_file(&path).unwrap();

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("appliance-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = std::os::unix::net::UnixDatagram::bind_addr(&address).unwrap();
        notify_to(std::path::Path::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"STOPPING=1");
    }
}
