//! The path normalizer, on every path a request line can carry: a normalized path is a
//! fixed point, holds no dot segment and no empty one, is still a valid request target, and
//! its slash-decoded reading, when it has one that is not refused, is normal too.
#![no_main]

use appliance::request_path::{normalize, with_slashes_decoded};
use libfuzzer_sys::fuzz_target;

fn assert_normal(path: &str) {
    assert!(path.starts_with('/'), "{path:?}");
    assert!(!path.contains("//"), "{path:?}");
    assert!(
        !path.split('/').any(|segment| segment == "." || segment == ".."),
        "{path:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(target) = http::uri::PathAndQuery::try_from(data) else {
        return;
    };
    let Ok(normal) = normalize(target.path()) else {
        return;
    };
    if normal == "*" {
        return;
    }
    assert_normal(&normal);
    assert_eq!(normalize(&normal).unwrap(), normal, "not a fixed point");
    assert!(http::uri::PathAndQuery::try_from(normal.as_ref()).is_ok(), "{normal:?}");
    // An error refuses the request; a reading it gives must be normal.
    if let Ok(Some(decoded)) = with_slashes_decoded(&normal) {
        assert_normal(&decoded);
    }
});
