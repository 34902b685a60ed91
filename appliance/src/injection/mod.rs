//! Injection: what to do with a request. The proxy asks this layer two questions and never
//! sees where credentials come from:
//! - before TLS: should connections to this host be terminated at all?
//! - per request: rewrite the request (inject credentials) and forward it, or refuse it.

mod agents;
mod apply;
mod decode;
mod index;
mod live;
mod redact;
mod websocket;

pub use agents::AgentDirectory;
pub use apply::ApplyError;
pub use decode::{decode, DecodeError, DecodedBody};
pub use index::{HostTable, LoadedSecret, SecretInjector};
pub use live::{LiveValue, Ready, ValueState};
pub use redact::{redact_headers, redact_reason_phrase, RedactingBody, Redactor};
pub use websocket::{FrameError, FrameRedactor};

use std::sync::Arc;

use crate::audit::SecretUse;
use crate::capture::CgroupId;

/// The workload a connection came from, as capture identified it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// cgroup v2 id of the connecting process.
    pub cgroup_id: CgroupId,
    /// Its process id.
    pub pid: u32,
}

/// The decision for one request.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// Forward the (possibly rewritten) request upstream.
    Forward {
        /// The secrets that were injected into it.
        injected: Vec<SecretUse>,
        /// What to mask in the response: the injected secrets' values.
        redactors: Vec<Arc<Redactor>>,
    },
    /// Refuse with 403; the request never reaches the upstream.
    Block {
        /// Shown to the client.
        reason: String,
    },
    /// Answer 502: a secret the request needs has no usable value (its source fails).
    Unavailable {
        /// The secret.
        secret: SecretUse,
        /// Shown to the client: the secret's name and the source's error, never a value.
        reason: String,
    },
}

/// The injection layer as the proxy sees it.
pub trait Injector: Send + Sync + 'static {
    /// The agent `workload` belongs to. The proxy asks once per connection and carries the
    /// answer down: a connection keeps its agent for its interception, secrets, rules and
    /// audit trail alike.
    fn agent(&self, workload: &Workload) -> Option<Arc<str>>;

    /// Whether TLS from a workload of `agent` (none: no agent) to `host` (the client's SNI
    /// name) is terminated. Hosts answered `false` are passed through byte for byte.
    fn intercepts(&self, host: &str, agent: Option<&str>) -> bool;

    /// Rewrites `request` (to a host [`Injector::intercepts`] accepted) from a workload of
    /// `agent` and decides its fate, for every reading of its path (`path`).
    fn prepare(
        &self,
        host: &str,
        agent: Option<&str>,
        path: &crate::request_path::Readings,
        request: &mut http::request::Parts,
    ) -> Verdict;
}
