//! JWT auth (issue 14, `[apps.jwt]`): HS256, RS256 and ES256 tokens at HELLO and at the
//! WebSocket upgrade; `sub` becomes the user id, a claim the session data; expired,
//! not-yet-valid, forged and wrong-algorithm tokens are refused (401). Tokens are signed
//! here with the same crate the gateway verifies with, keys from tests/keys.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use longlink::proto::{method, Frame};
use serde_json::json;

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn gateway() -> Gateway {
    let toml = format!(
        r#"node_id = "n1"
[[apps]]
id = "hs"
[apps.jwt]
alg = "HS256"
secret = "shared-secret-of-32-bytes-at-least"
session_claim = "ctx"
leeway_s = 0
[[apps]]
id = "rs"
[apps.jwt]
alg = "RS256"
public_key = "{KEYS}/rsa_public.pem"
audience = "chat"
leeway_s = 0
[[apps]]
id = "es"
[apps.jwt]
alg = "ES256"
public_key = "{KEYS}/ec_public.pem"
issuer = "login.example"
leeway_s = 0
"#
    );
    Gateway::spawn(Some(&toml), &["--http", "127.0.0.1:0"])
}

fn token(alg: Algorithm, key: &EncodingKey, claims: serde_json::Value) -> String {
    encode(&Header::new(alg), &claims, key).unwrap()
}

fn hs() -> EncodingKey {
    EncodingKey::from_secret(b"shared-secret-of-32-bytes-at-least")
}

fn rs() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(format!("{KEYS}/rsa_private.pem")).unwrap()).unwrap()
}

fn es() -> EncodingKey {
    EncodingKey::from_ec_pem(&std::fs::read(format!("{KEYS}/ec_private.pem")).unwrap()).unwrap()
}

/// HELLO with `token`: Ok(the connection), or Err(the ERROR's code).
fn hello(g: &Gateway, app: &str, device: &str, token: &str) -> Result<Client, String> {
    hello_as(g, app, device, token, None)
}

fn hello_as(
    g: &Gateway,
    app: &str,
    device: &str,
    token: &str,
    user: Option<&str>,
) -> Result<Client, String> {
    let mut c = g.connect();
    let mut h = vec![("app_id", app), ("device_id", device), ("token", token)];
    if let Some(u) = user {
        h.push(("user_id", u));
    }
    c.send(&Frame::control(method::HELLO, 1, &h));
    let f = c.recv();
    if f.method == method::HELLO {
        return Ok(c);
    }
    Err(f.header("code").unwrap_or("").to_string())
}

#[test]
fn hs256_tokens_admit_with_their_user_and_session_and_bad_ones_are_refused() {
    let g = gateway();
    let good = token(
        Algorithm::HS256,
        &hs(),
        json!({"sub": "alice", "exp": now() + 60, "ctx": {"room": "r1", "tier": 2}}),
    );
    let _c = hello(&g, "hs", "d1", &good).unwrap();
    let (_, v) = g.api("GET", "/v1/online/device/hs/d1", b"");
    let conn = &v["connections"][0];
    assert_eq!(conn["user_id"], "alice", "{v}");
    assert_eq!(conn["session"], json!({"room": "r1", "tier": "2"}), "{v}");
    // Expired, not yet valid, no exp, forged, another key's.
    for (why, t) in [
        (
            "expired",
            token(
                Algorithm::HS256,
                &hs(),
                json!({"sub": "a", "exp": now() - 5}),
            ),
        ),
        (
            "not yet valid",
            token(
                Algorithm::HS256,
                &hs(),
                json!({"sub": "a", "exp": now() + 60, "nbf": now() + 30}),
            ),
        ),
        (
            "no exp",
            token(Algorithm::HS256, &hs(), json!({"sub": "a"})),
        ),
        (
            "another secret",
            token(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"guess"),
                json!({"sub": "a", "exp": now() + 60}),
            ),
        ),
        ("garbage", "not.a.jwt".to_string()),
        (
            "an RS256 token",
            token(
                Algorithm::RS256,
                &rs(),
                json!({"sub": "a", "exp": now() + 60}),
            ),
        ),
    ] {
        assert_eq!(
            hello(&g, "hs", "d2", &t).err().as_deref(),
            Some("401"),
            "{why}"
        );
    }
    // The user is the token's: a HELLO naming another, or a token naming none with a
    // HELLO naming one, is refused; the same one is fine.
    let bob = token(
        Algorithm::HS256,
        &hs(),
        json!({"sub": "bob", "exp": now() + 60}),
    );
    hello_as(&g, "hs", "u1", &bob, Some("bob")).unwrap();
    assert_eq!(
        hello_as(&g, "hs", "u2", &bob, Some("eve")).err().as_deref(),
        Some("401")
    );
    let nobody = token(Algorithm::HS256, &hs(), json!({"exp": now() + 60}));
    assert_eq!(
        hello_as(&g, "hs", "u3", &nobody, Some("eve"))
            .err()
            .as_deref(),
        Some("401")
    );
    let _anon = hello(&g, "hs", "u4", &nobody).unwrap();
    let (_, v) = g.api("GET", "/v1/online/device/hs/u4", b"");
    assert_eq!(
        v["connections"][0]["user_id"],
        serde_json::Value::Null,
        "{v}"
    );
    // A sub that is not a valid user id.
    let bad_sub = token(
        Algorithm::HS256,
        &hs(),
        json!({"sub": "a\u{1}b", "exp": now() + 60}),
    );
    assert_eq!(
        hello(&g, "hs", "d3", &bad_sub).err().as_deref(),
        Some("401")
    );
    assert_eq!(g.metric("longlink_hello_rejected_total"), 9.0);
}

