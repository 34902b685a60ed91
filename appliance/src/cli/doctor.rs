//! `appliance trust doctor`: real handshakes through the appliance, with each installed
//! runtime, in the environment `appliance exec` gives commands, and a verdict per runtime.
//!
//! Each probe runs in an intercepted cgroup with a private /etc/hosts that sends the checked
//! host to 127.0.0.1: capture redirects the connection to the engine, which terminates TLS
//! with a leaf from the appliance CA, so the handshake succeeds exactly when the runtime
//! trusts that CA. (The engine then finds nothing on 127.0.0.1:443 and answers 502; any HTTP
//! answer means the handshake succeeded.)

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::Context as _;

/// What a probe found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The handshake succeeded.
    Trusted,
    /// Certificate verification failed.
    NotTrusted(String),
    /// The runtime is not here.
    NotInstalled,
    /// The probe failed for another reason.
    Failed(String),
}

/// One runtime's probe: how to run it for `url`, and how to read its outcome.
struct Probe {
    runtime: &'static str,
    /// A command that must exist for the runtime to count as installed.
    needs: &'static str,
    /// An import the runtime needs besides (Python modules).
    python_module: Option<&'static str>,
    argv: fn(&Path, &str) -> Vec<String>,
    /// The fix to suggest when it does not trust the CA.
    fix: &'static str,
}

const PYTHON_PROBE: &str = r#"
import ssl, sys
url, client = sys.argv[1], sys.argv[2]
def verify_failed(error):
    text = repr(error)
    return "CERTIFICATE_VERIFY_FAILED" in text or isinstance(error, ssl.SSLCertVerificationError)
try:
    if client == "urllib":
        import urllib.request, urllib.error
        try:
            urllib.request.urlopen(url, timeout=20)
        except urllib.error.HTTPError:
            pass
    elif client == "requests":
        import requests
        requests.get(url, timeout=20)
    else:
        import httpx
        httpx.get(url, timeout=20)
except Exception as error:
    cause = getattr(error, "reason", None) or error
    print(repr(cause), file=sys.stderr)
    sys.exit(3 if verify_failed(cause) or verify_failed(error) else 1)
"#;

const NODE_PROBE: &str = r#"
require("https").get(process.argv[2], (response) => { response.resume(); process.exit(0); })
  .on("error", (error) => {
    console.error(error.code || error.message);
    process.exit(/CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ISSUER/.test(String(error.code)) ? 3 : 1);
  });
"#;

const GO_PROBE: &str = r#"package main

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
)

func main() {
	response, err := http.Get(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		var unknown x509.UnknownAuthorityError
		if errors.As(err, &unknown) {
			os.Exit(3)
		}
		os.Exit(1)
	}
	response.Body.Close()
}
"#;

const JAVA_PROBE: &str = r#"
public class TrustProbe {
    public static void main(String[] args) throws Exception {
        try {
            java.net.http.HttpClient.newHttpClient().send(
                java.net.http.HttpRequest.newBuilder(java.net.URI.create(args[0])).build(),
                java.net.http.HttpResponse.BodyHandlers.discarding());
        } catch (javax.net.ssl.SSLHandshakeException error) {
            System.err.println(error.getMessage());
            System.exit(3);
        }
    }
}
"#;

fn python(dir: &Path, url: &str, client: &str) -> Vec<String> {
    vec![
        "/usr/bin/python3".into(),
        dir.join("probe.py").display().to_string(),
        url.into(),
        client.into(),
    ]
}

const PROBES: &[Probe] = &[
    Probe {
        runtime: "curl",
        needs: "curl",
        python_module: None,
        argv: |_, url| vec!["curl".into(), "-sS".into(), "-o".into(), "/dev/null".into(), url.into()],
        fix: "run it under appliance exec, or pass --cacert with the bundle",
    },
    Probe {
        runtime: "python (urllib, ssl)",
        needs: "/usr/bin/python3",
        python_module: None,
        argv: |dir, url| python(dir, url, "urllib"),
        fix: "set SSL_CERT_FILE to the bundle (appliance trust env)",
    },
    Probe {
        runtime: "python requests",
        needs: "/usr/bin/python3",
        python_module: Some("requests"),
        argv: |dir, url| python(dir, url, "requests"),
        fix: "set REQUESTS_CA_BUNDLE to the bundle (appliance trust env)",
    },
    Probe {
        runtime: "python httpx (Anthropic, OpenAI SDKs)",
        needs: "/usr/bin/python3",
        python_module: Some("httpx"),
        argv: |dir, url| python(dir, url, "httpx"),
        fix: "set SSL_CERT_FILE to the bundle (appliance trust env)",
    },
    Probe {
        runtime: "node",
        needs: "node",
        python_module: None,
        argv: |dir, url| vec!["node".into(), dir.join("probe.js").display().to_string(), url.into()],
        fix: "set NODE_EXTRA_CA_CERTS to the appliance CA (appliance trust env)",
    },
    Probe {
        runtime: "git",
        needs: "git",
        python_module: None,
        argv: |_, url| vec!["git".into(), "ls-remote".into(), format!("{url}appliance-trust-check.git")],
        fix: "set GIT_SSL_CAINFO to the bundle, or git config http.sslCAInfo",
    },
    Probe {
        runtime: "go",
        needs: "go",
        python_module: None,
        argv: |dir, url| vec!["go".into(), "run".into(), dir.join("probe.go").display().to_string(), url.into()],
        fix: "set SSL_CERT_FILE to the bundle (appliance trust env)",
    },
    Probe {
        runtime: "java",
        needs: "javac",
        python_module: None,
        argv: |dir, url| vec!["java".into(), dir.join("TrustProbe.java").display().to_string(), url.into()],
        fix: "give it the appliance trust store (JAVA_TOOL_OPTIONS from appliance trust env), or import the CA into its cacerts",
    },
];

