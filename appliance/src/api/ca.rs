//! `/v1/ca`: the appliance CA.

use super::routes::{blocking, Reply};
use super::ApiError;
use crate::control::Control;

pub fn get(control: &Control) -> Reply {
    Reply::Pem(control.ca_pem())
}

pub fn rotate(control: &Control) -> Result<Reply, ApiError> {
    Ok(Reply::Pem(blocking(|| control.rotate_ca())?))
}
