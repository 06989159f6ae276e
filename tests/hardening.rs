//! The internal API facing a network (issue 14, "Internal API"): no open API off loopback,
//! the bearer token compared in constant time with its scheme in any case, and `allow_from`
//! turning other addresses away. Real binary, real sockets.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const APP: &str = "[[apps]]\nid = \"demo\"\ntokens = [\"demo-token\"]\n";

/// One request on a connection from `source` (another loopback address); the raw answer
/// ("" when the connection was closed without one).
fn request_from(source: &str, api: &str, path: &str, token: Option<&str>) -> String {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{source}:0").parse().unwrap();
    s.bind(&src.into()).unwrap();
    let to: SocketAddr = api.parse().unwrap();
    s.connect(&to.into()).unwrap();
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(T)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes());
    let mut out = vec![];
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `longlink check-config FILE`: whether it passed, and what it said on stderr.
fn check_config(cfg: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_longlink"))
        .arg("check-config")
        .arg(cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), err)
}

#[test]
fn an_api_off_loopback_with_no_token_refuses_to_start() {
    let dir = temp_dir("open-api");
    let cfg = dir.0.join("longlink.toml");
    std::fs::write(&cfg, format!("node_id = \"n1\"\n{APP}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--tcp", "127.0.0.1:0", "--http", "", "--api", "0.0.0.0:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    // A config error: exit 2, as every other.
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("off loopback, with no [api] token"), "{err}");
    assert!(out.stdout.is_empty(), "no listening line");
    // check-config says so too (for a config that puts the API there).
    std::fs::write(
        &cfg,
        format!("node_id = \"n1\"\n[listen]\napi = \"0.0.0.0:7180\"\n{APP}"),
    )
    .unwrap();
    let (ok, err) = check_config(&cfg);
    assert!(!ok && err.contains("off loopback"), "{err}");

    // A token, or the operator's word that the network is trusted: it starts.
    for extra in ["[api]\ntoken = \"s3cret\"\n", "[api]\nallow_open = true\n"] {
        let g = Gateway::spawn(
            Some(&format!("node_id = \"n1\"\n{extra}{APP}")),
            &["--api", "0.0.0.0:0"],
        );
        assert!(g.api.starts_with("0.0.0.0:"), "{}", g.api);
    }
}

#[test]
fn the_bearer_scheme_is_case_insensitive_and_a_wrong_token_is_refused() {
    let g = Gateway::spawn(
        Some(&format!(
            "node_id = \"n1\"\n[api]\ntoken = \"s3cret\"\n{APP}"
        )),
        &[],
    );
    let path = "/v1/online/device/demo/x";
    for (auth, want) in [
        (Some("Bearer s3cret"), "200"),
        (Some("bearer s3cret"), "200"),
        (Some("BEARER   s3cret "), "200"),
        (Some("Bearer s3crex"), "401"),
        (Some("Bearer s3cret2"), "401"),
        (Some("Basic s3cret"), "401"),
        (None, "401"),
    ] {
        let a = request_from("127.0.0.1", &g.api, path, auth);
        assert_eq!(a.get(9..12), Some(want), "{auth:?}: {a}");
        // A 401 names the scheme it wants (RFC 9110 §11.6.1).
        assert_eq!(
            a.contains("WWW-Authenticate: Bearer\r\n"),
            want == "401",
            "{a}"
        );
    }
    // Health checks need no token.
    let a = request_from("127.0.0.1", &g.api, "/healthz", None);
    assert_eq!(a.get(9..12), Some("200"), "{a}");
}

/// `method path` on the API, `Connection: close`: the whole raw answer.
fn raw_api(api: &str, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = vec![];
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn head_has_no_body_and_a_405_says_what_is_allowed() {
    let g = Gateway::spawn(None, &[]);
    // HEAD as GET, without the body (RFC 9110 §9.3.2).
    for path in ["/healthz", "/metrics"] {
        let a = raw_api(&g.api, "HEAD", path);
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        assert!(a.ends_with("\r\n\r\n"), "a body after the head: {a}");
    }
    // A query the reactor answers is not taken as HEAD: 405, still with no body.
    let a = raw_api(&g.api, "HEAD", "/v1/online/device/demo/x");
    assert!(
        a.starts_with("HTTP/1.1 405") && a.ends_with("\r\n\r\n"),
        "{a}"
    );
    assert!(a.contains("Allow: GET\r\n"), "{a}");
    // A wrong method: 405 with Allow.
    let a = raw_api(&g.api, "POST", "/healthz");
    assert!(
        a.starts_with("HTTP/1.1 405") && a.contains("Allow: GET\r\n"),
        "{a}"
    );
    let a = raw_api(&g.api, "GET", "/v1/push/device/demo/x");
    assert!(
        a.starts_with("HTTP/1.1 405") && a.contains("Allow: POST\r\n"),
        "{a}"
    );
}

#[test]
fn allow_from_turns_other_addresses_away_and_counts_them() {
    let g = Gateway::spawn(
        Some(&format!(
            "node_id = \"n1\"\n[api]\nallow_from = [\"127.0.0.2/32\", \"10.0.0.0/8\"]\n{APP}"
        )),
        &[],
    );
    let ok = request_from("127.0.0.2", &g.api, "/healthz", None);
    assert_eq!(ok.get(9..12), Some("200"), "{ok}");
    for source in ["127.0.0.1", "127.0.0.3"] {
        let no = request_from(source, &g.api, "/healthz", None);
        assert_eq!(no.get(9..12), Some("403"), "{source}: {no}");
        assert!(no.contains("allow_from"), "{no}");
    }
    let m = request_from("127.0.0.2", &g.api, "/metrics", None);
    assert!(
        m.contains("longlink_api_connections_refused_total 2"),
        "{}",
        m.lines()
            .filter(|l| l.contains("refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Clients are not affected: allow_from is the API's alone.
    let (mut c, _) = g.hello("d", None);
    assert!(c.drain_with_ping(1).is_empty());
    std::thread::sleep(Duration::from_millis(10));
}

#[test]
fn a_bad_allow_from_is_a_config_error() {
    let dir = temp_dir("bad-allow");
    let cfg = dir.0.join("longlink.toml");
    std::fs::write(
        &cfg,
        format!("node_id = \"n1\"\n[api]\nallow_from = [\"10.0.0.0/33\"]\n{APP}"),
    )
    .unwrap();
    let (ok, err) = check_config(&cfg);
    assert!(
        !ok && err.contains("allow_from") && err.contains("prefix"),
        "{err}"
    );
}
