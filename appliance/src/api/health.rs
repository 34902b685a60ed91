//! `/v1/health` and `/v1/metrics`.

use serde_json::json;

use super::routes::{blocking, Reply};
use super::ApiError;
use crate::control::Control;

pub fn health(control: &Control) -> Result<Reply, ApiError> {
    let secrets = blocking(|| control.secret_count())?;
    Ok(Reply::ok(&json!({
        "status": "ok",
        "capture": {"interceptedCgroups": control.intercepted_cgroups()},
        "store": {"status": "ok", "secrets": secrets},
        "ca": {"leavesMinted": control.leaves_minted()},
    })))
}

pub fn metrics(control: &Control) -> Reply {
    Reply::Metrics(blocking(|| control.metrics()))
}
