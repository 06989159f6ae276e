//! The bench client itself works: a small `connect` and `fanout` against the real gateway,
//! with every message accounted for. (The real measurements are in docs/BENCHMARKS.md.)

mod common;

use std::process::Command;

use common::*;

fn bench(gw: &Gateway, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_longlink-bench"));
    cmd.args(args)
        .args(["--tcp", &gw.tcp, "--api", &gw.api, "--procs", "2"]);
    if !gw.http.is_empty() {
        cmd.args(["--http", &gw.http]); // WebSocket scenarios
    }
    let out = cmd.output().expect("run longlink-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().next().unwrap()).expect("first line is JSON")
}

#[test]
fn connect_and_fanout_scenarios_report_and_lose_nothing() {
    let gw = Gateway::dev();
    let v = bench(&gw, &["connect", "--conns", "400", "--settle-ms", "100"]);
    assert_eq!(v["scenario"], "connect");
    assert_eq!(v["conns"], 400);
    assert!(v["rate_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["rss_kib"].as_u64().unwrap() > 0);
    // The children closed their connections when the scenario ended.
    gw.wait_until("bench connections closed", |g| {
        g.metric("longlink_connections{transport=\"tcp\"}") == 0.0
    });

    let v = bench(
        &gw,
        &[
            "fanout",
            "--subs",
            "300",
            "--messages",
            "20",
            "--window",
            "4",
        ],
    );
    assert_eq!(v["scenario"], "fanout");
    assert_eq!(v["expected"], 6000);
    assert_eq!(v["delivered"], 6000, "{v}");
    assert_eq!(v["lost"], 0);
    assert!(v["p99_us"].as_u64().unwrap() >= v["p50_us"].as_u64().unwrap());
    assert_eq!(
        gw.metric("longlink_pushes_total{outcome=\"delivered\"}"),
        6000.0
    );
}

#[test]
fn unicast_and_rooms_scenarios_account_for_every_push_and_member() {
    let gw = Gateway::dev();
    let v = bench(
        &gw,
        &[
            "unicast",
            "--conns",
            "200",
            "--pushes",
            "5000",
            "--batch",
            "300",
            "--window",
            "2",
            "--wait-ms",
            "5000",
        ],
    );
    assert_eq!(v["scenario"], "unicast");
    assert_eq!(
        (&v["delivered"], &v["acked"]),
        (&5000.into(), &5000.into()),
        "{v}"
    );
    assert_eq!(gw.metric("longlink_acked_pushes_total"), 5000.0);
    assert_eq!(gw.metric("longlink_undelivered_pushes_total"), 0.0);

    let v = bench(&gw, &["rooms", "--members", "20000", "--rooms", "2"]);
    assert_eq!(v["scenario"], "rooms");
    assert!(v["rss_bound_kib"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn the_upgrade_scenario_hands_every_connection_over() {
    let mut gw = Gateway::dev();
    let old = gw.pid;
    let v = bench(&gw, &["upgrade", "--conns", "500", "--pinging", "5"]);
    // The new process is this test's to stop.
    gw.pid = v["new_pid"].as_u64().unwrap() as u32;
    assert_eq!(v["scenario"], "upgrade");
    assert_eq!(v["old_pid"], old);
    assert_ne!(gw.pid, old);
    assert_eq!(v["lost"], 0, "{v}");
    assert!(v["pongs"].as_u64().unwrap() > 0, "{v}");
    assert!(v["handoff_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn connect_measures_the_floor_in_the_same_rounds() {
    // `--floor`: a bare-echo of the bench's own on a port the kernel picks, connected to
    // as many times as the gateway in each round; the gateway sees only its own rounds.
    let gw = Gateway::dev();
    let v = bench(
        &gw,
        &[
            "connect",
            "--conns",
            "300",
            "--rounds",
            "2",
            "--floor",
            "--settle-ms",
            "50",
        ],
    );
    assert_eq!(v["rounds"], 2, "{v}");
    let floors = v["floor_round_cpu_us_per_conn"]
        .as_array()
        .expect("floor rounds");
    assert_eq!(floors.len(), 2, "{v}");
    assert!(floors.iter().all(|f| f.as_f64().unwrap() > 0.0), "{v}");
    assert!(v["ratio"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(gw.metric("longlink_hello_ok_total"), 600.0);
    // Only TCP: bare-echo speaks nothing else.
    let out = Command::new(env!("CARGO_BIN_EXE_longlink-bench"))
        .args(["connect", "--transport", "ws", "--floor", "--conns", "10"])
        .args(["--http", &gw.http, "--api", &gw.api])
        .output()
        .expect("run longlink-bench");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--floor"));
}

#[test]
fn echo_measures_the_floor_in_alternating_passes() {
    // `echo --floor`: the gateway's passes and a bare-echo's, the same client and messages;
    // over WebSocket the floor's connections are TCP (bare-echo speaks nothing else).
    let gw = gateway_http(None);
    let v = bench(
        &gw,
        &[
            "echo",
            "--transport",
            "ws",
            "--conns",
            "20",
            "--rounds",
            "50",
            "--floor",
            "--passes",
            "3",
        ],
    );
    assert_eq!(v["passes"], 3, "{v}");
    for key in [
        "pass_cpu_us_per_round_trip",
        "floor_pass_cpu_us_per_round_trip",
    ] {
        let passes = v[key].as_array().expect(key);
        assert_eq!(passes.len(), 3, "{v}");
        assert!(passes.iter().all(|p| p.as_f64().unwrap() > 0.0), "{v}");
    }
    assert!(v["ratio"].as_f64().unwrap() > 0.0, "{v}");
    // Only the gateway's passes reached the gateway: 20 × 50 messages each.
    assert_eq!(
        gw.metric("longlink_frames_in_total{transport=\"ws\"}"),
        3000.0
    );
}
