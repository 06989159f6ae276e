//! The TCP length-prefix decoder and the Frame decode behind it: any bytes, cut anywhere,
//! never panic, and a decoded frame never claims more bytes than it was given.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let max = 1 + (data.first().copied().unwrap_or(0) as usize) * 257;
    let mut at = 0;
    while at < data.len() {
        match longlink::codec::decode_tcp(&data[at..], max) {
            Ok(Some((body, used))) => {
                assert!(used <= data.len() - at && body.len() <= max);
                let _ = longlink::proto::Frame::decode(body);
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
