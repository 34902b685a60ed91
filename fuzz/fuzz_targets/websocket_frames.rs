//! Any bytes an upstream sends after a WebSocket upgrade, in any cut: the frame redactor
//! never panics, never sends more than it received, and no message or control payload it
//! sends holds the value (frame headers are the upstream's own bytes, not message content).
#![no_main]

use std::sync::{Arc, OnceLock};

use appliance::injection::{FrameRedactor, Redactor};
use appliance::model::SecretValue;
use libfuzzer_sys::fuzz_target;

const VALUE: &[u8] = b"sk-live-0123456789";

fn holds_value(payload: &[u8]) -> bool {
    payload.windows(VALUE.len()).any(|window| window == VALUE)
}

/// The payloads of the frames in `stream`: each data message's fragments joined, each
/// control frame's alone. A frame cut off at the end counts with what arrived of it.
fn payloads(mut stream: &[u8]) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    let mut message = Vec::new();
    while stream.len() >= 2 {
        let (first, second) = (stream[0], stream[1]);
        let (header, length): (usize, u64) = match second & 0x7f {
            126 if stream.len() >= 4 => (4, u64::from(u16::from_be_bytes([stream[2], stream[3]]))),
            127 if stream.len() >= 10 => (10, u64::from_be_bytes(stream[2..10].try_into().unwrap())),
            126 | 127 => break,
            short => (2, u64::from(short)),
        };
        let end = usize::try_from(length).map_or(stream.len(), |length| {
            header.saturating_add(length).min(stream.len())
        });
        let payload = &stream[header..end];
        if first & 0x08 != 0 {
            payloads.push(payload.to_vec());
        } else {
            message.extend_from_slice(payload);
            if first & 0x80 != 0 {
                payloads.push(std::mem::take(&mut message));
            }
        }
        stream = &stream[end..];
    }
    payloads.push(message);
    payloads
}

fuzz_target!(|data: &[u8]| {
    let [step, stream @ ..] = data else {
        return;
    };
    static REDACTOR: OnceLock<Arc<Redactor>> = OnceLock::new();
    let redactor = REDACTOR.get_or_init(|| {
        Arc::new(Redactor::new(&SecretValue::new(VALUE.to_vec()).unwrap(), []))
    });
    let mut frames = FrameRedactor::new(vec![Arc::clone(redactor)]);
    let mut out = Vec::new();
    let mut fed = 0;
    for piece in stream.chunks(usize::from(*step).max(1)) {
        fed += piece.len();
        if frames.feed(piece, &mut out).is_err() {
            return;
        }
    }
    frames.finish(&mut out);
    assert!(out.len() <= fed);
    assert!(!payloads(&out).iter().any(|payload| holds_value(payload)));
});
