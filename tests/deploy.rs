//! What `deploy/` ships for monitoring (the Grafana dashboard, the Prometheus alert rules)
//! against the real binary's `/metrics`: every metric they name exists, with the labels they
//! select and group by, and the label values they match on; the rules pass `promtool` where
//! it is installed (scripts/deps.sh installs it).

mod common;

use std::collections::{BTreeSet, HashMap};

use common::*;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/longlink.json");
const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/prometheus/longlink-alerts.yml"
);

/// Labels Prometheus adds at the scrape, or a histogram's own.
const OUTSIDE: [&str; 3] = ["instance", "job", "le"];

/// The families of an exposition: name → (type, label → the values seen).
type Families = HashMap<String, (String, HashMap<String, BTreeSet<String>>)>;

fn families(text: &str) -> Families {
    let mut f: Families = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            f.insert(name.into(), (kind.into(), HashMap::new()));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let sample = line.rsplit_once(' ').expect("name value").0;
        let (name, labels) = match sample.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (sample, ""),
        };
        let base = family_of(&f, name).unwrap_or_else(|| panic!("{name} has no # TYPE"));
        let entry = f.get_mut(&base).expect("family");
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').expect("label=value");
            entry
                .1
                .entry(k.into())
                .or_default()
                .insert(v.trim_matches('"').into());
        }
    }
    f
}

/// The family a sample or a query's series name belongs to (a histogram's `_bucket`,
/// `_sum`, `_count` series are its family's).
fn family_of(f: &Families, name: &str) -> Option<String> {
    if f.contains_key(name) {
        return Some(name.into());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|s| {
        let base = name.strip_suffix(s)?;
        (f.get(base)?.0 == "histogram").then(|| base.to_string())
    })
}

/// The PromQL expressions of the dashboard (panel targets, variable queries).
fn dashboard_exprs() -> Vec<String> {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut v = vec![];
    let panels = d["panels"].as_array().expect("panels");
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            v.push(t["expr"].as_str().expect("a target's expr").to_string());
        }
    }
    for var in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            // label_values(metric{...}, label): the metric is checked like a query's.
            v.push(q.to_string());
        }
    }
    v
}

/// The `expr:` of each alert rule: inline, or a `|` block (its more-indented lines).
fn alert_exprs(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut v = vec![];
    let mut alert = String::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim_start();
        if let Some(a) = l.strip_prefix("- alert: ") {
            alert = a.trim().into();
        } else if let Some(e) = l.strip_prefix("expr: ") {
            let e = e.trim();
            if e == "|" {
                let indent = lines[i].len() - l.len();
                let mut block = String::new();
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty()
                        || lines[i + 1].len() - lines[i + 1].trim_start().len() > indent)
                {
                    i += 1;
                    block.push_str(lines[i].trim());
                    block.push(' ');
                }
                v.push((alert.clone(), block));
            } else {
                v.push((alert.clone(), e.to_string()));
            }
        }
        i += 1;
    }
    v
}

/// A label matcher: (label, op, value).
type Matcher = (String, String, String);

/// Series selectors of an expression: (name, its matchers).
fn selectors(expr: &str) -> Vec<(String, Vec<Matcher>)> {
    let b = expr.as_bytes();
    let mut v = vec![];
    let mut i = 0;
    while i < b.len() {
        let start_ok = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if start_ok && (b[i].is_ascii_alphabetic() || b[i] == b'_') {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let name = &expr[s..i];
            if !name.starts_with("longlink_") && name != "up" {
                continue;
            }
            let mut matchers = vec![];
            if b.get(i) == Some(&b'{') {
                let end = expr[i..].find('}').expect("closing brace") + i;
                for m in expr[i + 1..end].split(',').filter(|m| !m.trim().is_empty()) {
                    let op_at = m.find(['=', '!']).expect("a matcher");
                    let op_len = if m[op_at + 1..].starts_with(['=', '~']) {
                        2
                    } else {
                        1
                    };
                    matchers.push((
                        m[..op_at].trim().to_string(),
                        m[op_at..op_at + op_len].to_string(),
                        m[op_at + op_len..].trim().trim_matches('"').to_string(),
                    ));
                }
                i = end + 1;
            }
            v.push((name.to_string(), matchers));
        } else {
            i += 1;
        }
    }
    v
}

/// Labels named in `by (...)`, `without (...)`, `on (...)` and `ignoring (...)` clauses
/// (the keyword a whole word).
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut v = vec![];
    for kw in ["by", "without", "on", "ignoring"] {
        let mut from = 0;
        while let Some(at) = expr[from..].find(kw).map(|i| i + from) {
            from = at + kw.len();
            let word_start = at == 0
                || !expr.as_bytes()[at - 1].is_ascii_alphanumeric()
                    && expr.as_bytes()[at - 1] != b'_';
            let after = expr[from..].trim_start();
            if !word_start || !after.starts_with('(') {
                continue;
            }
            let end = after.find(')').expect("closing paren");
            v.extend(
                after[1..end]
                    .split(',')
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty()),
            );
        }
    }
    v
}

