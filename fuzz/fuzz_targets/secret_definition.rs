//! Secret, agent and access-rule definitions as the admin API receives them: any JSON is
//! either accepted or refused with a field and a message, never a panic; an accepted
//! secret's value can be injected where its rules put it.
#![no_main]

use appliance::model::{AccessRule, AgentSpec};
use appliance::model::SecretSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    match SecretSpec::from_json(&json) {
        Ok((spec, Some(value))) => assert!(spec.check_value(&value).is_ok()),
        Ok((_, None)) => {}
        Err(error) => assert!(!error.field.is_empty() && !error.message.is_empty()),
    }
    let _ = AgentSpec::from_json(&json);
    let _ = AccessRule::from_json(&json);
});
