//! HTTP on an intercepted client connection, once its TLS handshake is done.
//!
//! A connection opening with the HTTP/2 preface is served by hyper's HTTP/2 server for its
//! whole life. An HTTP/1.1 connection is served by hyper one busy stretch at a time: once it
//! has been idle between requests for [`RELEASE_AFTER`], hyper's connection is closed on its
//! side only (the stream's shutdown is skipped), taken apart ([`http1::Connection::
//! into_parts`]), and just the client stream is kept until the client sends again. hyper
//! holds an 8 KiB read and an 8 KiB write buffer per connection and never lets them go;
//! agents keep many kept-alive connections idle.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Buf as _, Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::sync::{oneshot, watch};
use tracing::debug;

use super::stop_requested;

/// How the client connection is served.
#[derive(Clone, Copy, Debug)]
pub struct HttpSettings {
    /// Limit on receiving a request's headers, from the first byte; also how long a
    /// connection may stay idle between requests.
    pub header_read_timeout: Duration,
    /// Largest request header block accepted.
    pub max_header_bytes: usize,
}

/// What a served connection did, for its closing log line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests answered.
    pub requests: u64,
    /// Times the connection fell idle and gave its HTTP buffers back.
    pub idle_releases: u64,
}

/// A client stream handed over after a `101 Switching Protocols` answer.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

/// Answers one request; any `Fn(Request<RequestBody>) -> impl Future<Output = Response<_>>`
/// that can be shared across the connection's requests is one.
pub trait Handler: Clone + Unpin + Send + Sync + 'static {
    /// The answer's body.
    type Body: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Unpin
        + Send
        + 'static;
    /// The answer, once the request has been served.
    type Answer: Future<Output = Response<Self::Body>> + Send + 'static;

    /// Starts serving `request`.
    fn handle(&self, request: Request<RequestBody>) -> Self::Answer;
}

impl<H, F, B> Handler for H
where
    H: Fn(Request<RequestBody>) -> F + Clone + Unpin + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Unpin
        + Send
        + 'static,
{
    type Body = B;
    type Answer = F;

    fn handle(&self, request: Request<RequestBody>) -> F {
        self(request)
    }
}

/// The stream an upgraded client connection continues on, bytes the client sent after its
/// request included.
pub type UpgradedClient = Box<dyn ClientStream>;

/// In the extensions of every HTTP/1.1 request: lets the request take the client stream
/// over once its `101` answer is written.
#[derive(Clone)]
pub struct ClientUpgrade(Arc<Activity>);

impl ClientUpgrade {
    /// Claims the client stream for the protocol the answer being returned switches to. The
    /// stream arrives once that answer is written; the sender is dropped (an error) if the
    /// connection ends otherwise.
    pub fn claim(self) -> oneshot::Receiver<UpgradedClient> {
        let (sender, receiver) = oneshot::channel();
        *self.0.upgrade.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        receiver
    }
}

/// The body of a client's request, as the proxy forwards it.
pub struct RequestBody {
    incoming: Incoming,
    /// Told once the body has been read to its end (HTTP/1.1 only).
    activity: Option<Arc<Activity>>,
}

impl RequestBody {
    fn tracked(incoming: Incoming, activity: &Arc<Activity>) -> Self {
        let mut body = Self {
            incoming,
            activity: Some(Arc::clone(activity)),
        };
        body.note_end();
        body
    }

    fn untracked(incoming: Incoming) -> Self {
        Self {
            incoming,
            activity: None,
        }
    }

    fn note_end(&mut self) {
        if self.incoming.is_end_stream() {
            self.count_read();
        }
    }

