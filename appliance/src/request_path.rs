//! Every reading of a request path, for decisions. Upstreams resolve a path in different
//! ways: most normalize it (`/allowed/../other`, `//admin`, `/./admin` and `/%61dmin` are the
//! `/other` and `/admin` they are), object stores keep `//` and `..` as parts of a key, and
//! some decode `%2F` before routing. Secrets' path patterns must match every reading and a
//! block rule holds when it matches any ([`Readings`]); the request itself is forwarded as
//! the client sent it, so a signature over that path, a key with `//` or a URL in a path
//! arrive unchanged.
//!
//! Normalization (RFC 3986 §6.2.2): percent-escapes of unreserved characters are decoded and
//! the others upper-cased, dot segments are removed (§5.2.4), and runs of `/` become one.
//! What cannot be normalized without guessing how the upstream reads it is refused: an
//! invalid escape, NUL, a backslash (raw or `%5C`; some servers take it for `/`), and a dot
//! segment with parameters (`..;x`, which some servers treat as `..`).
//!
//! An encoded slash (`%2F`) stays data, since APIs use it inside identifiers
//! (`projects/group%2Fproject`); [`with_slashes_decoded`] gives the second reading an upstream
//! may make, so that decisions can hold for both.

use std::borrow::Cow;

/// Why a path cannot be normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    #[error("the path has a '%' that is not followed by two hex digits")]
    InvalidEscape,
    /// A NUL byte, raw or encoded.
    #[error("the path contains NUL (%00)")]
    Nul,
    /// A backslash, raw or `%5C`.
    #[error("the path contains a backslash, which servers read differently")]
    Backslash,
    /// A `.` or `..` segment with parameters (`..;x`).
    #[error("the path has a dot segment with parameters (such as '..;'), which servers read differently")]
    DotSegmentParameters,
    /// Not `/…` (nor `*`).
    #[error("the path does not start with '/'")]
    NotAbsolute,
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|digit| digit as u8)
}

/// Whether `path` is already in normal form, so the common case allocates nothing.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    !bytes.iter().any(|&byte| byte == b'%' || byte == b'\\')
        && !path.contains("//")
        && !path.split('/').any(|segment| {
            segment == "."
                || segment == ".."
                || segment.starts_with(".;")
                || segment.starts_with("..;")
        })
}

/// Decodes unreserved escapes and upper-cases the others.
fn normalize_escapes(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let (Some(high), Some(low)) = (
                    bytes.get(index + 1).copied().and_then(hex_value),
                    bytes.get(index + 2).copied().and_then(hex_value),
                ) else {
                    return Err(PathError::InvalidEscape);
                };
                let byte = high << 4 | low;
                match byte {
                    0 => return Err(PathError::Nul),
                    b'\\' => return Err(PathError::Backslash),
                    _ if is_unreserved(byte) => out.push(byte as char),
                    _ => out.push_str(&format!("%{byte:02X}")),
                }
                index += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0 => return Err(PathError::Nul),
            _ => {
                // Copy the whole run up to the next special byte (keeps UTF-8 intact).
                let end = bytes[index..]
                    .iter()
                    .position(|&byte| matches!(byte, b'%' | b'\\' | 0))
                    .map_or(bytes.len(), |offset| index + offset);
                out.push_str(&path[index..end]);
                index = end;
            }
        }
    }
    Ok(out)
}

/// Removes dot segments and empty segments; keeps a trailing `/`.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            _ if segment.starts_with(".;") || segment.starts_with("..;") => {
                return Err(PathError::DotSegmentParameters)
            }
            _ => kept.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// The normal form of a request path (without its query).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let escaped = normalize_escapes(path)?;
    remove_dot_segments(&escaped).map(Cow::Owned)
}

/// The readings of one request path that decisions hold for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readings {
    normalized: String,
    /// The others, each differing from the normalized path and from each other.
    others: Vec<String>,
}

impl Readings {
    /// The readings of `path` (as sent, without its query): the normalized path; the path as
    /// sent with its escapes made canonical (what an upstream that keeps `//` and `..`
    /// resolves); and the normalized path with its encoded slashes decoded. Refused when one
    /// of them cannot be made without guessing.
    pub fn of(path: &str) -> Result<Self, PathError> {
        let normalized = normalize(path)?.into_owned();
        let mut others = Vec::new();
        if normalized != path {
            let as_sent = normalize_escapes(path)?;
            if as_sent != normalized {
                others.push(as_sent);
            }
        }
        if let Some(decoded) = with_slashes_decoded(&normalized)? {
            if decoded != normalized && !others.contains(&decoded) {
                others.push(decoded);
            }
        }
        Ok(Self { normalized, others })
    }