#[test]
fn rs256_and_es256_tokens_are_checked_with_their_public_keys() {
    let g = gateway();
    // The RS256 app wants its audience.
    let claims = json!({"sub": "bob", "exp": now() + 60, "aud": "chat"});
    let t = token(Algorithm::RS256, &rs(), claims.clone());
    hello(&g, "rs", "r1", &t).unwrap();
    let billing = json!({"sub": "bob", "exp": now() + 60, "aud": "billing"});
    let t = token(Algorithm::RS256, &rs(), billing);
    assert_eq!(
        hello(&g, "rs", "r3", &t).err().as_deref(),
        Some("401"),
        "audience"
    );
    let no_aud = token(
        Algorithm::RS256,
        &rs(),
        json!({"sub": "bob", "exp": now() + 60}),
    );
    assert_eq!(hello(&g, "rs", "r4", &no_aud).err().as_deref(), Some("401"));
    // The ES256 app wants its issuer.
    let es_ok = json!({"sub": "bob", "exp": now() + 60, "iss": "login.example"});
    hello(&g, "es", "e1", &token(Algorithm::ES256, &es(), es_ok)).unwrap();
    assert_eq!(
        hello(
            &g,
            "es",
            "e2",
            &token(Algorithm::ES256, &es(), claims.clone())
        )
        .err()
        .as_deref(),
        Some("401"),
        "no issuer"
    );
    // An HS256 token made with the public key as its secret (the classic confusion).
    let pem = std::fs::read(format!("{KEYS}/rsa_public.pem")).unwrap();
    let confused = token(Algorithm::HS256, &EncodingKey::from_secret(&pem), claims);
    assert_eq!(
        hello(&g, "rs", "r2", &confused).err().as_deref(),
        Some("401")
    );
}

/// The ERROR a HELLO with `token` gets: (code, message).
fn refusal(g: &Gateway, app: &str, token: &str) -> (String, String) {
    let mut c = g.connect();
    let h = [("app_id", app), ("device_id", "x"), ("token", token)];
    c.send(&Frame::control(method::HELLO, 1, &h));
    let f = c.recv();
    assert_eq!(f.method, method::ERROR, "{f:?}");
    let get = |k| f.header(k).unwrap_or("").to_string();
    (get("code"), get("message"))
}

