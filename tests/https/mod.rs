//! A real HTTPS upstream for tests: per-SNI certificates from test CAs, HTTP/1.1 and HTTP/2,
//! and endpoints that show what arrived (`/echo`), stream (`/sse`, `/big`) or upgrade (`/ws`).
//! Every request it receives is recorded, so tests can assert what an upstream was sent.

// Each test binary uses the part it needs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::Incoming;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tokio::sync::Notify;

/// A client configuration trusting the certificates in `roots_pem`, speaking HTTP/1.1, with
/// resumption off: benchmarks measure full handshakes, which a resumed session would flatter.
pub fn full_handshake_client_config(roots_pem: &[u8]) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(roots_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config
}

/// Size of the `/big` body.
pub const BIG_BODY: usize = 100 * 1024 * 1024;

/// What [`python_websocket_echo`] sends through the upgraded connection and prints back.
pub const WEBSOCKET_ECHO: &str = "ping through the upgrade";

/// Python lines that, given `s`, a TLS socket connected for `host`, upgrade `/ws` to a
/// WebSocket and define `send(payload)` (a masked text frame, as clients send) and
/// `receive()` (one frame: opcode and payload).
fn python_websocket(host: &str) -> String {
    format!(
        r#"import os, struct
s.sendall(b"GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
          b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
assert head.startswith(b"HTTP/1.1 101"), head
def exactly(n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data
def send(payload):
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + key + masked)
def receive():
    first, second = exactly(2)
    length = second & 0x7f
    if length == 126:
        length = struct.unpack(">H", exactly(2))[0]
    return first & 0x0f, exactly(length)
"#
    )
}

/// Python lines that, given `s`, a TLS socket connected for `host`, upgrade `/ws` to a
/// WebSocket, send [`WEBSOCKET_ECHO`] in a frame and print the payload of the frame that
/// comes back.
pub fn python_websocket_echo(host: &str) -> String {
    format!(
        "{}send(b\"{WEBSOCKET_ECHO}\")\nprint(receive()[1].decode())\n",
        python_websocket(host)
    )
}

/// Python lines that ask the `/ws` upstream to echo the request's authorization in a text
/// and a binary frame, and print both payloads, one per line.
pub fn python_websocket_secret_echo(host: &str) -> String {
    format!(
        "{}send(b\"authorization please\")\nprint(receive()[1].decode())\nprint(receive()[1].decode())\n",
        python_websocket(host)
    )
}

/// Serves a WebSocket after the upgrade: each client frame's payload comes back in a text
/// frame, except `authorization please`, answered with the request's authorization in a
/// text frame and again in a binary one.
async fn serve_websocket(upgraded: hyper::upgrade::Upgraded, authorization: String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    loop {
        let mut head = [0u8; 2];
        if io.read_exact(&mut head).await.is_err() {
            return;
        }
        let length = usize::from(head[1] & 0x7f);
        let mut key = [0u8; 4];
        io.read_exact(&mut key).await.unwrap();
        let mut payload = vec![0u8; length];
        io.read_exact(&mut payload).await.unwrap();
        for (index, byte) in payload.iter_mut().enumerate() {
            *byte ^= key[index % 4];
        }
        let replies: Vec<(u8, Vec<u8>)> = if payload == b"authorization please" {
            vec![
                (0x1, format!("auth={authorization}").into_bytes()),
                (0x2, authorization.clone().into_bytes()),
            ]
        } else {
            vec![(0x1, payload)]
        };
        for (opcode, reply) in replies {
            let mut frame = vec![0x80 | opcode, reply.len() as u8];
            frame.extend_from_slice(&reply);
            io.write_all(&frame).await.unwrap();
        }
    }
}

/// A test certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub pem: String,
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the certificate to `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, &self.pem).unwrap();
    }

    /// A certificate and key for `host`, PEM, for servers outside this process.
    pub fn server_pem(&self, host: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![host.to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server_cert(&self, host: &str) -> Arc<CertifiedKey> {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![host.to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
        Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing))
    }
}

#[derive(Debug)]
struct CertsBySni(Vec<(String, Arc<CertifiedKey>)>);

impl ResolvesServerCert for CertsBySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        self.0
            .iter()
            .find(|(host, _)| host == name)
            .map(|(_, key)| Arc::clone(key))
    }
}

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// TLS server name.
    pub server_name: String,
    /// Method.
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Headers, lower-case names, repeated values joined with ", ".
    pub headers: BTreeMap<String, String>,
    /// Whether the TLS connection it came on resumed an earlier session.
    pub resumed: bool,
    /// Which of the upstream's connections it came on, counted from 0 as accepted.
    pub connection: u64,
}

/// What an upstream received (nothing, for an upstream started without recording).
#[derive(Clone, Default)]
pub struct Seen(Option<Arc<Mutex<Vec<SeenRequest>>>>);

impl Seen {
    /// Every request so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.0
            .as_ref()
            .map(|requests| requests.lock().unwrap().clone())
            .unwrap_or_default()
    }

    /// `(server name, authorization header)` of every request.
    pub fn authorizations(&self) -> Vec<(String, Option<String>)> {
        self.requests()
            .into_iter()
            .map(|request| {
                let authorization = request.headers.get("authorization").cloned();
                (request.server_name, authorization)
            })
            .collect()
    }
}

type UpstreamBody = BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> UpstreamBody {
    Full::new(text.into()).boxed()
}

async fn service(
    mut request: Request<Incoming>,
    server_name: String,
    (resumed, connection): (bool, u64),
    seen: Seen,
    release_sse: Arc<Notify>,
) -> Result<Response<UpstreamBody>, Infallible> {
    let mut headers = BTreeMap::new();
    for (name, value) in request.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|existing: &mut String| {
                existing.push_str(", ");
                existing.push_str(&value);
            })
            .or_insert(value);
    }
    let target = request
        .uri()
        .path_and_query()
        .map_or("/".into(), |target| target.as_str().to_owned());
    let record = SeenRequest {
        server_name: server_name.clone(),
        method: request.method().to_string(),
        target: target.clone(),
        headers: headers.clone(),
        resumed,
        connection,
    };
    if let Some(requests) = &seen.0 {
        requests.lock().unwrap().push(record);
    }
    let response = match request.uri().path() {
        "/sse" => {
            let (mut sender, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(2);
            tokio::spawn(async move {
                let _ = sender.send_data(Bytes::from("data: one\n\n")).await;
                release_sse.notified().await;
                let _ = sender.send_data(Bytes::from("data: two\n\n")).await;
            });
            let mut response = Response::new(body.boxed());
            response
                .headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            response
        }
        "/big" => {
            let (mut sender, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                for _ in 0..BIG_BODY / chunk.len() {
                    if sender.send_data(chunk.clone()).await.is_err() {
                        return;
                    }
                }
            });
            Response::new(body.boxed())
        }
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut request);
            let authorization = headers.get("authorization").cloned().unwrap_or_default();
            tokio::spawn(async move {
                serve_websocket(upgrade.await.unwrap(), authorization).await;
            });
            let mut response = Response::new(full(""));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            response
                .headers_mut()
                .insert("upgrade", "websocket".parse().unwrap());
            response
                .headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            response
        }
        "/upload" => {
            let content_encoding = headers.get("content-encoding").cloned();
            let body = request
                .into_body()
                .collect()
                .await
                .map(|body| body.to_bytes());
            let body = body.unwrap_or_default();
            let digest = ring::digest::digest(&ring::digest::SHA256, &body);
            let hex: String = digest
                .as_ref()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect();
            Response::new(full(
                json!({"sha256": hex, "length": body.len(), "content_encoding": content_encoding})
                    .to_string(),
            ))
        }
        // A hostile echo: the authorization in the status line and in every encoding an
        // attack run got past the redactor.
        "/echo-forms" => {
            use base64::Engine as _;
            let authorization = headers.get("authorization").cloned().unwrap_or_default();
            let blob = json!({"auth": authorization}).to_string();
            let percent_lower: String = authorization
                .bytes()
                .map(|byte| format!("%{byte:02x}"))
                .collect();
            let json_unicode: String = authorization
                .bytes()
                .map(|byte| format!("\\u{byte:04x}"))
                .collect();
            let body = format!(
                "b64={}\npct={percent_lower}\nPCT={}\nunicode={json_unicode}\nslashes={}\n",
                base64::engine::general_purpose::STANDARD.encode(&blob),
                percent_lower.to_uppercase(),
                authorization.replace('/', "\\/"),
            );
            let mut response = Response::new(full(body));
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            response.extensions_mut().insert(
                hyper::ext::ReasonPhrase::try_from(
                    format!("Invalid key {authorization}").into_bytes(),
                )
                .unwrap(),
            );
            response
        }
        // Echoes the authorization gzip-compressed, whatever Accept-Encoding said; or in a
        // coding nobody can decode.
        "/echo-gzip" | "/echo-compress" => {
            use std::io::Write as _;
            let authorization = headers.get("authorization").cloned().unwrap_or_default();
            let mut gzip =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gzip.write_all(format!("{{\"echo\": \"{authorization}\"}}").as_bytes())
                .unwrap();
            let mut response = Response::new(full(gzip.finish().unwrap()));
            let coding = if request.uri().path() == "/echo-gzip" {
                "gzip"
            } else {
                "compress"
            };
            response
                .headers_mut()
                .insert("content-encoding", coding.parse().unwrap());
            response
        }
        // Everything else echoes what arrived, once all of it has: a server that answers
        // before the request body is in cannot keep the connection, and whether the body
        // beats the answer would be a race.
        _ => {
            let method = request.method().as_str().to_owned();
            let version = format!("{:?}", request.version());
            let body_length = request
                .into_body()
                .collect()
                .await
                .map_or(0, |body| body.to_bytes().len());
            Response::new(full(
                json!({
                    "server_name": server_name,
                    "method": method,
                    "target": target,
                    "headers": headers,
                    "authorization": headers.get("authorization"),
                    "version": version,
                    "body_length": body_length,
                })
                .to_string(),
            ))
        }
    };
    Ok(response)
}

/// A running upstream.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it received.
    pub seen: Seen,
    /// Lets `/sse` send its second event.
    pub release_sse: Arc<Notify>,
}

fn certs_for(hosts: &[(&str, &Ca)]) -> CertsBySni {
    CertsBySni(
        hosts
            .iter()
            .map(|(host, ca)| ((*host).to_owned(), ca.server_cert(host)))
            .collect(),
    )
}

impl Upstream {
    /// Starts on `bind`, presenting for each `(host, ca)` a certificate for `host` from `ca`.
    pub async fn start(bind: SocketAddr, hosts: &[(&str, &Ca)]) -> Self {
        Self::serve(bind, certs_for(hosts), true).await
    }

    /// [`Upstream::start`] without recording requests, for benchmarks: a record of millions
    /// of requests would make the upstream slower with every request.
    pub async fn start_unrecorded(bind: SocketAddr, hosts: &[(&str, &Ca)]) -> Self {
        Self::serve(bind, certs_for(hosts), false).await
    }

    /// [`Upstream::start`] for tests without a runtime: it runs on a thread of its own for
    /// the rest of the test process.
    pub fn start_in_background(bind: SocketAddr, hosts: &[(&str, &Ca)]) -> Self {
        let certs = certs_for(hosts);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                ready_tx.send(Self::serve(bind, certs, true).await).unwrap();
                std::future::pending::<()>().await;
            });
        });
        ready_rx.recv().unwrap()
    }

    async fn serve(bind: SocketAddr, certs: CertsBySni, recording: bool) -> Self {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certs));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen(recording.then(Arc::default));
        let release_sse = Arc::new(Notify::new());
        let (task_seen, task_release) = (seen.clone(), Arc::clone(&release_sse));
        tokio::spawn(async move {
            let mut accepted = 0u64;
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let connection = accepted;
                accepted += 1;
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let seen = task_seen.clone();
                let release_sse = Arc::clone(&task_release);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let server_name = tls.get_ref().1.server_name().unwrap_or("").to_owned();
                    let resumed =
                        tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                    let handler = hyper::service::service_fn(move |request| {
                        service(
                            request,
                            server_name.clone(),
                            (resumed, connection),
                            seen.clone(),
                            Arc::clone(&release_sse),
                        )
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), handler)
                    .await;
                });
            }
        });
        Self {
            addr,
            seen,
            release_sse,
        }
    }
}
