//! `/v1/agents`.

use http::StatusCode;
use serde_json::Value;

use super::routes::{blocking, Reply};
use super::ApiError;
use crate::control::Control;
use crate::model::{self, AgentInput, AgentRecord};

#[derive(serde::Serialize)]
struct AgentList {
    agents: Vec<AgentRecord>,
}

pub fn list(control: &Control) -> Result<Reply, ApiError> {
    let agents = blocking(|| control.list_agents())?;
    Ok(Reply::ok(&AgentList { agents }))
}

pub fn create(control: &Control, body: Value) -> Result<Reply, ApiError> {
    let input: AgentInput = model::from_value(body)?;
    let record = blocking(|| control.create_agent(input))?;
    Ok(Reply::json(StatusCode::CREATED, &record))
}

pub fn get(control: &Control, name: &str) -> Result<Reply, ApiError> {
    Ok(Reply::ok(&blocking(|| control.get_agent(name))?))
}

pub fn update(control: &Control, name: &str, patch: Value) -> Result<Reply, ApiError> {
    Ok(Reply::ok(&blocking(|| control.update_agent(name, patch))?))
}

pub fn delete(control: &Control, name: &str) -> Result<Reply, ApiError> {
    blocking(|| control.delete_agent(name))?;
    Ok(Reply::Empty)
}
