//! Differential check of the redactor: a value (from the input) embedded in filler (from
//! the input) in one of its forms (chosen by the input) never survives masking, in any form
//! the test can spell; masking keeps the length and writes nothing but the mask byte.
#![no_main]

use appliance::injection::Redactor;
use appliance::model::SecretValue;
use libfuzzer_sys::fuzz_target;

/// What the redactor writes over what it masks.
const MASK: u8 = b'*';

fn base64(data: &[u8], url_safe: bool) -> String {
    let alphabet: &[u8; 64] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let bits = chunk
            .iter()
            .enumerate()
            .fold(0u32, |bits, (index, &byte)| bits | u32::from(byte) << (16 - 8 * index));
        for index in 0..=chunk.len() {
            out.push(char::from(alphabet[(bits >> (18 - 6 * index) & 63) as usize]));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [selector, length, rest @ ..] = data else {
        return;
    };
    let length = usize::from(*length % 48).max(8);
    if rest.len() < length {
        return;
    }
    let (value, filler) = rest.split_at(length);
    // Printable values: what API keys are made of.
    let value: Vec<u8> = value.iter().map(|byte| b'!' + byte % 94).collect();
    let Ok(secret) = SecretValue::new(value.clone()) else {
        return;
    };
    let redactor = Redactor::new(&secret, []);
    let (before, after) = filler.split_at(filler.len() / 2);
    let (needle, mut text): (Vec<u8>, Vec<u8>) = match selector % 5 {
        0 => (value.clone(), [before, &value, after].concat()),
        1 => {
            let form: Vec<u8> = value
                .iter()
                .enumerate()
                .flat_map(|(index, byte)| {
                    let text = format!("%{byte:02x}");
                    if (usize::from(*selector) >> 3) & (1 << (index % 5)) != 0 {
                        text.to_uppercase().into_bytes()
                    } else {
                        text.into_bytes()
                    }
                })
                .collect();
            (form.clone(), [before, &form, after].concat())
        }
        2 => {
            let form: Vec<u8> = value
                .iter()
                .flat_map(|byte| format!("\\u{byte:04x}").into_bytes())
                .collect();
            (form.clone(), [before, &form, after].concat())
        }
        _ => {
            // base64 of a blob holding the value at an offset set by the filler.
            let blob = [before, &value, after].concat();
            let encoded = base64(&blob, selector % 5 == 4).into_bytes();
            let start = (8 * before.len()).div_ceil(6);
            let end = 8 * (before.len() + value.len()) / 6;
            (encoded[start..end].to_vec(), encoded)
        }
    };
    let original = text.clone();
    redactor.mask(&mut text);
    assert_eq!(text.len(), original.len());
    assert!(
        text.iter().zip(&original).all(|(after, before)| after == before || *after == MASK),
        "masking wrote something other than the mask byte"
    );
    // A value can itself hold the mask byte (`*********` is a valid key), so masking may
    // spell it anew where it never was: `ab` in the filler before a masked `ab******` reads
    // `ab******`. A form survived where the input held it and the output still holds it,
    // unless it is all mask bytes, which tells nothing.
    let survives = |needle: &[u8]| {
        !needle.iter().all(|&byte| byte == MASK)
            && text
                .windows(needle.len())
                .zip(original.windows(needle.len()))
                .any(|(after, before)| after == needle && before == needle)
    };
    assert!(!survives(&needle), "a form survived");
    assert!(!survives(&value), "the value survived");
});
