//! Keeping injected secrets out of responses. An upstream that echoes a credential (an error
//! page quoting the request, a debug endpoint) must not hand it to the workload that was never
//! meant to hold it. Every form a value commonly takes is masked, in headers and in bodies,
//! also when a value is split across chunks of a streamed body.
//!
//! Masks have the length of what they hide, so `Content-Length` stays true.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use regex::bytes::Regex;

use crate::secret::{Injection, SecretValue};

use super::apply::percent_encode;

const MASK: u8 = b'*';
/// Forms shorter than this are too likely to occur by chance to be masked.
const MIN_FORM_BYTES: usize = 4;

/// The forms of one secret's value to mask.
#[derive(Debug)]
pub struct Redactor {
    forms: Vec<Vec<u8>>,
    pattern: Regex,
}

fn push_encodings(forms: &mut Vec<Vec<u8>>, raw: &[u8]) {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    forms.push(raw.to_vec());
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        forms.push(engine.encode(raw).into_bytes());
    }
    let lower: String = raw.iter().map(|byte| format!("{byte:02x}")).collect();
    forms.push(lower.to_ascii_uppercase().into_bytes());
    forms.push(lower.into_bytes());
    forms.push(percent_encode(raw).into_bytes());
}

impl Redactor {
    /// A redactor for `value` as injected by `injections` (Basic auth adds the encoded
    /// `user:value` pair).
    pub fn new<'a>(
        value: &SecretValue,
        injections: impl IntoIterator<Item = &'a Injection>,
    ) -> Self {
        let mut forms = Vec::new();
        push_encodings(&mut forms, value.expose());
        for injection in injections {
            if let Injection::Basic { username } = injection {
                let mut pair = username.as_bytes().to_vec();
                pair.push(b':');
                pair.extend_from_slice(value.expose());
                push_encodings(&mut forms, &pair);
            }
        }
        forms.retain(|form| form.len() >= MIN_FORM_BYTES);
        forms.sort_by_key(|form| std::cmp::Reverse(form.len()));
        forms.dedup();
        let alternatives: Vec<String> = forms
            .iter()
            .map(|form| regex::escape(&String::from_utf8_lossy(form)))
            .collect();
        let pattern = Regex::new(&alternatives.join("|")).expect("escaped literals always compile");
        Self { forms, pattern }
    }

    /// Masks every form in `data` in place; returns whether anything was masked.
    fn mask(&self, data: &mut [u8]) -> bool {
        let ranges: Vec<std::ops::Range<usize>> = self
            .pattern
            .find_iter(data)
            .map(|found| found.range())
            .collect();
        for range in &ranges {
            data[range.clone()].fill(MASK);
        }
        !ranges.is_empty()
    }

    /// Length of the longest tail of `data` that could begin a form: it must wait for more
    /// data before it can be released.
    fn unfinished_tail(&self, data: &[u8]) -> usize {
        let longest = self.forms.first().map_or(0, Vec::len).saturating_sub(1);
        (1..=longest.min(data.len()))
            .rev()
            .find(|&length| {
                let tail = &data[data.len() - length..];
                self.forms.iter().any(|form| form.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

/// Masks secret forms in header values; returns how many values changed.
pub fn redact_headers(redactors: &[Arc<Redactor>], headers: &mut HeaderMap) -> usize {
    let mut changed = 0;
    for value in headers.values_mut() {
        let mut bytes = value.as_bytes().to_vec();
        let masked = redactors
            .iter()
            .fold(false, |masked, redactor| redactor.mask(&mut bytes) | masked);
        if masked {
            if let Ok(replacement) = HeaderValue::from_bytes(&bytes) {
                *value = replacement;
                changed += 1;
            }
        }
    }
    changed
}

/// A response body with secret forms masked, holding back only a tail that could be the
/// start of a form split across chunks.
pub struct RedactingBody<B> {
    inner: B,
    redactors: Vec<Arc<Redactor>>,
    held: BytesMut,
    trailers: Option<HeaderMap>,
    finished: bool,
}

impl<B> RedactingBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, redactors: Vec<Arc<Redactor>>) -> Self {
        Self {
            inner,
            redactors,
            held: BytesMut::new(),
            trailers: None,
            finished: false,
        }
    }

    /// Masks what is held and releases all of it but a possible unfinished form.
    fn release(&mut self, at_end: bool) -> Option<Bytes> {
        for redactor in &self.redactors {
            redactor.mask(&mut self.held);
        }
        let keep = if at_end {
            0
        } else {
            self.redactors
                .iter()
                .map(|redactor| redactor.unfinished_tail(&self.held))
                .max()
                .unwrap_or(0)
        };
        let ready = self.held.len() - keep;
        (ready > 0).then(|| self.held.split_to(ready).freeze())
    }
}

impl<B> Body for RedactingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            // Trailers come after every byte of the body has been released.
            if let Some(trailers) = self.trailers.take() {
                self.finished = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            if self.finished {
                return Poll::Ready(self.release(true).map(|data| Ok(Frame::data(data))));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.finished = true,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        self.held.extend_from_slice(&data);
                        if let Some(ready) = self.release(false) {
                            return Poll::Ready(Some(Ok(Frame::data(ready))));
                        }
                    }
                    Err(frame) => {
                        if let Ok(mut trailers) = frame.into_trailers() {
                            redact_headers(&self.redactors, &mut trailers);
                            self.trailers = Some(trailers);
                            if let Some(ready) = self.release(true) {
                                return Poll::Ready(Some(Ok(Frame::data(ready))));
                            }
                        }
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.held.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Masks keep lengths, so the inner hint stays true.
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{channel::Channel, BodyExt as _};

    fn redactor(value: &str) -> Arc<Redactor> {
        let value = SecretValue::new(value.as_bytes().to_vec()).unwrap();
        let basic = Injection::Basic {
            username: "x-access-token".into(),
        };
        Arc::new(Redactor::new(&value, [&basic]))
    }

    async fn redact_chunks(
        redactors: Vec<Arc<Redactor>>,
        chunks: &[&str],
    ) -> (Vec<String>, String) {
        let (mut sender, body) =
            Channel::<Bytes, std::convert::Infallible>::new(chunks.len().max(1));
        for chunk in chunks {
            sender
                .send_data(Bytes::copy_from_slice(chunk.as_bytes()))
                .await
                .unwrap();
        }
        drop(sender);
        let mut redacting = RedactingBody::new(body, redactors);
        let mut pieces = Vec::new();
        while let Some(frame) = redacting.frame().await {
            pieces.push(String::from_utf8(frame.unwrap().into_data().unwrap().to_vec()).unwrap());
        }
        let whole = pieces.concat();
        (pieces, whole)
    }

    #[tokio::test]
    async fn every_common_form_is_masked_with_its_length() {
        let value = "sk-live-0123456789";
        let b64 = base64::engine::general_purpose::STANDARD.encode(value);
        let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{value}"));
        let text = format!(
            "raw={value} b64={b64} hex={hex} HEX={} pct={} basic={basic}",
            hex.to_uppercase(),
            percent_encode(b"sk-live-0123456789")
        );
        let (_, whole) = redact_chunks(vec![redactor(value)], &[&text]).await;
        assert_eq!(whole.len(), text.len());
        for form in [
            value.to_owned(),
            b64,
            hex.clone(),
            hex.to_uppercase(),
            basic,
        ] {
            assert!(!whole.contains(&form), "{form} survived in {whole}");
        }
        assert!(whole.starts_with("raw=******************"));
    }

    #[tokio::test]
    async fn a_value_split_across_chunks_is_still_masked() {
        let (_, whole) = redact_chunks(
            vec![redactor("sk-live-0123456789")],
            &["{\"key\": \"sk-li", "ve-0123", "456789\"}"],
        )
        .await;
        assert_eq!(whole, "{\"key\": \"******************\"}");
    }

    #[tokio::test]
    async fn data_that_cannot_start_a_secret_is_not_held_back() {
        let (pieces, _) = redact_chunks(
            vec![redactor("sk-live-0123456789")],
            &["data: one\n\n", "data: two\n\n"],
        )
        .await;
        assert_eq!(pieces, ["data: one\n\n", "data: two\n\n"]);
    }

    #[test]
    fn headers_are_masked() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-echo",
            HeaderValue::from_static("token sk-live-0123456789"),
        );
        headers.insert("x-other", HeaderValue::from_static("fine"));
        assert_eq!(
            redact_headers(&[redactor("sk-live-0123456789")], &mut headers),
            1
        );
        assert_eq!(headers["x-echo"], "token ******************");
        assert_eq!(headers["x-other"], "fine");
    }
}