#[test]
fn a_crit_header_is_refused_and_refusals_say_why_without_the_librarys_text() {
    let g = gateway();
    let claims = json!({"sub": "dave", "exp": now() + 60});
    // RFC 7515 §4.1.11: an extension the gateway must understand and does not.
    let mut h = Header::new(Algorithm::HS256);
    h.crit = Some(vec!["zzz".into()]);
    h.extras.insert("zzz".into(), "v".into());
    let crit = encode(&h, &claims, &hs()).unwrap();
    let (code, msg) = refusal(&g, "hs", &crit);
    assert_eq!(code, "401");
    assert!(msg.contains("crit"), "{msg}");
    // The same claims without it are taken.
    hello(
        &g,
        "hs",
        "d9",
        &token(Algorithm::HS256, &hs(), claims.clone()),
    )
    .unwrap();
    // alg "none": refused as malformed, not with the parser's list of algorithms.
    let b64 = |v: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!("{}.{}.", b64(json!({"alg": "none"})), b64(claims.clone()));
    let (code, msg) = refusal(&g, "hs", &none);
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("401", "bad token: malformed")
    );
    let expired = token(
        Algorithm::HS256,
        &hs(),
        json!({"sub": "d", "exp": now() - 5}),
    );
    assert_eq!(refusal(&g, "hs", &expired).1, "bad token: expired");
    let other = EncodingKey::from_secret(b"another-secret-of-32-bytes-at-least!");
    let forged = token(Algorithm::HS256, &other, claims);
    assert_eq!(refusal(&g, "hs", &forged).1, "bad token: bad signature");
    let no_exp = token(Algorithm::HS256, &hs(), json!({"sub": "d"}));
    assert_eq!(refusal(&g, "hs", &no_exp).1, "bad token: no exp claim");
}

#[test]
fn a_websocket_upgrade_with_a_bad_token_gets_401_before_the_upgrade() {
    let g = gateway();
    let good = token(
        Algorithm::HS256,
        &hs(),
        json!({"sub": "carol", "exp": now() + 60}),
    );
    let path = format!("/ws?app_id=hs&device_id=w1&token={good}");
    let mut w = Ws::connect(&g.http, &path, &[]).unwrap();
    let (st, _) = g.api("POST", "/v1/push/user/hs/carol?payload_type=text", b"hi");
    assert_eq!(st, 200);
    assert_eq!(w.recv().text(), "hi");
    let expired = token(
        Algorithm::HS256,
        &hs(),
        json!({"sub": "carol", "exp": now() - 5}),
    );
    let path = format!("/ws?app_id=hs&device_id=w2&token={expired}");
    assert_eq!(
        Ws::connect(&g.http, &path, &[]).err().map(|e| e.0),
        Some(401)
    );
}

#[test]
fn a_jwt_config_that_cannot_be_right_is_refused() {
    let dir = temp_dir("jwt-cfg");
    let check = |cfg: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
            .arg("check-config")
            .arg(cfg)
            .current_dir("/")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cfg = dir.0.join("longlink.toml");
    for (bad, says) in [
        ("alg = \"HS256\"\nsecret = \"short\"", "at least 32 bytes"),
        (
            "alg = \"RS256\"\npublic_key = \"missing.pem\"",
            "missing.pem",
        ),
        ("alg = \"none\"\nsecret = \"x\"", "is not HS256"),
    ] {
        std::fs::write(&cfg, format!("[[apps]]\nid = \"a\"\n[apps.jwt]\n{bad}\n")).unwrap();
        let (ok, err) = check(&cfg);
        assert!(!ok && err.contains(says), "{bad}: {err}");
    }
    // One way to check clients: JWT next to tokens is an error, not a silent choice.
    let secret = "s".repeat(32);
    let both = format!(
        "[[apps]]\nid = \"a\"\ntokens = [\"t\"]\n[apps.jwt]\nalg = \"HS256\"\nsecret = \"{secret}\"\n"
    );
    std::fs::write(&cfg, both).unwrap();
    let (ok, err) = check(&cfg);
    assert!(!ok && err.contains("one way"), "{err}");
    // A relative public_key is relative to the config file, wherever the gateway runs.
    std::fs::copy(format!("{KEYS}/ec_public.pem"), dir.0.join("k.pem")).unwrap();
    let rel = "[[apps]]\nid = \"a\"\n[apps.jwt]\nalg = \"ES256\"\npublic_key = \"k.pem\"\n";
    std::fs::write(&cfg, rel).unwrap();
    let (ok, err) = check(&cfg);
    assert!(ok, "{err}");
}
