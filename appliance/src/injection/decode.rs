//! Undoing a response's content-coding, so that the redactor can read what the agent would.
//! An upstream asked for `identity` may compress anyway; a compressed echo of a secret must
//! not slip through. Decoding streams: the body is read as it arrives and handed on in
//! pieces of at most [`CHUNK_BYTES`], so a small compressed body that expands hugely
//! (a decompression bomb) never sits in memory whole.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder, ZstdDecoder};
use bytes::{Buf as _, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

/// The most decoded bytes handed on at once.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// The largest zstd window accepted: 8 MiB, the limit RFC 9659 sets for HTTP.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Errors of a decoded body: the upstream's, or the decoder's.
pub type DecodeError = Box<dyn std::error::Error + Send + Sync>;

/// A body read as a byte stream (its trailers dropped: a decoded body has new framing).
struct BodyReader<B> {
    body: B,
    chunk: Bytes,
}

impl<B> AsyncRead for BodyReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<DecodeError>,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let available = ready!(self.as_mut().poll_fill_buf(cx))?;
        let length = available.len().min(buf.remaining());
        buf.put_slice(&available[..length]);
        self.consume(length);
        Poll::Ready(Ok(()))
    }
}

impl<B> AsyncBufRead for BodyReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<DecodeError>,
{
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        while this.chunk.is_empty() {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => break,
                Some(Err(error)) => return Poll::Ready(Err(io::Error::other(error.into()))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.chunk = data;
                    }
                }
            }
        }
        Poll::Ready(Ok(&this.chunk[..]))
    }

    fn consume(mut self: Pin<&mut Self>, amount: usize) {
        self.chunk.advance(amount);
    }
}

/// A body made of what a decoder reads.
pub struct DecodedBody {
    decoder: Pin<Box<dyn AsyncRead + Send + Sync>>,
    finished: bool,
}

impl Body for DecodedBody {
    type Data = Bytes;
    type Error = DecodeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DecodeError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let mut chunk = BytesMut::zeroed(CHUNK_BYTES);
        let mut buf = ReadBuf::new(&mut chunk);
        ready!(self.decoder.as_mut().poll_read(cx, &mut buf))?;
        let length = buf.filled().len();
        if length == 0 {
            self.finished = true;
            return Poll::Ready(None);
        }
        chunk.truncate(length);
        Poll::Ready(Some(Ok(Frame::data(chunk.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// `body` with the content-coding `coding` undone, or `None` for a coding this cannot undo
/// (the caller must then not forward the body: it cannot be inspected).
pub fn decode<B>(body: B, coding: &str) -> Option<DecodedBody>
where
    B: Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<DecodeError>,
{
    let compressed = BodyReader {
        body,
        chunk: Bytes::new(),
    };
    let decoder: Pin<Box<dyn AsyncRead + Send + Sync>> =
        match coding.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Box::pin(GzipDecoder::new(compressed)),
            // HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2).
            "deflate" => Box::pin(ZlibDecoder::new(compressed)),
            "br" => Box::pin(BrotliDecoder::new(compressed)),
            "zstd" => Box::pin(ZstdDecoder::with_params(
                compressed,
                &[async_compression::zstd::DParameter::window_log_max(
                    ZSTD_WINDOW_LOG_MAX,
                )],
            )),
            _ => return None,
        };
    Some(DecodedBody {
        decoder,
        finished: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Full};
    use std::io::Write as _;

    async fn decoded(encoded: Vec<u8>, coding: &str) -> Vec<Bytes> {
        let body = Full::new(Bytes::from(encoded));
        let mut decoded = decode(body, coding).unwrap();
        let mut frames = Vec::new();
        while let Some(frame) = decoded.frame().await {
            frames.push(frame.unwrap().into_data().unwrap());
        }
        frames
    }

    #[tokio::test]
    async fn gzip_and_deflate_are_undone() {
        let text = b"{\"echo\": \"sk-live-0123456789\"}".repeat(10);
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&text).unwrap();
        assert_eq!(decoded(gzip.finish().unwrap(), "gzip").await.concat(), text);
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(&text).unwrap();
        assert_eq!(
            decoded(zlib.finish().unwrap(), "Deflate").await.concat(),
            text
        );
    }

    #[tokio::test]
    async fn brotli_and_zstd_are_undone() {
        let text = b"{\"echo\": \"sk-live-0123456789\"}".repeat(10);
        let mut brotli = Vec::new();
        brotli::BrotliCompress(
            &mut &text[..],
            &mut brotli,
            &brotli::enc::BrotliEncoderParams::default(),
        )
        .unwrap();
        assert_eq!(decoded(brotli, "br").await.concat(), text);
        let zstd = zstd::encode_all(&text[..], 3).unwrap();
        assert_eq!(decoded(zstd, "zstd").await.concat(), text);
    }

    #[tokio::test]
    async fn a_decompression_bomb_is_handed_on_in_small_pieces() {
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(&vec![b'a'; 8 << 20]).unwrap();
        let bomb = gzip.finish().unwrap();
        assert!(bomb.len() < 64 * 1024);
        let frames = decoded(bomb, "gzip").await;
        assert!(frames.iter().all(|frame| frame.len() <= CHUNK_BYTES));
        assert_eq!(frames.iter().map(Bytes::len).sum::<usize>(), 8 << 20);
    }

    #[test]
    fn unknown_codings_are_not_guessed() {
        for coding in ["compress", "gzip, br", "identity2"] {
            assert!(
                decode(Full::new(Bytes::new()), coding).is_none(),
                "{coding}"
            );
        }
    }
}
