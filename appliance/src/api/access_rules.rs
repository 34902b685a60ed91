//! `/v1/rules`: access rules.

use http::StatusCode;
use serde_json::Value;

use super::routes::{blocking, Reply};
use super::ApiError;
use crate::control::Control;
use crate::model::{self, AccessRuleInput, AccessRuleRecord};

#[derive(serde::Serialize)]
struct RuleList {
    rules: Vec<AccessRuleRecord>,
}

pub fn list(control: &Control) -> Result<Reply, ApiError> {
    let rules = blocking(|| control.list_access_rules())?;
    Ok(Reply::ok(&RuleList { rules }))
}

pub fn create(control: &Control, body: Value) -> Result<Reply, ApiError> {
    let input: AccessRuleInput = model::from_value(body)?;
    let record = blocking(|| control.create_access_rule(input))?;
    Ok(Reply::json(StatusCode::CREATED, &record))
}

pub fn get(control: &Control, id: &str) -> Result<Reply, ApiError> {
    Ok(Reply::ok(&blocking(|| control.get_access_rule(id))?))
}

pub fn update(control: &Control, id: &str, patch: Value) -> Result<Reply, ApiError> {
    Ok(Reply::ok(&blocking(|| {
        control.update_access_rule(id, patch)
    })?))
}

pub fn delete(control: &Control, id: &str) -> Result<Reply, ApiError> {
    blocking(|| control.delete_access_rule(id))?;
    Ok(Reply::Empty)
}
