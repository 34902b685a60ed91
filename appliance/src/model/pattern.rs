//! Host and path patterns of secrets and access rules.

use std::fmt;

use regex::Regex;

/// A host a secret applies to: an exact DNS name, or `*.suffix` matching exactly one more
/// label (`*.example.com` matches `api.example.com`, not `example.com` or `a.b.example.com`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Exactly this name (lower-case).
    Exact(String),
    /// One label followed by this suffix (lower-case, without the leading `*.`).
    Wildcard(String),
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(host) => f.write_str(host),
            Self::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

fn valid_dns_name(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err("is longer than 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("has an empty label or one longer than 63 characters".into());
        }
        if !label
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
        {
            return Err(
                "may contain only letters, digits, '-' and '.' (and a leading '*.')".into(),
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("has a label that starts or ends with '-'".into());
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(
            "is an IP address; match hosts by name (TLS clients send no name for IPs)".into(),
        );
    }
    Ok(())
}

impl HostPattern {
    /// Parses a pattern; the error explains what is wrong and how to write it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.contains("://") {
            return Err(
                "must not contain a scheme: write `api.example.com`, not `https://api.example.com`"
                    .into(),
            );
        }
        if text.contains('/') {
            return Err("must not contain a path: use pathPattern for paths".into());
        }
        if text.contains(':') {
            return Err(
                "must not contain a port: the appliance matches on the TLS server name".into(),
            );
        }
        if text.chars().any(char::is_whitespace) {
            return Err("must not contain spaces".into());
        }
        let lower = text.to_ascii_lowercase();
        if let Some(suffix) = lower.strip_prefix("*.") {
            valid_dns_name(suffix)?;
            if !suffix.contains('.') {
                return Err(
                    "wildcard must cover a name with at least two labels, such as `*.example.com`"
                        .into(),
                );
            }
            return Ok(Self::Wildcard(suffix.to_owned()));
        }
        if lower.contains('*') {
            return Err(
                "`*` is only allowed as the whole first label, as in `*.example.com`".into(),
            );
        }
        valid_dns_name(&lower)?;
        Ok(Self::Exact(lower))
    }

    /// Whether `host` (lower-case) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => name == host,
            Self::Wildcard(suffix) => host
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        }
    }
}

/// A request path pattern: starts with `/`; `*` matches any run of characters, `/` included.
#[derive(Clone, Debug)]
pub struct PathPattern {
    text: String,
    regex: Regex,
}

impl PartialEq for PathPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for PathPattern {}

impl PathPattern {
    /// Parses a pattern; compiled once, here.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err("must start with `/`, as in `/v1/*`".into());
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain spaces or control characters".into());
        }
        if text.contains('?') {
            return Err("must not contain a query string; patterns match the path only".into());
        }
        let body: Vec<String> = text.split('*').map(regex::escape).collect();
        let regex = Regex::new(&format!("^{}$", body.join(".*")))
            .map_err(|error| format!("cannot be compiled: {error}"))?;
        Ok(Self {
            text: text.to_owned(),
            regex,
        })
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        self.regex.is_match(path)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Literal characters in the pattern: more means more specific.
    pub fn specificity(&self) -> usize {
        self.text.chars().filter(|c| *c != '*').count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_accept_names_and_single_label_wildcards() {
        assert_eq!(
            HostPattern::parse("API.Example.com"),
            Ok(HostPattern::Exact("api.example.com".into()))
        );
        let wildcard = HostPattern::parse("*.example.com").unwrap();
        assert!(wildcard.matches("api.example.com"));
        assert!(!wildcard.matches("example.com"));
        assert!(!wildcard.matches("a.b.example.com"));
        assert!(!wildcard.matches("apiexample.com"));
    }

    #[test]
    fn host_patterns_reject_with_a_reason() {
        for (bad, reason) in [
            ("https://api.example.com", "scheme"),
            ("api.example.com/v1", "path"),
            ("api.example.com:443", "port"),
            ("api example.com", "spaces"),
            ("*.com", "two labels"),
            ("api.*.com", "first label"),
            ("10.0.0.1", "IP address"),
            ("", "empty label"),
            ("-api.example.com", "starts or ends"),
            ("api_x.example.com", "only letters"),
        ] {
            let error = HostPattern::parse(bad).unwrap_err();
            assert!(error.contains(reason), "{bad}: {error}");
        }
    }

    #[test]
    fn path_patterns_glob_over_whole_paths() {
        let pattern = PathPattern::parse("/v1/*/messages").unwrap();
        assert!(pattern.matches("/v1/models/messages"));
        assert!(pattern.matches("/v1/a/b/messages"));
        assert!(!pattern.matches("/v2/a/messages"));
        let literal = PathPattern::parse("/v1.0/x+y").unwrap();
        assert!(literal.matches("/v1.0/x+y"));
        assert!(!literal.matches("/v1a0/xxy"));
        assert!(PathPattern::parse("v1/*")
            .unwrap_err()
            .contains("start with"));
        assert!(PathPattern::parse("/v1?a=b").unwrap_err().contains("query"));
    }

    /// A small deterministic generator: the property holds for many shapes of names.
    #[test]
    fn wildcard_matches_exactly_the_names_one_label_deeper() {
        let labels = ["a", "api", "x-1", "z9", "eu-west", "q"];
        let mut seed = 7u32;
        let mut next = |n: usize| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed as usize >> 8) % n
        };
        for _ in 0..500 {
            let depth = 2 + next(3);
            let suffix: Vec<&str> = (0..depth).map(|_| labels[next(labels.len())]).collect();
            let suffix = suffix.join(".");
            let pattern = HostPattern::parse(&format!("*.{suffix}")).unwrap();
            let extra = 1 + next(3);
            let prefix: Vec<&str> = (0..extra).map(|_| labels[next(labels.len())]).collect();
            let host = format!("{}.{suffix}", prefix.join("."));
            assert_eq!(pattern.matches(&host), extra == 1, "{pattern} vs {host}");
            assert!(!pattern.matches(&suffix));
            assert!(HostPattern::parse(&host).unwrap().matches(&host));
        }
    }
}
