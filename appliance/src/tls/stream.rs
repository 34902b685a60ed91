//! The server side of an intercepted client connection's TLS, on rustls' unbuffered API.
//!
//! rustls' buffered connection keeps a 4 KiB record buffer for the connection's whole life,
//! empty or not; agents keep many kept-alive connections idle. Here the buffers (records
//! received, records to send, plaintext not yet read) are freed whenever a read finds
//! nothing waiting, and such a read allocates nothing: an idle connection holds rustls'
//! session state and the socket, no buffer.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, WriteTraffic,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// Most ciphertext kept waiting for the rest of its record or handshake message: rustls
/// accepts handshake messages up to 64 KiB, and one record more.
const MAX_INCOMING: usize = 64 * 1024 + 18 * 1024;

/// Plaintext encrypted per write call; a larger write is taken in parts.
const MAX_WRITE: usize = 64 * 1024;

/// Records waiting to be sent beyond which a write waits for the socket.
const MAX_UNSENT: usize = 64 * 1024;

/// An established server-side TLS connection over `IO`.
pub struct ServerTls<IO> {
    io: IO,
    connection: UnbufferedServerConnection,
    /// Records received and not yet processed (a partial record or handshake message).
    incoming: Vec<u8>,
    /// Records to send; `outgoing[sent..]` are not sent yet.
    outgoing: Vec<u8>,
    sent: usize,
    /// Plaintext decrypted and not yet read; `plaintext[read..]` are waiting.
    plaintext: Vec<u8>,
    read: usize,
    /// The client sent close_notify, or closed its socket at a record boundary.
    read_closed: bool,
    /// Our close_notify is queued.
    close_queued: bool,
}

/// Where processing the received records stopped.
enum Reached {
    /// The handshake is done; nothing more to do without new records.
    Traffic,
    /// The handshake needs more records from the client.
    Handshaking,
}

