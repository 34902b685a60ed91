//! Hop-by-hop headers (RFC 9110 §7.6.1) and the request's target host.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never the message, and so never cross a proxy.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const KEEP_ALIVE: &str = "keep-alive";
const PROXY_CONNECTION: &str = "proxy-connection";

/// Sent with an `Upgrade: h2c` request; it only concerns that connection.
const HTTP2_SETTINGS: &str = "http2-settings";

/// Whether the request asks to switch to WebSocket (`Connection: upgrade` plus
/// `Upgrade: websocket`), the one protocol switch an intercepted connection allows: after any
/// other (h2c, TLS) the proxy could no longer see, or mask, what the upstream sends.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let mut protocols = headers.get_all(header::UPGRADE).iter();
    let websocket = protocols
        .next()
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case("websocket"));
    websocket && protocols.next().is_none() && connection_tokens(headers).any(|t| t == "upgrade")
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
}

/// Removes hop-by-hop headers, including those `Connection` names. When `keep_upgrade`, the
/// upgrade handshake (`Connection: upgrade`, `Upgrade`) survives so it can reach the upstream.
/// `TE: trailers` is kept: it is the one TE value that concerns the message.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names instead of a dozen hashed removals
    // (2% of the engine's CPU per request, twice).
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<String> = connection_tokens(headers).collect();
    for name in &named {
        if keep_upgrade && name == "upgrade" {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
    let trailers_wanted = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| {
            value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(HTTP2_SETTINGS);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
    if trailers_wanted {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether [`strip_hop_by_hop`] removes `name` whatever `Connection` lists (`Connection`
/// itself among them, so a message without these has nothing to strip).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
        || name == header::UPGRADE
        || [KEEP_ALIVE, PROXY_CONNECTION, HTTP2_SETTINGS].contains(&name.as_str())
}

/// The host a request is addressed to (`:authority`, else `Host`), lower-cased, with its port.
pub fn request_host(uri: &http::Uri, headers: &HeaderMap) -> Option<(String, Option<u16>)> {
    if let Some(authority) = uri.authority() {
        return Some((authority.host().to_ascii_lowercase(), authority.port_u16()));
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let authority: http::uri::Authority = host.parse().ok()?;
    Some((authority.host().to_ascii_lowercase(), authority.port_u16()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn removes_standard_and_connection_named_headers() {
        let mut map = headers(&[
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("proxy-authorization", "Basic Zm9v"),
            ("upgrade", "websocket"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut map, false);
        let names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[test]
    fn keeps_the_upgrade_handshake_and_te_trailers_when_asked() {
        let mut map = headers(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("sec-websocket-key", "abc"),
        ]);
        assert!(is_websocket_upgrade(&map));
        strip_hop_by_hop(&mut map, true);
        assert_eq!(map["connection"], "upgrade");
        assert_eq!(map["upgrade"], "websocket");
        assert_eq!(map["te"], "trailers");
        assert_eq!(map["sec-websocket-key"], "abc");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        assert!(!is_websocket_upgrade(&headers(&[("upgrade", "websocket")])));
        assert!(!is_websocket_upgrade(&headers(&[(
            "connection",
            "upgrade"
        )])));
    }

    #[test]
    fn only_websocket_is_an_upgrade_and_h2c_is_stripped() {
        for protocol in ["h2c", "TLS/1.2", "websocket, h2c", "h2c, websocket"] {
            let map = headers(&[("connection", "upgrade"), ("upgrade", protocol)]);
            assert!(!is_websocket_upgrade(&map), "{protocol}");
        }
        let mut map = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut map, false);
        let names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept"]);
    }

    #[test]
    fn request_host_prefers_the_authority_and_lowercases() {
        let uri: http::Uri = "https://API.example.com:8443/v1".parse().unwrap();
        assert_eq!(
            request_host(&uri, &HeaderMap::new()),
            Some(("api.example.com".into(), Some(8443)))
        );
        let uri: http::Uri = "/v1".parse().unwrap();
        let map = headers(&[("host", "Example.COM")]);
        assert_eq!(request_host(&uri, &map), Some(("example.com".into(), None)));
        assert_eq!(request_host(&uri, &HeaderMap::new()), None);
    }
}
