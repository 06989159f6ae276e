//! The HTTP/1.1 request parser (internal API and client listener) and the WebSocket upgrade
//! check on what it returns: any bytes never panic; a complete request never claims more
//! bytes than it was given, and its body is within the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use longlink::http::{parse_request, Limits, Parsed};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_head: 4096,
        max_body: 1024,
    };
    let mut at = 0;
    while at < data.len() {
        match parse_request(&data[at..], &limits) {
            Ok(Parsed::Complete(req, used)) => {
                assert!(used > 0 && used <= data.len() - at);
                assert!(req.body.len() <= limits.max_body);
                let _ = longlink::ws::check_upgrade(req.method, req.version, &req.headers, true);
                let _ = longlink::types::percent_decode(req.target, true);
                let _ = longlink::types::Query::parse(
                    req.target.split_once('?').map_or("", |(_, q)| q),
                );
                at += used;
            }
            Ok(Parsed::Incomplete { .. }) | Err(_) => break,
        }
    }
});
