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

pub fn create(control: &Control, body: Value) -> Result<Reply, ApiError> {
    let input: SecretInput = model::from_value(body)?;
    let view = blocking(|| control.create_secret(input))?;
    Ok(Reply::json(StatusCode::CREATED, &view))
}

pub fn get(control: &Control, id: &str) -> Result<Reply, ApiError> {
    Ok(Reply::ok(&blocking(|| control.get_secret(id))?))
}

pub fn update(control: &Control, id: &str, patch: Value) -> Result<Reply, ApiError> {
    Ok(Reply::ok(&blocking(|| control.update_secret(id, patch))?))
}

pub fn delete(control: &Control, id: &str) -> Result<Reply, ApiError> {
    blocking(|| control.delete_secret(id))?;
    Ok(Reply::Empty)
}
