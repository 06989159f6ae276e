//! The TCP length-prefix decoder and the Frame decode behind it: any bytes, cut anywhere,
//! never panic, and a decoded frame never claims more bytes than it was given. A HELLO read
//! in place (`HelloView`) agrees with prost's decode whenever it takes a body (its seqid and
//! the credentials' headers, the only ones it keeps).
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
                let f = longlink::proto::Frame::decode(body);
                if let Some(v) = longlink::codec::HelloView::parse(body) {
                    let f = f.expect("what the HELLO reader takes, prost decodes");
                    assert_eq!((f.seqid, f.service, f.method), (v.seqid, 0, 1));
                    for k in ["app_id", "device_id", "token", "user_id"] {
                        assert_eq!(v.header(k), f.header(k), "header {k:?}");
                    }
                }
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