    /// The normalized path: the one logs and the audit name.
    pub fn normalized(&self) -> &str {
        &self.normalized
    }

    /// Every reading, the normalized one first.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.normalized.as_str()).chain(self.others.iter().map(String::as_str))
    }
}

/// The normalized path read with every `%2F` as `/`, when it has one: how an upstream that
/// decodes slashes before routing sees it. Decoding makes new segments, which may be dot
/// segments to remove, or ones that cannot be read without guessing (`..;`): then the path
/// is refused, as it would be without the encoding.
pub fn with_slashes_decoded(normalized: &str) -> Result<Option<String>, PathError> {
    if !normalized.contains("%2F") {
        return Ok(None);
    }
    remove_dot_segments(&normalized.replace("%2F", "/")).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_read_as_sent_normalized_and_with_its_slashes_decoded() {
        let all = |path: &str| -> Vec<String> {
            Readings::of(path)
                .unwrap()
                .all()
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(all("/v1/messages"), ["/v1/messages"]);
        // An object store keeps `//` and `..`: the key as sent is a reading of its own.
        assert_eq!(
            all("/bucket/logs//2024/a"),
            ["/bucket/logs/2024/a", "/bucket/logs//2024/a"]
        );
        assert_eq!(
            all("/bucket/private/../public/x"),
            ["/bucket/public/x", "/bucket/private/../public/x"]
        );
        // Escapes of unreserved characters read the same either way.
        assert_eq!(all("/%61dmin/x"), ["/admin/x"]);
        assert_eq!(
            all("/a/group%2f..%2Fadmin"),
            ["/a/group%2F..%2Fadmin", "/a/admin"]
        );
        assert_eq!(Readings::of("/a\\b"), Err(PathError::Backslash));
    }

    #[test]
    fn paths_resolve_the_way_upstreams_resolve_them() {
        for (raw, normal) in [
            ("/v1/messages", "/v1/messages"),
            ("/", "/"),
            ("/allowed/../other", "/other"),
            ("/allowed/%2e%2e/other", "/other"),
            ("/allowed/%2E%2e/other", "/other"),
            ("//admin/x", "/admin/x"),
            ("/./admin/x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("/public/../admin/x", "/admin/x"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../etc", "/etc"),
            ("/a//b///c/", "/a/b/c/"),
            ("/a%20b/%7e/%7E", "/a%20b/~/~"),
            ("/q%3fx/%3F", "/q%3Fx/%3F"),
            ("/projects/group%2fproject", "/projects/group%2Fproject"),
            ("/caf%C3%A9/é", "/caf%C3%A9/é"),
            ("*", "*"),
        ] {
            assert_eq!(normalize(raw).unwrap(), normal, "{raw}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(
            normalize("/v1/chat/completions"),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(normalize("/a.b/..c/.d"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn what_cannot_be_normalized_without_guessing_is_refused() {
        for (raw, error) in [
            ("/a%zz", PathError::InvalidEscape),
            ("/a%4", PathError::InvalidEscape),
            ("/a%", PathError::InvalidEscape),
            ("/a%00b", PathError::Nul),
            ("/a\\b", PathError::Backslash),
            ("/a%5cb", PathError::Backslash),
            ("/public/..;/admin", PathError::DotSegmentParameters),
            ("/public/.;x/admin", PathError::DotSegmentParameters),
            ("v1/messages", PathError::NotAbsolute),
        ] {
            assert_eq!(normalize(raw).unwrap_err(), error, "{raw}");
        }
    }

    #[test]
    fn encoded_slashes_stay_data_with_a_second_reading() {
        let normal = normalize("/projects/group%2Fproject").unwrap();
        assert_eq!(normal, "/projects/group%2Fproject");
        assert_eq!(
            with_slashes_decoded(&normal).unwrap().unwrap(),
            "/projects/group/project"
        );
        assert_eq!(
            with_slashes_decoded("/public/x%2F..%2F..%2Fadmin")
                .unwrap()
                .unwrap(),
            "/admin"
        );
        assert_eq!(with_slashes_decoded("/plain"), Ok(None));
        // Found by the request_path fuzz target: '..;' that only decoding makes a segment.
        let hidden = normalize("/public%2F..;%2Fadmin").unwrap();
        assert_eq!(
            with_slashes_decoded(&hidden),
            Err(PathError::DotSegmentParameters)
        );
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for raw in ["/a/./b/../c//d/", "/%7e/%2f/%2e%2e/x", "/x/%2e/%41"] {
            let once = normalize(raw).unwrap().into_owned();
            assert_eq!(normalize(&once).unwrap(), once, "{raw}");
        }
    }
}
