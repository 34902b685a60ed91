//! `/v1/secrets`.

use http::StatusCode;
use serde_json::Value;

use super::routes::{blocking, Reply};
use super::ApiError;
use crate::control::Control;
use crate::model::{self, SecretInput};

#[derive(serde::Serialize)]
struct SecretList {
    secrets: Vec<model::SecretView>,
}

pub fn list(control: &Control) -> Result<Reply, ApiError> {
    let secrets = blocking(|| control.list_secrets())?;
    Ok(Reply::ok(&SecretList { secrets }))
}

pub async fn create(control: &Control, body: Value) -> Result<Reply, ApiError> {
    let input: SecretInput = model::from_value(body)?;
    let view = control.create_secret(input).await?;
    Ok(Reply::json(StatusCode::CREATED, &view))
}

pub fn get(control: &Control, id: &str) -> Result<Reply, ApiError> {
    Ok(Reply::ok(&blocking(|| control.get_secret(id))?))
}

pub async fn update(control: &Control, id: &str, patch: Value) -> Result<Reply, ApiError> {
    Ok(Reply::ok(&control.update_secret(id, patch).await?))
}

pub async fn check(control: &Control, id: &str) -> Result<Reply, ApiError> {
    Ok(Reply::ok(&control.check_secret(id).await?))
}

pub fn delete(control: &Control, id: &str) -> Result<Reply, ApiError> {
    blocking(|| control.delete_secret(id))?;
    Ok(Reply::Empty)
}