/// Checks one expression against the families; returns the problems found.
fn check(what: &str, expr: &str, f: &Families) -> Vec<String> {
    let mut bad = vec![];
    let sels = selectors(expr);
    let mut labels_here: BTreeSet<String> = BTreeSet::new();
    for (name, matchers) in &sels {
        if name == "up" {
            continue; // Prometheus's own, per scrape target
        }
        let Some(fam) = family_of(f, name) else {
            bad.push(format!("{what}: {name} is not in /metrics"));
            continue;
        };
        let known = &f[&fam].1;
        labels_here.extend(known.keys().cloned());
        for (label, op, value) in matchers {
            if OUTSIDE.contains(&label.as_str()) {
                continue;
            }
            match known.get(label) {
                None => bad.push(format!("{what}: {name} has no label {label}")),
                Some(values) if op == "=" && !values.contains(value) => bad.push(format!(
                    "{what}: {name}{{{label}=\"{value}\"}} matches nothing (values: {values:?})"
                )),
                Some(_) => {}
            }
        }
    }
    for l in grouping_labels(expr) {
        if !OUTSIDE.contains(&l.as_str()) && !labels_here.contains(&l) {
            bad.push(format!("{what}: grouped by {l}, which no series here has"));
        }
    }
    if sels.is_empty() {
        bad.push(format!("{what}: no metric in {expr:?}"));
    }
    bad
}

fn gateway_metrics() -> Families {
    // An app with an auth backend, so its lane's metrics are written out too (nothing
    // listens there; no call is made).
    let gw = Gateway::with_config(
        "node_id = \"n1\"\n[[apps]]\nid = \"demo\"\nauth_url = \"http://127.0.0.1:9/auth\"\n",
    );
    let (status, text) = http_raw(&gw.api, "GET", "/metrics", b"", &[]);
    assert_eq!(status, 200);
    families(&String::from_utf8(text).unwrap())
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_use_is_in_metrics() {
    let f = gateway_metrics();
    assert!(
        f.contains_key("longlink_connections"),
        "parsed: {:?}",
        f.keys()
    );
    let mut bad = vec![];
    let mut named = BTreeSet::new();
    for e in dashboard_exprs() {
        named.extend(selectors(&e).into_iter().map(|(n, _)| n));
        bad.extend(check("dashboard", &e, &f));
    }
    let alerts = alert_exprs(&std::fs::read_to_string(ALERTS).unwrap());
    for (alert, e) in &alerts {
        named.extend(selectors(e).into_iter().map(|(n, _)| n));
        bad.extend(check(alert, e, &f));
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // The checker itself catches a wrong name, label, value or grouping.
    for wrong in [
        "rate(longlink_no_such_total[5m])",
        "longlink_connections{kind=\"tcp\"}",
        "longlink_connections_closed_total{reason=\"tired\"}",
        "sum by (class) (longlink_api_requests_total)",
        "sum without (class) (longlink_api_requests_total)",
        "sum by(class) (longlink_api_requests_total)",
        "a / ignoring (class) longlink_api_requests_total",
    ] {
        assert!(!check("probe", wrong, &f).is_empty(), "{wrong} passed");
    }
    // What the issue asks the alerts to cover, and a dashboard that shows the essentials.
    let names: BTreeSet<&str> = alerts.iter().map(|(a, _)| a.as_str()).collect();
    for want in [
        "LonglinkNodeDown",
        "LonglinkSlowConsumers",
        "LonglinkUndeliveredPushes",
        "LonglinkBackendErrors",
        "LonglinkWorkerQueueFull",
        "LonglinkRedisDegraded",
    ] {
        assert!(names.contains(want), "no alert {want}: {names:?}");
    }
    for want in [
        "longlink_connections",
        "longlink_app_connections",
        "longlink_pushes_total",
        "longlink_acked_pushes_total",
        "longlink_retransmits_total",
        "longlink_backend_request_seconds_bucket",
        "longlink_worker_queue_depth",
        "longlink_worker_job_seconds_bucket",
        "longlink_redis_up",
    ] {
        assert!(named.contains(want), "nothing uses {want}");
    }
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_whose_panels_do_not_overlap() {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    assert_eq!(d["uid"], "longlink");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 30);
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(u64, u64, u64, u64, String)> = vec![];
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{} is wider than the grid", p["title"]);
        let title = p["title"].as_str().unwrap().to_string();
        for (bx, by, bw, bh, other) in &boxes {
            let apart = x >= bx + bw || bx >= &(x + w) || y >= by + bh || by >= &(y + h);
            assert!(apart, "{title} overlaps {other}");
        }
        boxes.push((x, y, w, h, title));
        if p["type"] != "row" {
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty());
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${datasource}");
            }
        }
    }
}

/// promtool's output, asserting it succeeded; None where it is not installed (CI installs
/// it: there it must be).
fn promtool(args: &[&str]) -> Option<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
    match std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "promtool {}:\n{said}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            Some(said)
        }
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("promtool: {e} (scripts/deps.sh installs it)")
        }
        Err(_) => {
            eprintln!("promtool is not installed (scripts/deps.sh installs it): skipped");
            None
        }
    }
}

#[test]
fn the_alert_rules_fire_when_they_should_and_not_on_a_healthy_node() {
    // deploy/prometheus/longlink-alerts.test.yml: a single node's redis_up 0 does not
    // alert and a cluster node's does; a node down; a share of undelivered pushes; a full
    // worker queue.
    promtool(&["test", "rules", "longlink-alerts.test.yml"]);
}

#[test]
fn the_alert_rules_pass_promtool() {
    let Some(said) = promtool(&["check", "rules", ALERTS]) else {
        return;
    };
    let n = alert_exprs(&std::fs::read_to_string(ALERTS).unwrap()).len();
    assert!(said.contains(&format!("{n} rules found")), "{said}");
}
