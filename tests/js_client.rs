//! The JavaScript client (clients/js/): its own suite under Node's test runner against the
//! real binary (the client's tests start the gateways they need), and a page using it in
//! headless Chromium.

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_js_client_suite_passes_under_nodes_test_runner() {
    let root = env!("CARGO_MANIFEST_DIR");
    let tests =
        ["codec.test.mjs", "client.test.mjs"].map(|t| format!("{root}/clients/js/test/{t}"));
    // Node 20 has its WebSocket behind a flag (22+ by default); the suite also runs the
    // client once on the `ws` package (tests/clients, installed by scripts/deps.sh).
    let ws = format!("{root}/tests/clients/node_modules/ws/wrapper.mjs");
    assert!(
        std::path::Path::new(&ws).exists(),
        "{ws} is missing: run scripts/deps.sh"
    );
    let out = Command::new("node")
        .args(["--experimental-websocket", "--test", "--test-reporter=spec"])
        .arg("--test-timeout=120000")
        .args(&tests)
        .env("LONGLINK_BIN", env!("CARGO_BIN_EXE_longlink"))
        .env("LONGLINK_WS_MODULE", &ws)
        // The test CA, for the wss:// tests' balancer.
        .env(
            "NODE_EXTRA_CA_CERTS",
            format!("{root}/tests/keys/tls_ca.pem"),
        )
        .current_dir(root)
        .output()
        .expect("node (run scripts/deps.sh)");
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "node --test failed\n{so}\n{se}");
    // Every test ran: none skipped (the ws-package run needs LONGLINK_WS_MODULE).
    assert!(so.contains("ℹ skipped 0"), "{so}");
    assert!(so.contains("ℹ fail 0"), "{so}");
}

#[test]
fn a_page_using_the_js_client_receives_pushes_in_chromium() {
    dev_script_passes("js_client.mjs");
}

#[test]
fn the_type_declarations_compile_against_a_strict_use_of_the_client() {
    let root = env!("CARGO_MANIFEST_DIR");
    let tsc = format!("{root}/tests/clients/node_modules/typescript/bin/tsc");
    let out = Command::new("node")
        .arg(&tsc)
        .args([
            "--noEmit", "--strict", "--target", "es2022", "--module", "nodenext",
        ])
        .args(["--moduleResolution", "nodenext", "--lib", "es2022,dom"])
        .arg(format!("{root}/clients/js/test/types.ts"))
        .output()
        .unwrap_or_else(|e| panic!("node {tsc}: {e} (run scripts/deps.sh)"));
    assert!(
        out.status.success(),
        "tsc: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
