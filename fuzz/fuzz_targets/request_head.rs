//! Request heads as a client may send them: what the proxy derives from the head (the
//! target host, whether it is a WebSocket upgrade, the headers forwarded) never panics, and
//! no hop-by-hop header survives the stripping.
#![no_main]

use appliance::proxy::headers::{is_websocket_upgrade, request_host, strip_hop_by_hop};
use appliance::request_path::normalize;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut fields);
    if !matches!(request.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let Ok(uri) = request.path.unwrap_or("/").parse::<http::Uri>() else {
        return;
    };
    let mut headers = HeaderMap::new();
    for field in request.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) {
            headers.append(name, value);
        }
    }
    let _ = request_host(&uri, &headers);
    let _ = normalize(uri.path());
    let upgrade = is_websocket_upgrade(&headers);
    strip_hop_by_hop(&mut headers, upgrade);
    for name in ["transfer-encoding", "keep-alive", "proxy-connection", "http2-settings"] {
        assert!(!headers.contains_key(name), "{name} survived");
    }
    if !upgrade {
        assert!(!headers.contains_key("upgrade") && !headers.contains_key("connection"));
    }
    if let Some(te) = headers.get("te") {
        assert_eq!(te, "trailers");
    }
});
