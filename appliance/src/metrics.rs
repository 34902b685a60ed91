//! Prometheus metrics, in the text exposition format (version 0.0.4): counted where things
//! happen, read on the admin socket (`GET /v1/metrics`) and, when configured, on a TCP
//! address for scrapers.
//!
//! Names follow Prometheus conventions (`appliance_` prefix, base units in names, `_total`
//! counters). Every label set is bounded: agents and secrets are named by the operator,
//! outcomes and reasons are fixed words, and the `host` label holds at most [`MAX_HOSTS`]
//! distinct server names (later ones count as `other`), since a wildcard secret lets a
//! workload choose the name. No label ever holds a path, a query or a value.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex, RwLock};

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Distinct `host` label values kept; the rest are counted as `other`.
pub const MAX_HOSTS: usize = 256;

/// The daemon's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Every metric the daemon exports, registered in one registry.
pub struct Metrics {
    registry: Registry,
    hosts: RwLock<HashSet<String>>,
    /// Intercepted requests by agent, host, secrets injected and outcome.
    pub requests: IntCounterVec,
    /// Secrets injected, by agent, host and secret.
    pub injections: IntCounterVec,
    /// Occurrences of a secret (in any of its forms) masked in responses.
    pub redactions: IntCounter,
    /// Audit events the durable log could not write (a full disk), each lost whole.
    pub audit_events_lost: IntCounter,
    /// Connections the engine accepted, by what it did with them.
    pub connections: IntCounterVec,
    /// Connections the engine closed at once: no capture record, or the lookup failed.
    pub refused_connections: IntCounterVec,
    /// Client connections open now, by kind (`intercepted`, `pass_through`).
    pub open_connections: IntGaugeVec,
    /// Upstream TLS connections open now.
    pub open_upstream_connections: IntGauge,
    /// Failed TLS handshakes, by side (`client`, `upstream`) and reason.
    pub handshake_failures: IntCounterVec,
    /// Time from an intercepted request's arrival to its response head.
    pub request_duration: Histogram,
    /// Time the upstream took to answer a forwarded request with its response head.
    pub upstream_latency: Histogram,
    /// Leaf certificate lookups, by `hit` or `miss` (a miss mints one).
    pub leaf_cache: IntCounterVec,
    /// Configuration and state reloads (SIGHUP), by result.
    pub reloads: IntCounterVec,
    /// Values fetched from their sources (1Password, files, commands, credentials), by
    /// source and result.
    pub value_fetches: IntCounterVec,
    /// Secrets loaded into the injection layer.
    pub secrets: IntGauge,
    /// Bytes the store takes on disk.
    pub store_bytes: IntGauge,
    /// Entries in the capture maps, by map.
    pub capture_map_entries: IntGaugeVec,
    /// What the eBPF programs refused in the kernel, by reason.
    pub capture_refusals: IntCounterVec,
    /// The kernel counters' totals when last read, to count only what was added since.
    kernel_totals: Mutex<std::collections::HashMap<&'static str, u64>>,
}

/// Buckets for request durations and upstream latency, seconds: 1 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let gauge = |name: &str, help: &str| registered(&registry, IntGauge::new(name, help));
        let histogram = |name: &str, help: &str| {
            registered(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                ),
            )
        };
        let redactions = registered(
            &registry,
            IntCounter::new(
                "appliance_redactions_total",
                "Occurrences of a secret, in any of its forms, masked in responses.",
            ),
        );
        let audit_events_lost = registered(
            &registry,
            IntCounter::new(
                "appliance_audit_events_lost_total",
                "Audit events the durable log could not write (a full disk), each lost whole.",
            ),
        );
        Self {
            audit_events_lost,
            requests: counter(
                "appliance_requests_total",
                "Intercepted requests, by agent, host, secrets injected and outcome.",
                &["agent", "host", "secret", "outcome"],
            ),
            injections: counter(
                "appliance_injections_total",
                "Secrets injected into requests, by agent, host and secret.",
                &["agent", "host", "secret"],
            ),
            redactions,
            connections: counter(
                "appliance_connections_total",
                "Redirected connections the engine accepted, by what it did with them.",
                &["kind"],
            ),
            refused_connections: counter(
                "appliance_refused_connections_total",
                "Connections the engine closed on accept, by reason.",
                &["reason"],
            ),
            open_connections: gauge_vec(
                "appliance_open_connections",
                "Client connections open now, by kind.",
                &["kind"],
            ),
            open_upstream_connections: gauge(
                "appliance_open_upstream_connections",
                "Verified TLS connections to upstreams open now.",
            ),
            handshake_failures: counter(
                "appliance_tls_handshake_failures_total",
                "Failed TLS handshakes, by side and reason.",
                &["side", "reason"],
            ),
            request_duration: histogram(
                "appliance_request_duration_seconds",
                "Time from an intercepted request's arrival to its response head.",
            ),
            upstream_latency: histogram(
                "appliance_upstream_response_seconds",
                "Time an upstream took to send the response head of a forwarded request.",
            ),
            leaf_cache: counter(
                "appliance_leaf_cache_lookups_total",
                "Leaf certificate lookups, by result (a miss mints a leaf).",
                &["result"],
            ),
            reloads: counter(
                "appliance_reloads_total",
                "Reloads of configuration and state (SIGHUP), by result.",
                &["result"],
            ),
            value_fetches: counter(
                "appliance_value_fetches_total",
                "Secret values fetched from their sources, by source and result.",
                &["source", "result"],
            ),
            secrets: gauge(
                "appliance_secrets",
                "Secrets loaded into the injection layer.",
            ),
            store_bytes: gauge(
                "appliance_store_size_bytes",
                "Bytes the encrypted store takes on disk.",
            ),
            capture_map_entries: gauge_vec(
                "appliance_capture_map_entries",
                "Entries in the eBPF capture maps, by map.",
                &["map"],
            ),
            capture_refusals: counter(
                "appliance_capture_refusals_total",
                "Connects, datagrams and packets the eBPF programs refused in the kernel, by reason.",
                &["reason"],
            ),
            kernel_totals: Mutex::default(),
            registry,
            hosts: RwLock::new(HashSet::new()),
        }
    }

    /// `host` as a label value: itself while fewer than [`MAX_HOSTS`] names were seen,
    /// `other` after that. Known names only take a read lock: this runs for every request.
    pub fn host_label<'a>(&self, host: &'a str) -> &'a str {
        let known = self
            .hosts
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(host);
        if known {
            return host;
        }
        let mut hosts = self
            .hosts
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if hosts.len() < MAX_HOSTS {
            hosts.insert(host.to_owned());
            return host;
        }
        "other"
    }

    /// Brings `capture_refusals` up to the kernel's `total` for `reason`. The kernel keeps
    /// its own counters (pinned, so they outlive a daemon): only the growth since the last
    /// read is added; a smaller total means the counters were created afresh.
    pub fn observe_refusals(&self, reason: &'static str, total: u64) {
        let mut totals = self
            .kernel_totals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let last = totals.insert(reason, total).unwrap_or(0);
        let added = if total >= last { total - last } else { total };
        self.capture_refusals
            .with_label_values(&[reason])
            .inc_by(added);
    }

    /// Every metric in the text exposition format.
    pub fn render(&self) -> String {
        let mut text = Vec::new();
        // Encoding into memory cannot fail for metrics the registry accepted.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut text);
        String::from_utf8(text).unwrap_or_default()
    }
}

