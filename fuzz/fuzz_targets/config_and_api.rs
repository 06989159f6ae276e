//! The config file parser (any text: a config or a list of errors, never a panic), address
//! ranges (`[api] allow_from`), and the internal API's router and validation on whole
//! requests, the batch JSON included (whatever parses as HTTP reaches `Api::handle` as it
//! would on a worker: an answer or a command, never a panic). Seeds: fuzz/seeds/config_and_api.
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use longlink::api::{Api, ApiRequest};
use longlink::cluster::View;
use longlink::config::Config;
use longlink::http::{parse_request, Limits, Parsed};
use longlink::metrics::Metrics;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text);
        if let Ok(r) = longlink::types::Cidr::parse(text) {
            let _ = r.contains("10.1.2.3".parse().unwrap());
            let _ = r.contains("::1".parse().unwrap());
        }
    }
    thread_local! {
        static API: Api = {
            let cfg = Arc::new(Config::dev());
            let m = Arc::new(Metrics::new(&cfg));
            let view = Arc::new(View::new(&cfg.node_id, false));
            Api::new(cfg, m, view)
        };
    }
    let limits = Limits {
        max_head: 8192,
        max_body: 1 << 16,
    };
    if let Ok(Parsed::Complete(req, _)) = parse_request(data, &limits) {
        let req = ApiRequest::from_parsed(&req);
        API.with(|api| {
            let _ = api.handle(&req, 0);
        });
    }
});