/// Completes the handshake of a connection whose first bytes (the ClientHello, at least)
/// were already read into `received`.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    config: Arc<ServerConfig>,
    received: Vec<u8>,
) -> io::Result<ServerTls<IO>> {
    let connection = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
    let mut tls = ServerTls {
        io,
        connection,
        incoming: received,
        outgoing: Vec::new(),
        sent: 0,
        plaintext: Vec::new(),
        read: 0,
        read_closed: false,
        close_queued: false,
    };
    loop {
        let reached = match tls.advance(None) {
            Ok(reached) => reached,
            Err(error) => {
                // The alert rustls queued for the client, best effort.
                let _ = std::future::poll_fn(|cx| tls.poll_send(cx)).await;
                return Err(error);
            }
        };
        std::future::poll_fn(|cx| tls.poll_send(cx)).await?;
        // A TLS 1.3 server may send once its Finished is out, before the client's arrives:
        // the handshake (and a client's refusal of our leaf) is over only with that.
        match reached {
            Reached::Traffic if !tls.connection.is_handshaking() => return Ok(tls),
            Reached::Traffic | Reached::Handshaking => {
                if !std::future::poll_fn(|cx| tls.poll_receive(cx)).await? {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
}

fn invalid_data(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Room for `needed` more bytes at the end of `buffer`, zero-filled: rustls writes into
/// initialized slices.
fn room(buffer: &mut Vec<u8>, needed: usize) -> &mut [u8] {
    let start = buffer.len();
    buffer.resize(start + needed, 0);
    &mut buffer[start..]
}

/// Appends what `write` puts into a slice of the size it asks for.
fn append_sized<E: std::error::Error + Send + Sync + 'static>(
    buffer: &mut Vec<u8>,
    mut estimate: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> io::Result<()> {
    loop {
        let start = buffer.len();
        let result = write(room(buffer, estimate));
        match result {
            Ok(written) => {
                buffer.truncate(start + written);
                return Ok(());
            }
            Err(error) => {
                buffer.truncate(start);
                match required(&error) {
                    Some(size) if size > estimate => estimate = size,
                    _ => return Err(io::Error::other(error)),
                }
            }
        }
    }
}

fn encrypt_into(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    plaintext: &[u8],
    outgoing: &mut Vec<u8>,
) -> io::Result<()> {
    // A TLS 1.3 record adds 22 bytes to at most 16 KiB of plaintext.
    let estimate = plaintext.len() + 22 * (plaintext.len() / (16 * 1024) + 1);
    append_sized(
        outgoing,
        estimate,
        |into| traffic.encrypt(plaintext, into),
        encrypt_required,
    )
}

fn encrypt_required(error: &EncryptError) -> Option<usize> {
    match error {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encode_required(error: &EncodeError) -> Option<usize> {
    match error {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerTls<IO> {
    /// Processes every complete record received: plaintext is kept for reading, handshake
    /// and alert records to send are queued. With `write`, encrypts that plaintext or a
    /// close_notify once the handshake allows it.
    fn advance(&mut self, write: Option<Write<'_>>) -> io::Result<Reached> {
        let mut write = write;
        // Records already sent make room before more are queued: a socket that always takes
        // part of them would otherwise let the buffer grow without end.
        if self.sent > 0 {
            self.outgoing.drain(..self.sent);
            self.sent = 0;
        }
        loop {
            let status = self.connection.process_tls_records(&mut self.incoming);
            let mut discard = status.discard;
            let reached = match status.state {
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(invalid_data)?;
                        discard += record.discard;
                        if self.read == self.plaintext.len() {
                            self.plaintext.clear();
                            self.read = 0;
                        }
                        self.plaintext.extend_from_slice(record.payload);
                    }
                    None
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    append_sized(
                        &mut self.outgoing,
                        1024,
                        |into| encode.encode(into),
                        encode_required,
                    )?;
                    None
                }
                // Queued in order behind everything queued before; sent with it.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    None
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.read_closed = true;
                    None
                }
                Ok(ConnectionState::Closed) => Some(Reached::Traffic),
                Ok(ConnectionState::BlockedHandshake) => Some(Reached::Handshaking),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    match write.take() {
                        Some(Write::Data(plaintext)) => {
                            encrypt_into(&mut traffic, plaintext, &mut self.outgoing)?;
                        }
                        Some(Write::CloseNotify) => append_sized(
                            &mut self.outgoing,
                            64,
                            |into| traffic.queue_close_notify(into),
                            encrypt_required,
                        )?,
                        None => {}
                    }
                    Some(Reached::Traffic)
                }
                // The configuration accepts no early data.
                Ok(ConnectionState::ReadEarlyData(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected early data",
                    ))
                }
                Ok(_) => {
                    return Err(io::Error::other("unknown TLS connection state"));
                }
                Err(error) => {
                    self.discard(discard);
                    self.queue_alert();
                    return Err(invalid_data(error));
                }
            };
            self.discard(discard);
            if let Some(reached) = reached {
                if write.is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "TLS connection not ready to send",
                    ));
                }
                return Ok(reached);
            }
        }
    }

    /// Queues the alert rustls has for the client after an error, if any.
    fn queue_alert(&mut self) {
        let status = self.connection.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
            let _ = append_sized(
                &mut self.outgoing,
                64,
                |into| encode.encode(into),
                encode_required,
            );
        }
    }

    fn discard(&mut self, discard: usize) {
        if discard == 0 {
            return;
        }
        if discard >= self.incoming.len() {
            self.incoming.clear();
        } else {
            self.incoming.drain(..discard);
        }
    }

    /// Sends queued records until none are left (`Ready(Ok)`) or the socket is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let written =
                ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += written;
        }
        self.outgoing.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads more records from the socket; `false` at its end.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS records larger than accepted",
            )));
        }
        // Into the stack first: a read that finds nothing must allocate nothing, or every
        // idle connection would hold a buffer.
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut chunk = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut chunk))?;
        if chunk.filled().is_empty() {
            return Poll::Ready(Ok(false));
        }
        self.incoming.extend_from_slice(chunk.filled());
        Poll::Ready(Ok(true))
    }

    /// Copies waiting plaintext into `buf`; whether there was any.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let waiting = &self.plaintext[self.read..];
        if waiting.is_empty() {
            return false;
        }
        let taken = waiting.len().min(buf.remaining());
        buf.put_slice(&waiting[..taken]);
        self.read += taken;
        if self.read == self.plaintext.len() {
            self.plaintext.clear();
            self.read = 0;
        }
        true
    }

    /// Gives back the memory of every empty buffer. Called when a read finds nothing: a
    /// busy connection keeps reusing its buffers, an idle one holds none.
    fn release_empty_buffers(&mut self) {
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        if self.sent == self.outgoing.len() {
            self.outgoing = Vec::new();
            self.sent = 0;
        }
        if self.read == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.read = 0;
        }
    }
}

