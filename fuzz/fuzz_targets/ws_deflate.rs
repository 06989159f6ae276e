//! permessage-deflate: the extension offer parser, and inflating a client's compressed
//! message — any bytes never panic and never inflate past the limit; what the gateway
//! compresses inflates back to the same bytes, with its stored-block prefix too.
#![no_main]
use libfuzzer_sys::fuzz_target;
use longlink::{deflate, ws};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // Offers: the input as one or two header values.
    let (a, b) = rest.split_at(rest.len() / 2);
    let _ = ws::negotiate_deflate([rest]);
    if let Some(agreed) = ws::negotiate_deflate([a, b]) {
        assert!(agreed.response().starts_with(ws::DEFLATE));
    }
    // Inflate, bounded: a small limit from the first byte, so bombs hit it.
    let max = usize::from(first) * 64;
    let mut out = b"kept".to_vec();
    match deflate::unpack(rest, max, &mut out) {
        Ok(()) => assert!(out.len() - 4 <= max),
        Err(_) => assert!(out.len() - 4 <= max + 1),
    }
    assert_eq!(&out[..4], b"kept");
    // Round trip of what we send: the body compressed, a prefix stored in front.
    let small = first & 1 != 0;
    let mut z = vec![];
    deflate::stored_block(&a[..a.len().min(16)], &mut z);
    let at = z.len();
    if deflate::pack(b, small, &mut z) {
        let mut back = vec![];
        deflate::unpack(&z, rest.len() + 16, &mut back).unwrap();
        assert_eq!(&back[a.len().min(16)..], b);
        assert!(z.len() - at < b.len());
    }
});
