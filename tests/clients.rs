//! Real third-party clients against the real binary: Python `websockets`, Node `ws`, and
//! pages in headless Chromium (the browser's own WebSocket and cross-origin `fetch`
//! long-poll). The scripts are in tests/clients/; `scripts/deps.sh` installs what they need.
//! A missing tool fails the test with the command that installs it: these tests never skip.

mod common;

use std::process::Command;

use common::*;

fn run(tool: &str, script: &str) {
    let gw = gateway_http(None);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");
    let out = Command::new(tool)
        .arg(format!("{dir}/{script}"))
        .args(["--http", &gw.http, "--api", &gw.api])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}); run scripts/deps.sh"));
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{script} failed ({}); run scripts/deps.sh if a module is missing\n--- stdout\n{so}\n--- stderr\n{se}", out.status);
}

#[test]
fn python_websockets_raw_and_pbbp2() {
    run("python3", "ws_python.py");
}

#[test]
fn node_ws_raw_and_pbbp2() {
    run("node", "ws_node.mjs");
}

#[test]
fn chromium_websocket_and_cross_origin_long_poll() {
    run("node", "browser.mjs");
}
