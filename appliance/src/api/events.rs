//! `/v1/events`: recent audit events, filtered, optionally waiting for new ones.

use std::time::Duration;

use serde_json::json;

use super::routes::Reply;
use super::ApiError;
use crate::audit::EventFilter;
use crate::control::Control;
use crate::model::ValidationError;

/// Longest a caller may wait for new events, seconds.
const MAX_WAIT_SECONDS: u64 = 60;

/// The percent-decoded value of `key` in `query`, if present.
fn query_value(query: &str, key: &str) -> Result<Option<String>, ApiError> {
    let Some((_, raw)) = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == key)
    else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::from(ValidationError {
            field: key.into(),
            message: "is not valid percent-encoded UTF-8".into(),
        })
    };
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = bytes.get(index + 1..index + 3).ok_or_else(invalid)?;
                let hex = std::str::from_utf8(hex).map_err(|_| invalid())?;
                decoded.push(u8::from_str_radix(hex, 16).map_err(|_| invalid())?);
                index += 3;
            }
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded).map(Some).map_err(|_| invalid())
}

fn query_number(query: &str, key: &str) -> Result<u64, ApiError> {
    match query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == key)
    {
        None => Ok(0),
        Some((_, value)) => value.parse().map_err(|_| {
            ApiError::from(ValidationError {
                field: key.into(),
                message: "must be a non-negative integer".into(),
            })
        }),
    }
}

fn since(query: &str) -> Result<Option<time::OffsetDateTime>, ApiError> {
    query_value(query, "since")?
        .map(|since| {
            time::OffsetDateTime::parse(&since, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    ApiError::from(ValidationError {
                        field: "since".into(),
                        message: "must be an RFC 3339 time such as 2026-12-01T10:00:00Z".into(),
                    })
                })
        })
        .transpose()
}

pub async fn list(control: &Control, query: &str) -> Result<Reply, ApiError> {
    let after = query_number(query, "after")?;
    let wait = query_number(query, "wait")?.min(MAX_WAIT_SECONDS);
    let filter = EventFilter {
        since: since(query)?,
        agent: query_value(query, "agent")?,
        secret: query_value(query, "secret")?,
        host: query_value(query, "host")?,
    };
    let events = control.events();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        // Read before looking, so an event recorded in between still wakes the wait.
        let seen = events.latest();
        let matching = events.matching(after, &filter);
        let now = tokio::time::Instant::now();
        if !matching.is_empty() || now >= deadline {
            // `latest` lets a follower skip what the filter left out.
            return Ok(Reply::ok(
                &json!({"events": matching, "latest": seen.max(after)}),
            ));
        }
        let _ = tokio::time::timeout(deadline - now, events.wait_after(seen)).await;
    }
}
