//! Messages taken off a node's Redis channel (proto/node.proto), other nodes' answers added
//! up, and durable push records read back from Redis (`cluster::durable`). Any bytes never
//! panic; a message that passes the checks re-encodes to one that passes them again;
//! merging any JSON parts keeps the first part's shape; a record or a push id that decodes
//! encodes back to the same thing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use longlink::cluster::{decode, durable, merge, split_response};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode(data) {
        let again = decode(&m.encode_to_vec()).expect("a checked message re-encodes");
        assert_eq!(again, m);
    }
    let _ = split_response(data);
    if let Some(r) = durable::decode(data).filter(|_| data[0] == 2) {
        assert_eq!(durable::encode(r.expires_ms, r.claim, r.holder, r.waiter, r.body), data);
        let _ = longlink::codec::Shared::from_body(r.body);
    }
    if let Some((order, origin)) = std::str::from_utf8(data).ok().and_then(durable::parse_field) {
        assert_eq!(durable::parse_field(&durable::field(order, origin)), Some((order, origin)));
    }
    // Two answers: the bytes split in half, each read as JSON when it is.
    let (a, b) = data.split_at(data.len() / 2);
    let part = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok().map(|v| (200u16, v));
    if let (Some(x), Some(y)) = (part(a), part(b)) {
        let first_object = x.1.is_object();
        let (_, v) = merge(vec![x, y], &["n2".to_string()]);
        if first_object {
            assert_eq!(v["unreached"], serde_json::json!(["n2"]));
        }
    }
});