fn installed(command: &str) -> bool {
    if command.starts_with('/') {
        return Path::new(command).exists();
    }
    appliance::trust::which(command).is_some()
}

fn python_has(module: &str) -> bool {
    std::process::Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|output| output.status.success())
}

fn last_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty() && !line.starts_with("Picked up JAVA_TOOL_OPTIONS"))
        .unwrap_or("(no message)")
        .trim()
        .to_owned()
}

fn read(runtime: &str, output: &Output) -> Verdict {
    let stderr = String::from_utf8_lossy(&output.stderr);
    if runtime == "git" {
        // git ls-remote fails either way (there is no repository); what it says tells.
        return if stderr.contains("SSL certificate problem")
            || stderr.contains("server certificate verification failed")
        {
            Verdict::NotTrusted(last_line(output))
        } else if stderr.contains("Could not resolve") || stderr.contains("Failed to connect") {
            Verdict::Failed(last_line(output))
        } else {
            Verdict::Trusted
        };
    }
    match output.status.code() {
        Some(0) => Verdict::Trusted,
        // curl's "peer certificate cannot be authenticated", and the probes' own code.
        Some(3) | Some(60) => Verdict::NotTrusted(last_line(output)),
        _ => Verdict::Failed(last_line(output)),
    }
}

/// Where the probes run, and how.
pub struct Doctor<'a> {
    /// Runs a command in an intercepted cgroup with the trust environment.
    pub run: &'a dyn Fn(&[OsString]) -> anyhow::Result<Output>,
    /// The host to shake hands for: one the appliance intercepts.
    pub host: &'a str,
    /// A directory for the probes' files.
    pub dir: PathBuf,
}

impl Doctor<'_> {
    /// `argv` with the private /etc/hosts that sends the host to loopback.
    fn wrapped(&self, argv: Vec<String>) -> Vec<OsString> {
        let mut wrapped: Vec<OsString> = ["unshare", "--mount", "--", "sh", "-c"]
            .into_iter()
            .map(OsString::from)
            .collect();
        wrapped.push(r#"mount --bind "$0" /etc/hosts && exec "$@""#.into());
        wrapped.push(self.dir.join("hosts").into());
        wrapped.extend(argv.into_iter().map(OsString::from));
        wrapped
    }

    fn prepare(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        for (name, contents) in [
            (
                "hosts",
                format!("127.0.0.1 {}\n::1 {}\n", self.host, self.host),
            ),
            ("probe.py", PYTHON_PROBE.to_owned()),
            ("probe.js", NODE_PROBE.to_owned()),
            ("probe.go", GO_PROBE.to_owned()),
            ("TrustProbe.java", JAVA_PROBE.to_owned()),
        ] {
            let path = self.dir.join(name);
            std::fs::write(&path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Checks every runtime, or `command` alone when one is given: `(runtime, verdict, fix)`.
    pub fn check(
        &self,
        command: &[OsString],
    ) -> anyhow::Result<Vec<(String, Verdict, &'static str)>> {
        self.prepare()?;
        if !command.is_empty() {
            let argv = command
                .iter()
                .map(|arg| arg.to_string_lossy().into_owned())
                .collect();
            let output = (self.run)(&self.wrapped(argv))?;
            let verdict = match output.status.code() {
                Some(0) => Verdict::Trusted,
                _ => Verdict::NotTrusted(last_line(&output)),
            };
            let name = command[0].to_string_lossy().into_owned();
            return Ok(vec![(name, verdict, "it does not use the variables appliance exec sets; give it the bundle or the CA its own way")]);
        }
        let url = format!("https://{}/", self.host);
        let mut verdicts = Vec::new();
        for probe in PROBES {
            let present = installed(probe.needs) && probe.python_module.is_none_or(python_has);
            let verdict = if present {
                let mut argv = (probe.argv)(&self.dir, &url);
                if probe.runtime == "go" {
                    // go run builds first: keep its cache out of the user's home.
                    argv.splice(
                        0..0,
                        [
                            "env".to_owned(),
                            format!("GOCACHE={}", self.dir.join("gocache").display()),
                            "GO111MODULE=off".to_owned(),
                            format!("HOME={}", self.dir.display()),
                        ],
                    );
                }
                read(probe.runtime, &(self.run)(&self.wrapped(argv))?)
            } else {
                Verdict::NotInstalled
            };
            verdicts.push((probe.runtime.to_owned(), verdict, probe.fix));
        }
        Ok(verdicts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    fn output(code: i32, stderr: &str) -> Output {
        Output {
            status: std::process::ExitStatus::from_raw(code << 8),
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn outcomes_are_read_per_runtime() {
        assert_eq!(read("curl", &output(0, "")), Verdict::Trusted);
        assert!(matches!(
            read("curl", &output(60, "curl: (60) SSL certificate problem")),
            Verdict::NotTrusted(_)
        ));
        assert!(matches!(
            read("curl", &output(6, "curl: (6) Could not resolve host")),
            Verdict::Failed(_)
        ));
        assert_eq!(
            read("git", &output(128, "fatal: repository 'x' not found")),
            Verdict::Trusted
        );
        assert!(matches!(
            read("git", &output(128, "fatal: unable to access 'x': SSL certificate problem: unable to get local issuer certificate")),
            Verdict::NotTrusted(_)
        ));
        let java = read(
            "java",
            &output(
                3,
                "PKIX path building failed\nPicked up JAVA_TOOL_OPTIONS: -D...",
            ),
        );
        assert_eq!(
            java,
            Verdict::NotTrusted("PKIX path building failed".into())
        );
    }
}
