//! Putting a secret into a request, one injection variant at a time. Whatever the client sent
//! in the same place (its placeholder) is replaced, never duplicated.

use base64::Engine as _;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;

use crate::model::{HeaderInjection, Injection, SecretValue, ValueFormat};

/// Why a secret could not be injected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    /// The value cannot appear in a header (control characters, or not text).
    #[error("the secret's value cannot be sent in a header (it contains control characters)")]
    NotHeaderSafe,
    /// The rewritten target is not a valid request target.
    #[error("the rewritten request path is invalid")]
    InvalidPath,
}

fn formatted(format: &ValueFormat, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(format.prefix.len() + value.len() + format.suffix.len());
    out.extend_from_slice(format.prefix.as_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(format.suffix.as_bytes());
    out
}

fn sensitive_header(bytes: &[u8]) -> Result<HeaderValue, ApplyError> {
    let mut value = HeaderValue::from_bytes(bytes).map_err(|_| ApplyError::NotHeaderSafe)?;
    // Never indexed by HPACK, never logged by http's Debug.
    value.set_sensitive(true);
    Ok(value)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn percent_decode(text: &str) -> Vec<u8> {
    fn hex(byte: u8) -> Option<u8> {
        (byte as char).to_digit(16).map(|digit| digit as u8)
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let decoded = match bytes[index] {
            b'%' if index + 2 < bytes.len() => hex(bytes[index + 1])
                .zip(hex(bytes[index + 2]))
                .map(|(high, low)| high << 4 | low),
            _ => None,
        };
        match decoded {
            Some(byte) => {
                out.push(byte);
                index += 3;
            }
            None => {
                out.push(if bytes[index] == b'+' {
                    b' '
                } else {
                    bytes[index]
                });
                index += 1;
            }
        }
    }
    out
}

fn set_path_and_query(
    parts: &mut Parts,
    path: &str,
    query: Option<&str>,
) -> Result<(), ApplyError> {
    let target = match query {
        Some(query) if !query.is_empty() => format!("{path}?{query}"),
        _ => path.to_owned(),
    };
    let path_and_query: PathAndQuery = target.parse().map_err(|_| ApplyError::InvalidPath)?;
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = Some(path_and_query);
    parts.uri = http::Uri::from_parts(uri).map_err(|_| ApplyError::InvalidPath)?;
    Ok(())
}

fn set_headers(
    headers: &[HeaderInjection],
    value: &[u8],
    parts: &mut Parts,
) -> Result<bool, ApplyError> {
    for injection in headers {
        let header = sensitive_header(&formatted(&injection.format, value))?;
        // insert() replaces every value the client sent under that name.
        parts.headers.insert(injection.name.clone(), header);
    }
    Ok(true)
}

/// Applies `injection` with `value` to the request. Returns whether it changed anything (a
/// path injection only applies to paths of its shape).
pub fn apply(
    injection: &Injection,
    value: &SecretValue,
    parts: &mut Parts,
) -> Result<bool, ApplyError> {
    let value = value.expose();
    match injection {
        Injection::Headers(headers) => set_headers(headers, value, parts),
        Injection::Basic { username } => {
            let mut credentials = Vec::with_capacity(username.len() + 1 + value.len());
            credentials.extend_from_slice(username.as_bytes());
            credentials.push(b':');
            credentials.extend_from_slice(value);
            let encoded = base64::engine::general_purpose::STANDARD.encode(&credentials);
            let header = sensitive_header(format!("Basic {encoded}").as_bytes())?;
            parts.headers.insert(header::AUTHORIZATION, header);
            Ok(true)
        }
        Injection::Query { name, format } => {
            let path = parts.uri.path().to_owned();
            let mut pairs: Vec<String> = parts
                .uri
                .query()
                .unwrap_or_default()
                .split('&')
                .filter(|pair| !pair.is_empty())
                .filter(|pair| {
                    let key = pair.split_once('=').map_or(*pair, |(key, _)| key);
                    percent_decode(key) != name.as_bytes()
                })
                .map(str::to_owned)
                .collect();
            pairs.push(format!(
                "{}={}",
                percent_encode(name.as_bytes()),
                percent_encode(&formatted(format, value))
            ));
            set_path_and_query(parts, &path, Some(&pairs.join("&")))?;
            Ok(true)
        }
        Injection::PathTemplate { prefix, suffix } => {
            let path = parts.uri.path().to_owned();
            let Some(rest) = path.strip_prefix(prefix.as_str()) else {
                return Ok(false);
            };
            let end = if suffix.is_empty() {
                rest.find('/').unwrap_or(rest.len())
            } else {
                match rest.find(suffix.as_str()) {
                    Some(end) => end,
                    None => return Ok(false),
                }
            };
            let rewritten = format!("{prefix}{}{}", percent_encode(value), &rest[end..]);
            let query = parts.uri.query().map(str::to_owned);
            set_path_and_query(parts, &rewritten, query.as_deref())?;
            Ok(true)
        }
        Injection::PathRegex { regex, replacement } => {
            let path = parts.uri.path().to_owned();
            let Some(captures) = regex.captures(&path) else {
                return Ok(false);
            };
            let whole = captures.get(0).expect("group 0 always exists");
            let mut expanded = String::new();
            captures.expand(replacement, &mut expanded);
            let expanded = expanded.replace("{value}", &percent_encode(value));
            let rewritten = format!(
                "{}{expanded}{}",
                &path[..whole.start()],
                &path[whole.end()..]
            );
            let query = parts.uri.query().map(str::to_owned);
            set_path_and_query(parts, &rewritten, query.as_deref())?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SecretSpec;
    use serde_json::json;

    fn injection(config: serde_json::Value) -> Injection {
        let spec = json!({"name": "s", "hostPattern": "api.example.com", "injection": config});
        SecretSpec::from_json(&spec).unwrap().0.rules[0]
            .injection
            .clone()
    }

    fn request(target: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri(target);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn value(text: &str) -> SecretValue {
        SecretValue::new(text.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn a_header_replaces_the_placeholder_instead_of_adding_a_second_one() {
        let mut parts = request(
            "/v1",
            &[
                ("Authorization", "Bearer placeholder"),
                ("authorization", "Bearer other"),
            ],
        );
        let rule =
            injection(json!({"headerName": "authorization", "valueFormat": "Bearer {value}"}));
        assert_eq!(apply(&rule, &value("sk-real"), &mut parts), Ok(true));
        let all: Vec<_> = parts.headers.get_all("authorization").iter().collect();
        assert_eq!(all, ["Bearer sk-real"]);
        assert!(all[0].is_sensitive());
    }

    #[test]
    fn several_headers_are_set_at_once() {
        let mut parts = request("/", &[]);
        let rule = injection(json!({"headers": [
            {"headerName": "x-api-key"},
            {"headerName": "x-org", "valueFormat": "org-{value}"}
        ]}));
        apply(&rule, &value("k1"), &mut parts).unwrap();
        assert_eq!(parts.headers["x-api-key"], "k1");
        assert_eq!(parts.headers["x-org"], "org-k1");
    }

    #[test]
    fn a_query_parameter_replaces_the_clients_and_is_encoded() {
        let mut parts = request("/maps?key=PLACEHOLDER&q=a%20b&k%65y=again", &[]);
        let rule = injection(json!({"paramName": "key", "paramFormat": "v1:{value}"}));
        apply(&rule, &value("a b&c"), &mut parts).unwrap();
        assert_eq!(
            parts.uri.path_and_query().unwrap().as_str(),
            "/maps?q=a%20b&key=v1%3Aa%20b%26c"
        );
    }

    #[test]
    fn a_path_template_swaps_the_placeholder_segment() {
        let rule = injection(json!({"pathTemplate": "/bot{value}/"}));
        let mut parts = request("/botPLACEHOLDER/sendMessage?chat=1", &[]);
        assert_eq!(apply(&rule, &value("123:ABC"), &mut parts), Ok(true));
        assert_eq!(
            parts.uri.path_and_query().unwrap().as_str(),
            "/bot123%3AABC/sendMessage?chat=1"
        );
        let mut other = request("/other/path", &[]);
        assert_eq!(apply(&rule, &value("x"), &mut other), Ok(false));
        assert_eq!(other.uri.path(), "/other/path");
    }

    #[test]
    fn a_path_regex_uses_captures_and_the_value() {
        let rule = injection(
            json!({"pathRegex": "^/v1/([^/]+)/keys/[^/]+", "pathReplacement": "/v1/$1/keys/{value}"}),
        );
        let mut parts = request("/v1/acme/keys/PLACEHOLDER/use", &[]);
        apply(&rule, &value("s3cr$1t"), &mut parts).unwrap();
        assert_eq!(parts.uri.path(), "/v1/acme/keys/s3cr%241t/use");
    }

    #[test]
    fn basic_auth_encodes_username_and_value() {
        let rule = injection(json!({"username": "x-access-token"}));
        let mut parts = request(
            "/org/repo.git/info/refs",
            &[("authorization", "Basic cGxhY2Vob2xkZXI=")],
        );
        apply(&rule, &value("ghp_abc"), &mut parts).unwrap();
        assert_eq!(
            parts.headers["authorization"],
            "Basic eC1hY2Nlc3MtdG9rZW46Z2hwX2FiYw=="
        );
    }

    #[test]
    fn a_value_with_line_breaks_is_never_put_in_a_header() {
        let rule = injection(json!({"headerName": "x-api-key"}));
        let mut parts = request("/", &[]);
        assert_eq!(
            apply(&rule, &value("a\r\nx-evil: 1"), &mut parts),
            Err(ApplyError::NotHeaderSafe)
        );
        assert!(!parts.headers.contains_key("x-evil"));
    }
}