/// `metric`, registered in `registry`. Names, labels and registrations are fixed in this
/// file, so a failure is a bug here, found by the first test that touches [`METRICS`].
fn registered<M>(registry: &Registry, metric: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let metric = metric.expect("metric names and labels are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counts an open connection of `kind` while it lives.
pub struct OpenConnection(IntGauge);

impl OpenConnection {
    /// Counts one more open connection of `kind` until dropped.
    pub fn of(kind: &str) -> Self {
        let gauge = METRICS.open_connections.with_label_values(&[kind]);
        gauge.inc();
        Self(gauge)
    }

    /// Counts one more open upstream connection until dropped.
    pub fn upstream() -> Self {
        let gauge = METRICS.open_upstream_connections.clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts a finished request for `requests` and, per secret, `injections`.
pub fn count_request(agent: &str, host: &str, secrets: &[&str], outcome: &str) {
    let host = METRICS.host_label(host);
    // One secret (the usual case) is its own label; only several are joined.
    let joined;
    let secret_label = match secrets {
        [] => "",
        [one] => one,
        several => {
            joined = several.join(",");
            &joined
        }
    };
    METRICS
        .requests
        .with_label_values(&[agent, host, secret_label, outcome])
        .inc();
    for secret in secrets {
        METRICS
            .injections
            .with_label_values(&[agent, host, secret])
            .inc();
    }
}

/// One more of `counter` with `labels`.
pub fn count(counter: &IntCounterVec, labels: &[&str]) {
    counter.with_label_values(labels).inc();
}

/// A counter's value, for tests.
#[cfg(test)]
fn value(counter: &IntCounterVec, labels: &[&str]) -> u64 {
    counter.with_label_values(labels).get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_per_label_set_and_render_as_text() {
        let host = "api.metrics-test.example";
        count_request("research", host, &["openai"], "forwarded");
        count_request("research", host, &["openai"], "forwarded");
        // Tests share the metrics: another may have filled the host labels already.
        let label = METRICS.host_label(host);
        assert_eq!(
            value(
                &METRICS.requests,
                &["research", label, "openai", "forwarded"]
            ),
            2
        );
        assert_eq!(
            value(&METRICS.injections, &["research", label, "openai"]),
            2
        );
        let text = METRICS.render();
        assert!(
            text.contains("# TYPE appliance_requests_total counter"),
            "{text}"
        );
        let sample = format!(
            r#"appliance_requests_total{{agent="research",host="{label}",outcome="forwarded",secret="openai"}} 2"#
        );
        assert!(text.contains(&sample), "{text}");
        assert!(text.contains("# TYPE appliance_request_duration_seconds histogram"));
    }

    #[test]
    fn the_host_label_is_bounded() {
        for index in 0..MAX_HOSTS + 10 {
            METRICS.host_label(&format!("h{index}.bound-test.example"));
        }
        assert_eq!(METRICS.host_label("one-more.bound-test.example"), "other");
        let seen = METRICS.hosts.read().unwrap().len();
        assert!(seen <= MAX_HOSTS, "{seen}");
    }

    #[test]
    fn open_connections_are_counted_while_they_live() {
        let before = METRICS
            .open_connections
            .with_label_values(&["test-kind"])
            .get();
        let open = OpenConnection::of("test-kind");
        assert_eq!(
            METRICS
                .open_connections
                .with_label_values(&["test-kind"])
                .get(),
            before + 1
        );
        drop(open);
        assert_eq!(
            METRICS
                .open_connections
                .with_label_values(&["test-kind"])
                .get(),
            before
        );
    }
}
