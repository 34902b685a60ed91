//! Masking echoed secrets in WebSocket messages an upstream sends (RFC 6455 §5). The frames
//! are parsed, not changed in shape: each data message's payload, across its fragments, is
//! masked as one stream (a value may be cut between two frames or two reads), each control
//! frame's payload (a close reason, say) is masked whole, and masks keep lengths, so every
//! header stays true. Compression (permessage-deflate) is kept off by the proxy, and a frame
//! a server must not send (masked, or with reserved bits) ends the connection.

use std::sync::Arc;

use super::redact::{mask_all, mask_held, Redactor};

/// Why the upstream's frames cannot be passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A server frame with the mask bit set (§5.1 forbids it).
    #[error("the upstream sent a masked WebSocket frame")]
    Masked,
    /// A frame with reserved bits set or a reserved opcode: an extension the proxy did not
    /// allow.
    #[error("the upstream sent a WebSocket frame using an extension that was not negotiated")]
    Reserved,
    /// A control frame longer than 125 bytes or fragmented.
    #[error("the upstream sent a malformed WebSocket control frame")]
    BadControl,
}

enum State {
    /// Reading a frame header.
    Header,
    /// Reading this many more payload bytes of a data frame.
    Payload { remaining: u64, fin: bool },
}

/// Redacts one direction of a WebSocket connection: the upstream's frames.
pub struct FrameRedactor {
    redactors: Vec<Arc<Redactor>>,
    state: State,
    /// Bytes received but not yet parsed (an incomplete header or control frame).
    input: Vec<u8>,
    /// Payload bytes of the current message not yet released.
    held: Vec<u8>,
    /// Bytes to send before `held[position]`: frame headers and whole control frames.
    inserts: Vec<(usize, Vec<u8>)>,
}

/// Length of a frame header, from its first two bytes.
fn header_length(second: u8) -> usize {
    match second & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    }
}

fn payload_length(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes(header[2..10].try_into().expect("10-byte header")),
        short => u64::from(short),
    }
}

impl FrameRedactor {
    /// A redactor masking the forms `redactors` know.
    pub fn new(redactors: Vec<Arc<Redactor>>) -> Self {
        Self {
            redactors,
            state: State::Header,
            input: Vec::new(),
            held: Vec::new(),
            inserts: Vec::new(),
        }
    }

