//! The configuration file: any text is accepted or refused with an error, never a panic.
#![no_main]

use std::path::Path;

use appliance::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(error) = Config::parse(text, Path::new("fuzz.toml")) {
            assert!(!error.to_string().is_empty());
        }
    }
});
