//! Real third-party clients against the real binary: Python `websockets`, Node `ws`, and
//! pages in headless Chromium (the browser's own WebSocket and cross-origin `fetch`
//! long-poll). The scripts are in tests/clients/; `scripts/deps.sh` installs what they need.
//! A missing tool fails the test with the command that installs it: these tests never skip.

mod common;

use common::*;

/// `script` across a live upgrade of `gw`: the new process's pid (the script's `NEWPID`
/// line) becomes the one `gw` stops, also when the script fails after the upgrade (else
/// that process would outlive the test).
fn run_upgrade(tool: &str, script: &str, gw: &mut Gateway, extra: &[&str]) -> String {
    let (ok, so, se) = run_client_raw(tool, script, gw, extra);
    if let Some(p) = so.lines().find_map(|l| l.strip_prefix("NEWPID ")) {
        gw.pid = p.trim().parse().unwrap_or(gw.pid);
    }
    assert!(ok, "{script} failed\n--- stdout\n{so}\n--- stderr\n{se}");
    so
}

/// The new process's pid, as the script printed it (`NEWPID n`).
fn new_pid(out: &str) -> u32 {
    out.lines()
        .find_map(|l| l.strip_prefix("NEWPID "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no NEWPID line in\n{out}"))
}

#[test]
fn python_websockets_across_a_live_upgrade() {
    let mut gw = gateway_http(None);
    let pid = gw.pid.to_string();
    let out = run_upgrade("python3", "ws_python.py", &mut gw, &["--upgrade-pid", &pid]);
    new_pid(&out);
    assert!(out.contains("1 passed, 0 failed"), "{out}");
}

#[test]
fn python_websockets_raw_and_pbbp2() {
    run_client("python3", "ws_python.py", &gateway_http(None), &[]);
}

/// `script` against a gateway with both TLS listeners, told where the HTTPS one is (and the
/// TCP-over-TLS one, `with_tcp`) and which CA to trust; its one check must pass.
fn run_over_tls(tool: &str, script: &str, with_tcp: bool) {
    let gw = Gateway::spawn_tls(None, &["--http", "127.0.0.1:0"]);
    let (https, tcp_tls, ca) = (gw.addr("https"), gw.addr("tcp_tls"), tls_files().2);
    let mut args = vec!["--https", https.as_str(), "--ca", ca.as_str()];
    if with_tcp {
        args.extend(["--tcp-tls", tcp_tls.as_str()]);
    }
    let out = run_client(tool, script, &gw, &args);
    assert!(out.contains("1 passed, 0 failed"), "{out}");
}

/// `script`'s upgrade check over wss:// (TLS 1.3): its connections stay open across
/// `kill -HUP`, their TLS state handed to the new process.
fn across_an_upgrade_over_tls(tool: &str, script: &str) {
    let mut gw = Gateway::spawn_tls(None, &["--http", "127.0.0.1:0"]);
    let (https, ca, pid) = (gw.addr("https"), tls_files().2, gw.pid.to_string());
    let args = [
        "--https",
        https.as_str(),
        "--ca",
        ca.as_str(),
        "--upgrade-pid",
        &pid,
    ];
    let out = run_upgrade(tool, script, &mut gw, &args);
    new_pid(&out);
    assert!(out.contains("1 passed, 0 failed"), "{out}");
    // (The new process's count: records it could not open would show here.)
    assert_eq!(gw.metrics()["longlink_tls_errors_total"], 0.0);
}

#[test]
fn python_websockets_over_wss_across_a_live_upgrade() {
    across_an_upgrade_over_tls("python3", "ws_python.py");
}

#[test]
fn node_ws_over_wss_across_a_live_upgrade() {
    across_an_upgrade_over_tls("node", "ws_node.mjs");
}

#[test]
fn chromium_wss_across_a_live_upgrade() {
    across_an_upgrade_over_tls("node", "browser.mjs");
}

#[test]
fn python_ssl_over_tls_wss_https_and_tcp() {
    run_over_tls("python3", "ws_python.py", true);
}

#[test]
fn node_ws_over_wss() {
    run_over_tls("node", "ws_node.mjs", false);
}

#[test]
fn node_ws_across_a_live_upgrade() {
    let mut gw = gateway_http(None);
    let pid = gw.pid.to_string();
    let out = run_upgrade("node", "ws_node.mjs", &mut gw, &["--upgrade-pid", &pid]);
    new_pid(&out);
    assert!(out.contains("1 passed, 0 failed"), "{out}");
}

#[test]
fn node_ws_raw_and_pbbp2() {
    run_client("node", "ws_node.mjs", &gateway_http(None), &[]);
}

#[test]
fn chromium_websocket_over_wss_with_the_test_ca_trusted() {
    run_over_tls("node", "browser.mjs", false);
}

#[test]
fn chromium_websocket_and_cross_origin_long_poll() {
    // The pages' origin is listed (not "*"), so they may poll with credentials.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = config(&format!(
        "[http]\ncors_origins = [\"http://127.0.0.1:{port}\"]\n"
    ));
    let gw = gateway_http(Some(&toml));
    run_client(
        "node",
        "browser.mjs",
        &gw,
        &["--page-port", &port.to_string()],
    );
}