/// What a pass of [`ServerTls::advance`] encrypts.
enum Write<'a> {
    Data(&'a [u8]),
    CloseNotify,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerTls<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.take_plaintext(buf) || this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let advanced = this.advance(None);
            // Handshake and key-update records rustls answers with, or the alert of an
            // error, go out before waiting.
            let sent = this.poll_send(cx);
            advanced?;
            if let Poll::Ready(Err(error)) = sent {
                return Poll::Ready(Err(error));
            }
            if this.take_plaintext(buf) || this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let received = match this.poll_receive(cx) {
                Poll::Ready(received) => received?,
                Poll::Pending => {
                    this.release_empty_buffers();
                    return Poll::Pending;
                }
            };
            if !received {
                if !this.incoming.is_empty() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed the connection inside a TLS record",
                    )));
                }
                // A client that closes without close_notify ends its stream all the same;
                // HTTP's own framing tells whether anything was cut short.
                this.read_closed = true;
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerTls<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_send(cx) {
            Poll::Ready(result) => result?,
            Poll::Pending if this.outgoing.len() - this.sent >= MAX_UNSENT => return Poll::Pending,
            Poll::Pending => {}
        }
        let taken = data.len().min(MAX_WRITE);
        this.advance(Some(Write::Data(&data[..taken])))?;
        if let Poll::Ready(Err(error)) = this.poll_send(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            this.close_queued = true;
            this.advance(Some(Write::CloseNotify))?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{CertificateAuthority, LeafCache};
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::RootCertStore;
    use tokio::io::{duplex, AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
    use tokio_rustls::client::TlsStream;
    use tokio_rustls::TlsConnector;

    const HOST: &str = "api.example.com";

    struct Fixture {
        server_config: Arc<ServerConfig>,
        ca_pem: String,
        dir: std::path::PathBuf,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "appliance-tls-stream-{}-{name}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let ca = CertificateAuthority::load_or_create(&dir).unwrap();
            let ca_pem = ca.certificate_pem().to_owned();
            let leaves = Arc::new(LeafCache::new(ca, 4));
            Self {
                server_config: crate::tls::server_config(leaves).unwrap(),
                ca_pem,
                dir,
            }
        }

        fn client_config(
            &self,
            trusting: bool,
            versions: &[&'static rustls::SupportedProtocolVersion],
        ) -> Arc<rustls::ClientConfig> {
            let mut roots = RootCertStore::empty();
            if trusting {
                roots
                    .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
                    .unwrap();
            }
            let config = rustls::ClientConfig::builder_with_protocol_versions(versions)
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        }

        fn connector(&self, trusting: bool) -> TlsConnector {
            TlsConnector::from(self.client_config(trusting, rustls::DEFAULT_VERSIONS))
        }

        /// A client and the accepted server side, over an in-memory pipe of `capacity`.
        async fn pair(
            &self,
            capacity: usize,
        ) -> (TlsStream<DuplexStream>, ServerTls<DuplexStream>) {
            self.pair_with(self.client_config(true, rustls::DEFAULT_VERSIONS), capacity)
                .await
        }

        async fn pair_with(
            &self,
            client_config: Arc<rustls::ClientConfig>,
            capacity: usize,
        ) -> (TlsStream<DuplexStream>, ServerTls<DuplexStream>) {
            let (client_io, server_io) = duplex(capacity);
            let server = tokio::spawn(accept(
                server_io,
                Arc::clone(&self.server_config),
                Vec::new(),
            ));
            let client = TlsConnector::from(client_config)
                .connect(ServerName::try_from(HOST).unwrap(), client_io)
                .await
                .unwrap();
            (client, server.await.unwrap().unwrap())
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn large_transfers_both_ways_and_a_clean_close() {
        let fixture = Fixture::new("transfer");
        let (client, mut server) = fixture.pair(4096).await;
        let echo = tokio::spawn(async move {
            let mut buffer = vec![0u8; 10_000];
            loop {
                let read = server.read(&mut buffer).await.unwrap();
                if read == 0 {
                    break;
                }
                server.write_all(&buffer[..read]).await.unwrap();
            }
            server.shutdown().await.unwrap();
        });
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut reader, mut writer) = tokio::io::split(client);
        let to_send = sent.clone();
        let writing = tokio::spawn(async move {
            writer.write_all(&to_send).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        // Ends without error only on the server's close_notify.
        reader.read_to_end(&mut received).await.unwrap();
        writing.await.unwrap();
        echo.await.unwrap();
        assert_eq!(received.len(), sent.len());
        assert!(received == sent);
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_writer_to_bounded_memory() {
        let fixture = Fixture::new("slow");
        // The pipe takes 4 KiB at a time: every send of queued records is partial.
        let (mut client, mut server) = fixture.pair(4096).await;
        let reading = tokio::spawn(async move {
            let mut total = 0;
            let mut buffer = vec![0u8; 1000];
            loop {
                let read = client.read(&mut buffer).await.unwrap();
                if read == 0 {
                    return total;
                }
                total += read;
            }
        });
        let chunk = vec![7u8; 64 * 1024];
        let mut largest = 0;
        for _ in 0..64 {
            server.write_all(&chunk).await.unwrap();
            largest = largest.max(server.outgoing.capacity());
        }
        server.shutdown().await.unwrap();
        assert_eq!(reading.await.unwrap(), 64 * chunk.len());
        assert!(
            largest <= 2 * (MAX_UNSENT + MAX_WRITE),
            "{largest} bytes queued"
        );
    }

    /// One request and its answer each way, as a check that the connection works.
    async fn exchange(client: &mut TlsStream<DuplexStream>, server: &mut ServerTls<DuplexStream>) {
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        let mut ping = [0u8; 4];
        server.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
    }

    #[tokio::test]
    async fn a_tls_1_2_client_is_served() {
        let fixture = Fixture::new("tls12");
        let config = fixture.client_config(true, &[&rustls::version::TLS12]);
        let (mut client, mut server) = fixture.pair_with(config, 64 * 1024).await;
        exchange(&mut client, &mut server).await;
        assert_eq!(
            client.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
    }

    #[tokio::test]
    async fn a_key_update_from_the_client_is_answered_in_order() {
        let fixture = Fixture::new("keyupdate");
        let (mut client, mut server) = fixture.pair(64 * 1024).await;
        exchange(&mut client, &mut server).await;
        // rustls asks the peer to update too: the server's answer must come under new keys,
        // after its own key update.
        client.get_mut().1.refresh_traffic_keys().unwrap();
        exchange(&mut client, &mut server).await;
        exchange(&mut client, &mut server).await;
    }

    #[tokio::test]
    async fn a_returning_client_resumes_its_session() {
        let fixture = Fixture::new("resume");
        let config = fixture.client_config(true, rustls::DEFAULT_VERSIONS);
        let (mut client, mut server) = fixture.pair_with(Arc::clone(&config), 64 * 1024).await;
        // Reading the answer takes in the tickets sent after the handshake.
        exchange(&mut client, &mut server).await;
        assert_eq!(
            client.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        let (mut again, mut server) = fixture.pair_with(config, 64 * 1024).await;
        exchange(&mut again, &mut server).await;
        assert_eq!(
            again.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let fixture = Fixture::new("idle");
        let (mut client, mut server) = fixture.pair(64 * 1024).await;
        for _ in 0..3 {
            client.write_all(&[b'q'; 3000]).await.unwrap();
            client.flush().await.unwrap();
            let mut request = vec![0u8; 3000];
            server.read_exact(&mut request).await.unwrap();
            server.write_all(&[b'a'; 5000]).await.unwrap();
            server.flush().await.unwrap();
            let mut answer = vec![0u8; 5000];
            client.read_exact(&mut answer).await.unwrap();
        }
        let mut buffer = [0u8; 64];
        std::future::poll_fn(|cx| {
            let mut read = ReadBuf::new(&mut buffer);
            assert!(Pin::new(&mut server).poll_read(cx, &mut read).is_pending());
            Poll::Ready(())
        })
        .await;
        assert_eq!(server.incoming.capacity(), 0);
        assert_eq!(server.outgoing.capacity(), 0);
        assert_eq!(server.plaintext.capacity(), 0);
        // And it still serves when the client speaks again.
        client.write_all(b"again").await.unwrap();
        client.flush().await.unwrap();
        let mut again = [0u8; 5];
        server.read_exact(&mut again).await.unwrap();
        assert_eq!(&again, b"again");
    }

    #[tokio::test]
    async fn a_client_that_refuses_the_leaf_fails_the_accept_with_its_alert() {
        let fixture = Fixture::new("refused");
        let (client_io, server_io) = duplex(64 * 1024);
        let server = tokio::spawn(accept(
            server_io,
            Arc::clone(&fixture.server_config),
            Vec::new(),
        ));
        let client = fixture
            .connector(false)
            .connect(ServerName::try_from(HOST).unwrap(), client_io)
            .await;
        assert!(client.is_err());
        let error = server.await.unwrap().err().expect("the accept fails");
        let alert = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned();
        assert!(
            matches!(
                alert,
                Some(rustls::Error::AlertReceived(
                    rustls::AlertDescription::UnknownCA | rustls::AlertDescription::BadCertificate
                ))
            ),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn the_first_bytes_read_elsewhere_start_the_handshake() {
        let fixture = Fixture::new("replayed");
        let (client_io, mut server_io) = duplex(64 * 1024);
        let client = tokio::spawn({
            let connector = fixture.connector(true);
            async move {
                let mut client = connector
                    .connect(ServerName::try_from(HOST).unwrap(), client_io)
                    .await
                    .unwrap();
                client.write_all(b"hello").await.unwrap();
                client.flush().await.unwrap();
                client
            }
        });
        // What the proxy does: read the ClientHello's first bytes before deciding.
        let mut first = vec![0u8; 100];
        server_io.read_exact(&mut first).await.unwrap();
        let mut server = accept(server_io, Arc::clone(&fixture.server_config), first)
            .await
            .unwrap();
        let mut hello = [0u8; 5];
        server.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        drop(client.await.unwrap());
    }

    #[tokio::test]
    async fn a_connection_cut_inside_a_record_is_an_error_and_at_a_boundary_an_end() {
        let fixture = Fixture::new("cut");
        let (client, mut server) = fixture.pair(64 * 1024).await;
        let (mut raw, _) = client.into_inner();
        // The header of an application data record, and no more.
        raw.write_all(&[0x17, 0x03, 0x03, 0x00, 0x40])
            .await
            .unwrap();
        drop(raw);
        let mut buffer = [0u8; 16];
        let error = server.read(&mut buffer).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);

        let (client, mut server) = fixture.pair(64 * 1024).await;
        drop(client);
        assert_eq!(server.read(&mut buffer).await.unwrap(), 0);
    }
}
