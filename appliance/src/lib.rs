//! appliance: a transparent credential-injecting network appliance.
//!
//! Layers, each owning its types:
//! - [`capture`]: eBPF programs that redirect selected cgroups' outbound connections to the
//!   engine, and the lookup of each connection's original destination;
//! - [`engine`]: accepts redirected connections and hands them to the [`proxy`], which passes
//!   them through or terminates TLS ([`tls`]) and forwards HTTP through [`injection`];
//! - [`request_path`]: the one normalized path a request is decided and forwarded with;
//! - [`daemon`]: wires the layers together; [`exec`]: runs a command in an intercepted cgroup;
//! - [`metrics`]: what the layers count, for Prometheus.

pub mod addr;
pub mod api;
pub mod audit;
pub mod capture;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod exec;
mod files;
pub mod injection;
pub mod install;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod request_path;
pub mod store;
mod swap;
pub mod tls;
pub mod trust;
pub mod values;

#[cfg(test)]
mod test_support;