    /// Takes bytes the upstream sent and appends to `out` what may go to the client now.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        self.input.extend_from_slice(data);
        loop {
            match self.state {
                State::Payload { remaining, fin } => {
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(self.input.len());
                    self.held.extend(self.input.drain(..take));
                    let remaining = remaining - take as u64;
                    if remaining > 0 {
                        self.state = State::Payload { remaining, fin };
                        break;
                    }
                    self.state = State::Header;
                    if fin {
                        // The message is whole: nothing after it can complete a form.
                        self.release(true, out);
                    }
                }
                State::Header => {
                    if self.input.len() < 2 {
                        break;
                    }
                    let length = header_length(self.input[1]);
                    if self.input.len() < length {
                        break;
                    }
                    let (first, second) = (self.input[0], self.input[1]);
                    if second & 0x80 != 0 {
                        return Err(FrameError::Masked);
                    }
                    // Opcodes 3-7 and 11-15 are reserved (§5.2).
                    if first & 0x70 != 0 || matches!(first & 0x0f, 3..=7 | 11..=15) {
                        return Err(FrameError::Reserved);
                    }
                    let fin = first & 0x80 != 0;
                    let payload = payload_length(&self.input[..length]);
                    if first & 0x08 != 0 {
                        // A control frame: small and never fragmented; masked whole.
                        if payload > 125 || !fin {
                            return Err(FrameError::BadControl);
                        }
                        let total = length + payload as usize;
                        if self.input.len() < total {
                            break;
                        }
                        let mut frame: Vec<u8> = self.input.drain(..total).collect();
                        mask_all(&self.redactors, &mut frame[length..]);
                        self.inserts.push((self.held.len(), frame));
                    } else {
                        let header: Vec<u8> = self.input.drain(..length).collect();
                        self.inserts.push((self.held.len(), header));
                        self.state = State::Payload {
                            remaining: payload,
                            fin,
                        };
                    }
                }
            }
        }
        self.release(false, out);
        Ok(())
    }

    /// Masks what is held and moves to `out` all of it but a tail that could begin a form
    /// (nothing is kept back when `at_end`), with the headers and control frames in place.
    fn release(&mut self, at_end: bool, out: &mut Vec<u8>) {
        let ready = mask_held(&self.redactors, &mut self.held, at_end);
        let mut start = 0;
        let mut inserts = std::mem::take(&mut self.inserts).into_iter().peekable();
        while let Some((position, _)) = inserts.peek() {
            if *position > ready {
                break;
            }
            let (position, bytes) = inserts.next().expect("peeked");
            out.extend_from_slice(&self.held[start..position]);
            out.extend_from_slice(&bytes);
            start = position;
        }
        out.extend_from_slice(&self.held[start..ready]);
        self.held.drain(..ready);
        self.inserts = inserts
            .map(|(position, bytes)| (position - ready, bytes))
            .collect();
    }

    /// The upstream closed: everything still held goes out.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.release(true, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SecretValue;

    const VALUE: &str = "sk-live-0123456789";

    fn redactor() -> FrameRedactor {
        let value = SecretValue::new(VALUE.as_bytes().to_vec()).unwrap();
        FrameRedactor::new(vec![Arc::new(Redactor::new(&value, []))])
    }

    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            0..=125 => frame.push(payload.len() as u8),
            126..=65535 => {
                frame.push(126);
                frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            _ => {
                frame.push(127);
                frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    /// Feeds `stream` in pieces of `step` bytes; returns what went out.
    fn run(stream: &[u8], step: usize) -> Vec<u8> {
        let mut redactor = redactor();
        let mut out = Vec::new();
        for piece in stream.chunks(step) {
            redactor.feed(piece, &mut out).unwrap();
        }
        redactor.finish(&mut out);
        out
    }

    #[test]
    fn text_binary_fragmented_and_control_frames_are_masked_in_place() {
        let masked = "*".repeat(VALUE.len());
        let mut stream = frame(1, true, format!("key={VALUE}!").as_bytes());
        stream.extend(frame(
            2,
            true,
            &[b"\x00\x01".as_slice(), VALUE.as_bytes()].concat(),
        ));
        // A value cut between two fragments, with a ping in the middle.
        stream.extend(frame(1, false, b"a sk-live-01"));
        stream.extend(frame(9, true, VALUE.as_bytes()));
        stream.extend(frame(0, true, b"23456789 b"));
        stream.extend(frame(
            8,
            true,
            &[b"\x03\xe8".as_slice(), VALUE.as_bytes()].concat(),
        ));
        let mut expected = frame(1, true, format!("key={masked}!").as_bytes());
        expected.extend(frame(
            2,
            true,
            &[b"\x00\x01".as_slice(), masked.as_bytes()].concat(),
        ));
        expected.extend(frame(1, false, b"a **********"));
        expected.extend(frame(9, true, masked.as_bytes()));
        expected.extend(frame(0, true, b"******** b"));
        expected.extend(frame(
            8,
            true,
            &[b"\x03\xe8".as_slice(), masked.as_bytes()].concat(),
        ));
        for step in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(run(&stream, step), expected, "pieces of {step}");
        }
    }

    #[test]
    fn long_frames_keep_their_lengths() {
        let payload = format!("{}{VALUE}{}", "x".repeat(300), "y".repeat(70_000));
        let out = run(&frame(1, true, payload.as_bytes()), 4096);
        let expected = payload.replace(VALUE, &"*".repeat(VALUE.len()));
        assert_eq!(out, frame(1, true, expected.as_bytes()));
    }

    #[test]
    fn frames_a_server_must_not_send_end_the_connection() {
        let mut out = Vec::new();
        assert_eq!(
            redactor().feed(&[0x81, 0x85, 1, 2, 3, 4, 0], &mut out),
            Err(FrameError::Masked)
        );
        assert_eq!(
            redactor().feed(&[0xc1, 0x01, b'x'], &mut out),
            Err(FrameError::Reserved)
        );
        // Found by the websocket_frames fuzz target: a reserved opcode.
        assert_eq!(
            redactor().feed(&[0x05, 0x01, b'x'], &mut out),
            Err(FrameError::Reserved)
        );
        assert_eq!(
            redactor().feed(&[0x09, 0x00], &mut out),
            Err(FrameError::BadControl)
        );
    }
}
