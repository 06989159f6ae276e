//! What backends and API callers hand the gateway as text: an auth backend's 200 answer
//! (JSON, checked against the contract), connection ids and query strings. Any bytes never
//! panic; an admitted answer always holds a session within its limits and a valid user id;
//! an id that parses prints back as itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use longlink::types::{check_id, check_session, ConnId, Creds, Query};

fuzz_target!(|data: &[u8]| {
    let c = Creds {
        app_id: "a".into(),
        device_id: "d".into(),
        token: String::new(),
        user_id: None,
    };
    if let Ok(a) = longlink::backend::admission(data, 0, &c) {
        assert!(check_session(&a.session).is_ok());
        if let Some(u) = &a.user {
            assert!(check_id("user", u).is_ok());
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(id) = ConnId::parse(s) {
            assert_eq!(ConnId::parse(&id.to_string()), Some(id));
        }
        let _ = Query::parse(s);
    }
});