    /// Tells the driver, once, that this body was read to its end.
    fn count_read(&mut self) {
        if let Some(activity) = self.activity.take() {
            activity.bodies_read.fetch_add(1, Ordering::Release);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.incoming).poll_frame(cx));
        if frame.is_none() {
            self.count_read();
        } else {
            self.note_end();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

/// What an HTTP/1.1 connection's requests, bodies and stream report to its driver, which
/// decides from it whether hyper is idle.
#[derive(Default)]
struct Activity {
    /// Requests hyper handed to the service.
    requests: AtomicU64,
    /// Requests whose body was read to its end (read on the upstream's connection task).
    bodies_read: AtomicU64,
    /// Answers whose body hyper is done with.
    answered: AtomicU64,
    /// Bytes were given to the stream since its last completed flush.
    unflushed: AtomicBool,
    /// hyper's closing of the stream is to be skipped: the connection is only idle.
    keep_open: AtomicBool,
    /// The request whose answer switches protocols, waiting for the stream.
    upgrade: Mutex<Option<oneshot::Sender<UpgradedClient>>>,
}

impl Activity {
    /// Whether hyper, having served a request since `requests_before`, now only waits for
    /// the next one: every request read to its end, every answer written and flushed.
    fn idle_after(&self, requests_before: u64) -> bool {
        let requests = self.requests.load(Ordering::Relaxed);
        requests > requests_before
            && self.answered.load(Ordering::Relaxed) == requests
            && self.bodies_read.load(Ordering::Acquire) == requests
            && !self.unflushed.load(Ordering::Relaxed)
    }

    fn take_upgrade(&self) -> Option<oneshot::Sender<UpgradedClient>> {
        self.upgrade
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// An answer's body that tells the driver when hyper is done with it.
struct Answered<B> {
    body: B,
    activity: Arc<Activity>,
}

impl<B> Drop for Answered<B> {
    fn drop(&mut self) {
        self.activity.answered.fetch_add(1, Ordering::Relaxed);
    }
}

impl<B: Body + Unpin> Body for Answered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client stream with bytes already read from it put back in front, and (HTTP/1.1)
/// its writes reported to the driver.
struct Rewind<T> {
    prefix: Bytes,
    stream: T,
    activity: Option<Arc<Activity>>,
}

impl<T> Rewind<T> {
    fn new(prefix: Bytes, stream: T, activity: Option<Arc<Activity>>) -> Self {
        Self {
            prefix,
            stream,
            activity,
        }
    }

    fn note_write(&self) {
        if let Some(activity) = &self.activity {
            activity.unflushed.store(true, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Noted before the outcome is known: a write that is pending left bytes in hyper.
        self.note_write();
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.note_write();
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.stream).poll_flush(cx))?;
        if let Some(activity) = &self.activity {
            activity.unflushed.store(false, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(activity) = &self.activity {
            if activity.keep_open.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long an HTTP/1.1 connection stays idle before hyper's connection is taken apart. A
/// busier connection keeps it: building it again for every request cost 15-20% of the
/// throughput of kept-alive requests (`cargo xtask bench --peers`).
const RELEASE_AFTER: Duration = Duration::from_millis(100);

/// Bytes read at most while a connection waits for its next request.
const FIRST_READ: usize = 1024;

/// Reads the first bytes of the next request; empty at the end of the stream.
async fn first_bytes<T: AsyncRead + Unpin>(stream: &mut T, into: &mut BytesMut) -> io::Result<()> {
    poll_fn(|cx| {
        // On the stack of one poll, then copied: a buffer reserved before the read would be
        // held by every idle connection for as long as it waits.
        let mut chunk = [MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut chunk = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut *stream).poll_read(cx, &mut chunk))?;
        into.extend_from_slice(chunk.filled());
        Poll::Ready(Ok(()))
    })
    .await
}

/// Reads until the bytes either are the HTTP/2 preface or cannot be; returns them and
/// which it was. `None`: the client closed first.
async fn opening<T: AsyncRead + Unpin>(stream: &mut T) -> io::Result<Option<(Bytes, bool)>> {
    let mut seen = BytesMut::new();
    loop {
        let before = seen.len();
        first_bytes(stream, &mut seen).await?;
        if seen.len() == before {
            return Ok(None);
        }
        let compared = seen.len().min(HTTP2_PREFACE.len());
        if seen[..compared] != HTTP2_PREFACE[..compared] {
            return Ok(Some((seen.freeze(), false)));
        }
        if compared == HTTP2_PREFACE.len() {
            return Ok(Some((seen.freeze(), true)));
        }
    }
}

/// Serves HTTP on `stream` with `handler` until the client is done, the connection is
/// idle longer than allowed, or `shutdown` asks it to finish its requests and close.
pub async fn serve<T: ClientStream + 'static, H: Handler>(
    mut stream: T,
    settings: HttpSettings,
    handler: H,
    shutdown: &mut watch::Receiver<bool>,
) -> Served {
    let opened = tokio::select! {
        opened = tokio::time::timeout(settings.header_read_timeout, opening(&mut stream)) => opened,
        () = stop_requested(shutdown) => return Served::default(),
    };
    match opened {
        Ok(Ok(Some((prefix, true)))) => {
            serve_http2(
                Rewind::new(prefix, stream, None),
                settings,
                handler,
                shutdown,
            )
            .await;
            Served::default()
        }
        Ok(Ok(Some((prefix, false)))) => {
            serve_http1(stream, prefix, settings, handler, shutdown).await
        }
        Ok(Ok(None)) => Served::default(),
        Ok(Err(error)) => {
            debug!(%error, "client connection failed before its first request");
            Served::default()
        }
        Err(_) => {
            debug!("no request in time; closing");
            Served::default()
        }
    }
}

async fn serve_http2<T: ClientStream + 'static, H: Handler>(
    stream: Rewind<T>,
    settings: HttpSettings,
    handler: H,
    shutdown: &mut watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let answer = handler.handle(request.map(RequestBody::untracked));
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    // Boxed: the task of an HTTP/1.1 connection need not be sized for this one.
    let mut connection = Box::pin(builder.serve_connection(TokioIo::new(stream), service));
    let finished = tokio::select! {
        result = connection.as_mut() => Some(result),
        () = stop_requested(shutdown) => None,
    };
    let result = match finished {
        Some(result) => result,
        None => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(%error, "client HTTP/2 connection ended with an error");
    }
}

async fn serve_http1<T: ClientStream + 'static, H: Handler>(
    stream: T,
    mut prefix: Bytes,
    settings: HttpSettings,
    handler: H,
    shutdown: &mut watch::Receiver<bool>,
) -> Served {
    let activity = Arc::new(Activity::default());
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |request: Request<Incoming>| {
            activity.requests.fetch_add(1, Ordering::Relaxed);
            let (mut parts, body) = request.into_parts();
            parts
                .extensions
                .insert(ClientUpgrade(Arc::clone(&activity)));
            let request = Request::from_parts(parts, RequestBody::tracked(body, &activity));
            let answer = handler.handle(request);
            let activity = Arc::clone(&activity);
            async move { Ok::<_, Infallible>(answer.await.map(|body| Answered { body, activity })) }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192));

    let mut served = Served::default();
    let mut stream = Some(stream);
    loop {
        let mut current = stream.take().expect("the stream is back between stretches");
        if prefix.is_empty() {
            let mut read = BytesMut::new();
            let waited = tokio::select! {
                waited = tokio::time::timeout(settings.header_read_timeout, first_bytes(&mut current, &mut read)) => waited,
                () = stop_requested(shutdown) => {
                    let _ = current.shutdown().await;
                    break;
                }
            };
            match waited {
                Ok(Ok(())) if !read.is_empty() => prefix = read.freeze(),
                Ok(Ok(())) => break,
                Ok(Err(error)) => {
                    debug!(%error, "idle client connection failed");
                    break;
                }
                Err(_) => {
                    debug!("client connection idle too long; closing");
                    let _ = current.shutdown().await;
                    break;
                }
            }
        }
        let requests_before = activity.requests.load(Ordering::Relaxed);
        activity.keep_open.store(false, Ordering::Relaxed);
        let rewound = Rewind::new(prefix, current, Some(Arc::clone(&activity)));
        // Boxed, so that an idle connection's task holds none of it.
        let mut connection =
            Box::new(builder.serve_connection(TokioIo::new(rewound), service.clone()));
        let mut releasing = false;
        let mut stopping = false;
        let mut idle_since = requests_before;
        let release_timer = tokio::time::sleep(RELEASE_AFTER);
        tokio::pin!(release_timer);
        let result = loop {
            tokio::select! {
                biased;
                () = stop_requested(shutdown), if !stopping => {
                    stopping = true;
                    Pin::new(&mut *connection).graceful_shutdown();
                }
                result = poll_fn(|cx| {
                    loop {
                        match Pin::new(&mut *connection).poll(cx) {
                            Poll::Pending if !releasing && activity.idle_after(requests_before) => {
                                let requests = activity.requests.load(Ordering::Relaxed);
                                if idle_since != requests {
                                    // Pushing a deadline later takes tokio no lock.
                                    idle_since = requests;
                                    release_timer.as_mut().reset(Instant::now() + RELEASE_AFTER);
                                }
                                ready!(release_timer.as_mut().poll(cx));
                                // Idle, so this closes hyper's side at once, and the
                                // client was told nothing: its connection stays open.
                                releasing = true;
                                activity.keep_open.store(true, Ordering::Relaxed);
                                Pin::new(&mut *connection).graceful_shutdown();
                            }
                            polled => return polled,
                        }
                    }
                }) => break result,
            }
        };
        served.requests = activity.answered.load(Ordering::Relaxed);
        let parts = connection.into_parts();
        let Rewind {
            prefix: unread,
            stream: mut current,
            ..
        } = parts.io.into_inner();
        // Copied (or dropped) out of hyper's buffer: the smallest slice of it keeps all of
        // its 8 KiB alive.
        prefix = match (parts.read_buf.is_empty(), unread.is_empty()) {
            (true, _) => unread,
            (false, true) => Bytes::copy_from_slice(&parts.read_buf),
            (false, false) => [parts.read_buf, unread].concat().into(),
        };
        let next = match result {
            Err(error) => {
                debug!(%error, "client HTTP connection ended with an error");
                None
            }
            Ok(()) => match activity.take_upgrade() {
                Some(upgrade) => {
                    let upgraded = Rewind::new(std::mem::take(&mut prefix), current, None);
                    let _ = upgrade.send(Box::new(upgraded));
                    None
                }
                None if releasing && !stopping => Some(current),
                // Released and stopping at once: hyper left the stream open.
                None if releasing => {
                    let _ = current.shutdown().await;
                    None
                }
                // hyper closed the stream.
                None => None,
            },
        };
        match next {
            Some(idle) => {
                served.idle_releases += 1;
                stream = Some(idle);
            }
            None => break,
        }
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Full};
    use tokio::io::{duplex, AsyncReadExt as _, DuplexStream};

    const SETTINGS: HttpSettings = HttpSettings {
        header_read_timeout: Duration::from_secs(5),
        max_header_bytes: 16 * 1024,
    };

    /// Answers `<method> <path> <body bytes>`; `/upgrade` switches to an echo of the stream.
    async fn echo(request: Request<RequestBody>) -> Response<Full<Bytes>> {
        let (mut parts, body) = request.into_parts();
        if parts.uri.path() == "/upgrade" {
            let claimed = parts.extensions.remove::<ClientUpgrade>().unwrap().claim();
            tokio::spawn(async move {
                let mut stream = claimed.await.unwrap();
                let mut buffer = [0u8; 64];
                loop {
                    let read = stream.read(&mut buffer).await.unwrap();
                    if read == 0 {
                        return;
                    }
                    stream.write_all(&buffer[..read]).await.unwrap();
                }
            });
            let mut answer = Response::new(Full::new(Bytes::new()));
            *answer.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
            answer
                .headers_mut()
                .insert(http::header::UPGRADE, "echo".parse().unwrap());
            answer
                .headers_mut()
                .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
            return answer;
        }
        let length = if parts.uri.path() == "/held" {
            // Held unread past the answer, as an upstream still sending may hold it.
            tokio::spawn(async move {
                tokio::time::sleep(RELEASE_AFTER * 3).await;
                drop(body);
            });
            0
        } else {
            body.collect().await.unwrap().to_bytes().len()
        };
        Response::new(Full::new(Bytes::from(format!(
            "{} {} {length}",
            parts.method,
            parts.uri.path()
        ))))
    }

    /// The connection served by [`serve`] with [`echo`], the client's end, and the stop
    /// switch.
    fn connection() -> (
        tokio::task::JoinHandle<Served>,
        DuplexStream,
        watch::Sender<bool>,
    ) {
        let (client, server) = duplex(64 * 1024);
        let (stop, mut stop_rx) = watch::channel(false);
        let served = tokio::spawn(async move { serve(server, SETTINGS, echo, &mut stop_rx).await });
        (served, client, stop)
    }

    /// Reads one answer: its head and its Content-Length body.
    async fn answer(client: &mut DuplexStream) -> (String, String) {
        let mut seen = Vec::new();
        let head_end = loop {
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut byte = [0u8; 1];
            assert_eq!(
                client.read(&mut byte).await.unwrap(),
                1,
                "closed mid-answer"
            );
            seen.push(byte[0]);
        };
        let head = String::from_utf8(seen[..head_end].to_vec()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .map_or(0, |value| value.trim().parse().unwrap());
        let mut body = vec![0u8; length];
        client.read_exact(&mut body).await.unwrap();
        (head, String::from_utf8(body).unwrap())
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n")
    }

    #[tokio::test]
    async fn idle_connections_give_hyper_back_and_go_on_serving() {
        let (served, mut client, _stop) = connection();
        for path in ["/one", "/two", "/three"] {
            client.write_all(get(path).as_bytes()).await.unwrap();
            let (head, body) = answer(&mut client).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(body, format!("GET {path} 0"));
            tokio::time::sleep(RELEASE_AFTER * 2).await;
        }
        drop(client);
        let served = served.await.unwrap();
        assert_eq!(
            served,
            Served {
                requests: 3,
                idle_releases: 3
            }
        );
    }

    #[tokio::test]
    async fn busy_connections_keep_hyper() {
        let (served, mut client, _stop) = connection();
        for _ in 0..20 {
            client.write_all(get("/busy").as_bytes()).await.unwrap();
            assert_eq!(answer(&mut client).await.1, "GET /busy 0");
        }
        drop(client);
        assert_eq!(served.await.unwrap().idle_releases, 0);
    }

    #[tokio::test]
    async fn requests_at_the_moment_of_release_are_answered() {
        let (served, mut client, _stop) = connection();
        let mut requests = 0;
        for step in 0..40u32 {
            // Around the release deadline, on both sides of it.
            let pause =
                RELEASE_AFTER - Duration::from_millis(4) + Duration::from_millis(step.into()) / 5;
            tokio::time::sleep(pause).await;
            let post = "POST /post HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello";
            client.write_all(post.as_bytes()).await.unwrap();
            assert_eq!(answer(&mut client).await.1, "POST /post 5");
            requests += 1;
        }
        drop(client);
        let served = served.await.unwrap();
        assert_eq!(served.requests, requests);
        assert!(served.idle_releases > 0, "{served:?}");
    }

    #[tokio::test]
    async fn pipelined_and_split_requests_survive_a_release() {
        let (served, mut client, _stop) = connection();
        let two = format!("{}{}", get("/first"), get("/second"));
        client.write_all(two.as_bytes()).await.unwrap();
        assert_eq!(answer(&mut client).await.1, "GET /first 0");
        assert_eq!(answer(&mut client).await.1, "GET /second 0");
        tokio::time::sleep(RELEASE_AFTER * 2).await;
        // A head cut in two, the first half sent to a released connection.
        let third = get("/third");
        client.write_all(&third.as_bytes()[..10]).await.unwrap();
        tokio::time::sleep(RELEASE_AFTER * 2).await;
        client.write_all(&third.as_bytes()[10..]).await.unwrap();
        assert_eq!(answer(&mut client).await.1, "GET /third 0");
        drop(client);
        let served = served.await.unwrap();
        assert_eq!(served.requests, 3);
        assert_eq!(served.idle_releases, 1, "never released mid-request");
    }

    #[tokio::test]
    async fn a_body_left_unread_does_not_become_the_next_request() {
        let (served, mut client, _stop) = connection();
        // Answered before its body was sent: hyper cannot tell the body from what follows
        // unless it reads it, so the connection must not be released meanwhile.
        let post = "POST /held HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\n";
        client.write_all(post.as_bytes()).await.unwrap();
        assert_eq!(answer(&mut client).await.1, "POST /held 0");
        client.write_all(b"hello").await.unwrap();
        tokio::time::sleep(RELEASE_AFTER * 4).await;
        let _ = client
            .write_all(format!("world{}", get("/after")).as_bytes())
            .await;
        let mut rest = String::new();
        let _ = client.read_to_string(&mut rest).await;
        assert!(
            rest.is_empty() || rest.ends_with("GET /after 0"),
            "the body was taken for a request: {rest:?}"
        );
        assert_eq!(served.await.unwrap().idle_releases, 0);
    }

    #[tokio::test]
    async fn an_upgrade_gets_the_stream_with_the_bytes_sent_after_its_request() {
        let (_served, mut client, _stop) = connection();
        tokio::time::sleep(RELEASE_AFTER * 2).await;
        let upgrade = "GET /upgrade HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nearly";
        client.write_all(upgrade.as_bytes()).await.unwrap();
        let (head, _) = answer(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut echoed = [0u8; 5];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"early");
        client.write_all(b"later").await.unwrap();
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"later");
    }

    #[tokio::test]
    async fn connection_close_and_stop_close_the_stream() {
        let (served, mut client, _stop) = connection();
        let close = "GET /close HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
        client.write_all(close.as_bytes()).await.unwrap();
        assert_eq!(answer(&mut client).await.1, "GET /close 0");
        assert_eq!(client.read(&mut [0u8; 1]).await.unwrap(), 0, "closed after");
        served.await.unwrap();

        let (served, mut client, stop) = connection();
        client
            .write_all(get("/before-stop").as_bytes())
            .await
            .unwrap();
        assert_eq!(answer(&mut client).await.1, "GET /before-stop 0");
        tokio::time::sleep(RELEASE_AFTER * 2).await;
        stop.send(true).unwrap();
        assert_eq!(
            client.read(&mut [0u8; 1]).await.unwrap(),
            0,
            "closed on stop"
        );
        assert_eq!(served.await.unwrap().idle_releases, 1);
    }

    #[tokio::test]
    async fn an_idle_connection_closes_after_the_header_read_timeout() {
        let (client, server) = duplex(1024);
        let (_stop, mut stop_rx) = watch::channel(false);
        let settings = HttpSettings {
            header_read_timeout: Duration::from_millis(300),
            ..SETTINGS
        };
        let served = tokio::spawn(async move { serve(server, settings, echo, &mut stop_rx).await });
        let mut client = client;
        client.write_all(get("/once").as_bytes()).await.unwrap();
        assert_eq!(answer(&mut client).await.1, "GET /once 0");
        let started = std::time::Instant::now();
        assert_eq!(client.read(&mut [0u8; 1]).await.unwrap(), 0);
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert_eq!(served.await.unwrap().idle_releases, 1);
    }

    #[tokio::test]
    async fn the_http2_preface_is_served_as_http2() {
        let (client, server) = duplex(64 * 1024);
        let (_stop, mut stop_rx) = watch::channel(false);
        tokio::spawn(async move { serve(server, SETTINGS, echo, &mut stop_rx).await });
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = Request::builder()
            .uri("https://a.test/h2")
            .body(Full::new(Bytes::from_static(b"abc")))
            .unwrap();
        let answer = sender.send_request(request).await.unwrap();
        assert_eq!(answer.version(), http::Version::HTTP_2);
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "GET /h2 3");
    }
}
