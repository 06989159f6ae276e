//! Many nodes, one gateway, on Redis (docs/CLUSTER.md).
//!
//! - [`link`]: the threads that talk to Redis (commands, and a subscriber connection) with
//!   the `redis` crate's synchronous client, bridged to the reactor by crossbeam channels and
//!   its waker: the reactor never waits on Redis.
//! - [`View`]: what this node knows of the cluster (live nodes, whether Redis is up), shared
//!   with the workers that answer `/healthz` and `/v1/endpoints`.
//! - Node messages ([`decode`], [`request`], [`answer`]): internal API requests one node
//!   runs for another, and their answers, which [`merge`] adds up.
//!
//! Pure parts (message checks, merging answers, key names) are functions over bytes and
//! values, unit-tested and fuzzed; only `link` does I/O.

pub mod durable;
pub mod link;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

use prost::Message;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::proto::{node_msg, NodeAnswer, NodeMsg, NodeRequest};
use crate::types::valid_node_id;

/// Version of the node messages (proto/node.proto).
pub const VERSION: u32 = 1;
/// Largest node message sent or taken off a channel: under Redis's default 32 MB output
/// limit for subscribers, which would drop the subscriber connection (an API body is at
/// most `max_body_bytes`, 4 MiB by default; an answer is smaller than its batch).
pub const MAX_MESSAGE: usize = 16 << 20;

/// A node as the cluster sees it: what its heartbeat says.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct NodeInfo {
    pub node_id: String,
    /// What clients dial: `host:port` of the TCP listener and `ws://host:port/ws`; "" = none.
    pub tcp: String,
    pub ws: String,
    pub connections: u64,
    /// Connections over the node's limit, 0..1.
    pub load: f64,
    /// The node's route epoch: its routes written under another are stale (a previous run
    /// of the node, or removals lost while Redis was away).
    #[serde(default)]
    pub routes: u64,
    /// Draining (`POST /v1/drain`): not to be given out as an endpoint.
    #[serde(default)]
    pub draining: bool,
}

/// This node's view of the cluster, kept by the link and read by anyone.
pub struct View {
    pub node_id: String,
    /// Redis configured.
    pub enabled: bool,
    /// The command connection answers now.
    up: AtomicBool,
    /// This node's channel is subscribed now (it can hear other nodes).
    hearing: AtomicBool,
    /// Route writes were lost on the way (queue full, dropped while Redis was away, a
    /// failed pipeline): the node moves to a new route epoch when Redis is back.
    routes_lost: AtomicBool,
    /// Live nodes (this one included), as of the last heartbeat round, and when that was
    /// (unix ms).
    nodes: Mutex<Vec<NodeInfo>>,
    nodes_at: std::sync::atomic::AtomicU64,
    /// This node's endpoints (its connection count is filled in when asked).
    me: Mutex<NodeInfo>,
}

impl View {
    pub fn new(node_id: &str, enabled: bool) -> View {
        View {
            node_id: node_id.to_string(),
            enabled,
            up: AtomicBool::new(false),
            hearing: AtomicBool::new(false),
            routes_lost: AtomicBool::new(false),
            nodes: Mutex::new(vec![]),
            nodes_at: std::sync::atomic::AtomicU64::new(0),
            me: Mutex::new(NodeInfo {
                node_id: node_id.to_string(),
                tcp: String::new(),
                ws: String::new(),
                connections: 0,
                load: 0.0,
                routes: 0,
                draining: false,
            }),
        }
    }

    /// Sets what clients dial for this node (known once the listeners are bound).
    pub fn set_me(&self, tcp: String, ws: String) {
        let mut me = self.me.lock().unwrap_or_else(|e| e.into_inner());
        me.tcp = tcp;
        me.ws = ws;
    }

    pub fn me(&self) -> NodeInfo {
        self.me.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// This node drains: it says so in its heartbeat, and leaves `/v1/endpoints`.
    pub fn set_draining(&self) {
        self.me.lock().unwrap_or_else(|e| e.into_inner()).draining = true;
    }

    pub fn set_routes_lost(&self) {
        self.routes_lost.store(true, Relaxed);
    }

    /// Whether route writes were lost (not clearing it).
    pub fn routes_lost(&self) -> bool {
        self.routes_lost.load(Relaxed)
    }

    /// Whether route writes were lost since the last call.
    pub fn take_routes_lost(&self) -> bool {
        self.routes_lost.swap(false, Relaxed)
    }

    pub fn routes_epoch(&self) -> u64 {
        self.me.lock().unwrap_or_else(|e| e.into_inner()).routes
    }

    /// The route epoch this node's heartbeat announces.
    pub fn set_routes_epoch(&self, e: u64) {
        self.me.lock().unwrap_or_else(|e| e.into_inner()).routes = e;
    }

    /// Redis answers and this node hears its channel: the cluster is usable.
    pub fn up(&self) -> bool {
        self.up.load(Relaxed) && self.hearing.load(Relaxed)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed);
    }

    /// The command connection answers (route writes and messages can go).
    pub fn writable(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn hearing(&self) -> bool {
        self.hearing.load(Relaxed)
    }

    pub fn set_hearing(&self, h: bool) {
        self.hearing.store(h, Relaxed);
    }

    /// The node table just read; `sure`: every entry in the node set was read and
    /// understood (only such a table dates `nodes_at`).
    pub fn set_nodes(&self, nodes: Vec<NodeInfo>, sure: bool) {
        *self.nodes.lock().unwrap_or_else(|e| e.into_inner()) = nodes;
        if sure {
            self.nodes_at.store(
                crate::types::unix_ms(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// When a node table every entry of which was understood was last read (unix ms; 0:
    /// never).
    pub fn nodes_at(&self) -> u64 {
        self.nodes_at.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ids of the live nodes other than this one, as of the last heartbeat round.
    pub fn others(&self) -> Vec<String> {
        let n = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        n.iter()
            .filter(|i| i.node_id != self.node_id)
            .map(|i| i.node_id.clone())
            .collect()
    }

    pub fn is_live(&self, node: &str) -> bool {
        let n = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        n.iter().any(|i| i.node_id == node)
    }
}

// ---- key and channel names -----------------------------------------------------------------

/// Names of everything longlink keeps in Redis, under `prefix`. Each key's hash tag (`{...}`)
/// puts every multi-key step in one slot of a Redis Cluster: the node table is one tag; a
/// device's or user's routes are one key each.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    /// A token set once per Redis dataset: when it changes, Redis lost what it kept (it
    /// restarted empty, or was flushed).
    pub fn born(&self) -> String {
        format!("{}{{nodes}}:born", self.prefix)
    }
    /// The set of node ids that ever joined (dead ones are removed lazily).
    pub fn nodes(&self) -> String {
        format!("{}{{nodes}}", self.prefix)
    }
    /// A node's heartbeat (its `NodeInfo` as JSON), expiring `node_ttl_ms` after it was set.
    pub fn node(&self, id: &str) -> String {
        format!("{}{{nodes}}:{id}", self.prefix)
    }
    /// The channel a node hears requests and answers on.
    pub fn channel(&self, id: &str) -> String {
        format!("{}ch:{{{id}}}", self.prefix)
    }
    /// A device's routes: hash conn id → user id ("" for none).
    pub fn device(&self, app: &str, device: &str) -> String {
        format!("{}d:{{{app}:{device}}}", self.prefix)
    }
    /// A room's members (device ids), bound through any node.
    pub fn room(&self, app: &str, room: &str) -> String {
        format!("{}room:{{{app}:{room}}}", self.prefix)
    }
    /// The rooms of an app that ever had members (for a node that starts to load them).
    pub fn rooms(&self, app: &str) -> String {
        format!("{}rooms:{{{app}}}", self.prefix)
    }
    /// A device's unacknowledged `ack=1` pushes (`durable`): same slot as its routes.
    pub fn durable(&self, app: &str, device: &str) -> String {
        format!("{}rel:{{{app}:{device}}}", self.prefix)
    }
    /// The devices a node wrote durable records for (sorted set: device → when its hash
    /// was last renewed), for a node that adopts them when that node dies.
    pub fn durable_index(&self, node: &str) -> String {
        format!("{}relidx:{{{node}}}", self.prefix)
    }
    /// Dead nodes whose index a node claimed and has not finished adopting.
    pub fn durable_claims(&self, node: &str) -> String {
        format!("{}relclaims:{{{node}}}", self.prefix)
    }
    /// A long-poll status value set through any node, with its TTL: a node that was not
    /// there when it was set finds it here.
    pub fn status(&self, key: &str) -> String {
        format!("{}st:{{{key}}}", self.prefix)
    }
    /// A user's (`user`) or a device's routes.
    pub fn routes(&self, app: &str, name: &str, user: bool) -> String {
        if user {
            self.user(app, name)
        } else {
            self.device(app, name)
        }
    }
    /// A user's routes: hash conn id → device id.
    pub fn user(&self, app: &str, user: &str) -> String {
        format!("{}u:{{{app}:{user}}}", self.prefix)
    }
}

// ---- routes ----------------------------------------------------------------------------------

/// A route's value: the writer's route epoch, then the other id (the user of a device's
/// route, the device of a user's).
pub fn route_value(epoch: u64, other: &str) -> String {
    format!("{epoch}|{other}")
}

/// A route read back: (conn id, epoch, other id); None for an entry that is not one.
pub fn parse_route<'a>(
    conn: &'a str,
    value: &'a str,
) -> Option<(crate::types::ConnId, u64, &'a str)> {
    let (e, other) = value.split_once('|')?;
    Some((crate::types::ConnId::parse(conn)?, e.parse().ok()?, other))
}

/// A node's first route epoch: its start time (ms) with room for 1,024 bumps below it, so
/// a later run's epochs are always higher than an earlier run's (and stay below 2^53).
pub fn first_routes_epoch(now_ms: u64) -> u64 {
    now_ms << 10
}

/// The epoch after `epoch`, at `now_ms`: higher, and no older than the clock, so that its
/// entries read as written now (`route_nodes` keeps an absent node's young entries).
pub fn next_routes_epoch(epoch: u64, now_ms: u64) -> u64 {
    (epoch + 1).max(first_routes_epoch(now_ms))
}

/// What a device's or user's routes say: the live nodes other than `me` that hold its
/// connections, and the entries that no longer count, to be removed — written under an
/// epoch older than their node's current one (a previous run of the node, or removals lost
/// while Redis was away), or not routes at all. An entry of a node that is not in the
/// table is skipped; it is removed too (the node is dead, or was cut off and writes its
/// routes again under a new epoch when back) once its epoch is older than `young_ms` —
/// younger, the reader's table may just be a heartbeat late (a node that has just started
/// or come back). An entry newer than the epoch the table shows counts (the node moved on;
/// this reader has not heard yet). Entries of `me` are skipped (this node's own part is run
/// here).
pub fn route_nodes(
    fields: &[(String, String)],
    live: &[NodeInfo],
    me: &str,
    now_ms: u64,
    young_ms: u64,
) -> (Vec<String>, Vec<(String, String)>) {
    let mut nodes: Vec<String> = vec![];
    let mut stale = vec![];
    for (conn, value) in fields {
        let Some((id, epoch, _)) = parse_route(conn, value) else {
            stale.push((conn.clone(), value.clone()));
            continue;
        };
        if id.node == me {
            continue;
        }
        match live.iter().find(|n| n.node_id == id.node) {
            None if (epoch >> 10).saturating_add(young_ms) < now_ms => {
                stale.push((conn.clone(), value.clone()))
            }
            None => {}
            Some(n) if epoch < n.routes => stale.push((conn.clone(), value.clone())),
            Some(n) if !nodes.contains(&n.node_id) => nodes.push(n.node_id.clone()),
            Some(_) => {}
        }
    }
    (nodes, stale)
}

// ---- node messages ---------------------------------------------------------------------------

/// An API request as the other nodes get it (`fan_out_command`).
#[derive(Debug)]
pub struct Forward {
    /// For every other node not named in `named` (None: those have nothing to run).
    pub all: Option<NodeRequest>,
    /// A batch push whose items name other nodes' conn ids: for each such node, its own
    /// request — its items and those for every node.
    pub named: Vec<(String, NodeRequest)>,
}

/// Splits a batch push for the other nodes: an item for a conn id goes to that conn's node
/// only (`owners[i]`: its node, None for an item every node may hold — a device, user,
/// room, broadcast); items of this node `me` go to nobody. Each part is a body of the
/// original items (their JSON as sent) and their places (`NodeRequest.items`).
pub fn split_batch(req: NodeRequest, owners: &[Option<&str>], me: &str) -> Forward {
    let whole = |req| Forward {
        all: Some(req),
        named: vec![],
    };
    if owners.iter().all(Option::is_none) {
        return whole(req);
    }
    let Ok(raw) = serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(&req.body) else {
        return whole(req); // (parsed already by the API: not reached)
    };
    if raw.len() != owners.len() {
        return whole(req);
    }
    let part = |places: Vec<u32>| {
        let mut body = Vec::with_capacity(2 + places.len() * 64);
        body.push(b'[');
        for (k, &i) in places.iter().enumerate() {
            if k > 0 {
                body.push(b',');
            }
            body.extend_from_slice(raw[i as usize].get().as_bytes());
        }
        body.push(b']');
        NodeRequest {
            body: body.into(),
            items: places,
            ..req.clone()
        }
    };
    let rest: Vec<u32> = (0..owners.len() as u32)
        .filter(|&i| owners[i as usize].is_none())
        .collect();
    let mut nodes: Vec<&str> = owners
        .iter()
        .flatten()
        .copied()
        .filter(|n| *n != me)
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let named = nodes
        .into_iter()
        .map(|n| {
            let places = (0..owners.len() as u32)
                .filter(|&i| owners[i as usize].is_none_or(|o| o == n))
                .collect();
            (n.to_string(), part(places))
        })
        .collect();
    Forward {
        all: (!rest.is_empty()).then(|| part(rest)),
        named,
    }
}

/// A split batch's part answered by a node: its `results` (one per item it carried) put at
/// their places in the whole batch of `n`, the others empty (`{}` adds nothing in `merge`).
pub fn place_results(body: &mut Value, places: &[u32], n: usize) {
    let Some(Value::Array(results)) = body.get_mut("results") else {
        return;
    };
    if places.is_empty() || results.len() != places.len() {
        return;
    }
    let mut all = vec![json!({}); n];
    for (r, &at) in std::mem::take(results).into_iter().zip(places) {
        if let Some(slot) = all.get_mut(at as usize) {
            *slot = r;
        }
    }
    *results = all;
}

/// Encodes a request for other nodes' parts of an API call, to be dropped by a node it
/// reaches after `deadline_ms`.
pub fn request(from: &str, id: u64, now_ms: u64, deadline_ms: u64, req: NodeRequest) -> Vec<u8> {
    NodeMsg {
        version: VERSION,
        from: from.to_string(),
        id,
        sent_ms: now_ms,
        deadline_ms,
        body: Some(node_msg::Body::Request(req)),
    }
    .encode_to_vec()
}

/// Encodes a message about a device's pushes (no request id, no deadline).
fn notice(from: &str, now_ms: u64, body: node_msg::Body) -> Vec<u8> {
    NodeMsg {
        version: VERSION,
        from: from.to_string(),
        id: 0,
        sent_ms: now_ms,
        deadline_ms: 0,
        body: Some(body),
    }
    .encode_to_vec()
}

/// Encodes a take: this node has `device`'s pushes `ids` now (their holder stops sending).
/// `offer`: rather, the sender holds pushes of `device` for this node to take.
pub fn take(
    from: &str,
    now_ms: u64,
    app: &str,
    device: &str,
    ids: Vec<String>,
    claims: Vec<u32>,
    offer: bool,
) -> Vec<u8> {
    let t = crate::proto::NodeTake {
        app: app.to_string(),
        device: device.to_string(),
        ids,
        offer,
        claims,
    };
    notice(from, now_ms, node_msg::Body::Take(t))
}

/// Encodes a settlement: pushes `ids` of `device` that the receiver waits for are done
/// (`acked`, or given up).
pub fn settled(
    from: &str,
    now_ms: u64,
    app: &str,
    device: &str,
    ids: Vec<String>,
    acked: bool,
    report: Vec<u8>,
) -> Vec<u8> {
    let t = crate::proto::NodeSettled {
        app: app.to_string(),
        device: device.to_string(),
        ids,
        acked,
        report: report.into(),
    };
    notice(from, now_ms, node_msg::Body::Settled(t))
}

/// Encodes a node's answer to request `id`.
pub fn answer(from: &str, id: u64, now_ms: u64, status: u16, body: Vec<u8>) -> Vec<u8> {
    NodeMsg {
        version: VERSION,
        from: from.to_string(),
        id,
        sent_ms: now_ms,
        deadline_ms: 0,
        body: Some(node_msg::Body::Answer(NodeAnswer {
            status: status.into(),
            body: body.into(),
        })),
    }
    .encode_to_vec()
}

/// The live upgrade's marker on `node`'s own channel (`NodeMarker`).
pub fn marker(node: &str, token: u64, now_ms: u64) -> Vec<u8> {
    NodeMsg {
        version: VERSION,
        from: node.to_string(),
        id: token,
        sent_ms: now_ms,
        deadline_ms: 0,
        body: Some(node_msg::Body::Marker(crate::proto::NodeMarker { token })),
    }
    .encode_to_vec()
}

/// A message taken off a channel, checked: anything else is an error that names the problem
/// (the caller counts it and skips the message).
pub fn decode(b: &[u8]) -> Result<NodeMsg, String> {
    if b.len() > MAX_MESSAGE {
        return Err(format!("{} bytes, over {MAX_MESSAGE}", b.len()));
    }
    let m = NodeMsg::decode(b).map_err(|e| format!("not a node message: {e}"))?;
    if m.version != VERSION {
        return Err(format!(
            "version {} (this node speaks {VERSION})",
            m.version
        ));
    }
    if !valid_node_id(&m.from) {
        return Err(format!("bad sender id {:?}", m.from));
    }
    match &m.body {
        None => return Err("no body".into()),
        Some(node_msg::Body::Request(r)) => {
            if !matches!(r.method.as_str(), "GET" | "POST" | "PUT" | "DELETE") {
                return Err(format!("method {:?}", r.method));
            }
            if !r.target.starts_with("/v1/") || r.target.len() > 8192 {
                return Err("target is not an API path".into());
            }
        }
        Some(node_msg::Body::Answer(a)) => {
            if !(100..600).contains(&a.status) {
                return Err(format!("status {}", a.status));
            }
        }
        Some(node_msg::Body::Take(t)) => {
            if t.ids.iter().any(|f| durable::parse_field(f).is_none()) {
                return Err("take: an id that is not a push id".into());
            }
        }
        Some(node_msg::Body::Settled(t)) => {
            if t.ids.iter().any(|f| durable::parse_field(f).is_none()) {
                return Err("settled: an id that is not a push id".into());
            }
        }
        Some(node_msg::Body::Marker(_)) => {}
    }
    Ok(m)
}

// ---- answers added up ------------------------------------------------------------------------

/// Status and JSON body of an HTTP answer as `http::json` writes it; None if it is not one.
pub fn split_response(b: &[u8]) -> Option<(u16, &[u8])> {
    let status = std::str::from_utf8(b.get(9..12)?).ok()?.parse().ok()?;
    let end = b.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some((status, &b[end..]))
}

/// Adds up the parts of one API answer: this node's and the other nodes'. The shape stays
/// that of one node's answer:
/// - numbers add up (`delivered`, `kicked`, `released`, `online` counts...);
/// - `online` (a flag) is true if any node says so; lists concatenate;
/// - `offline` keeps the addressees no node reached (a device found on any node was not
///   offline); `results` (a batch) is merged item by item;
/// - names and versions (`room`, `version`, `next`, `members` and `member_count`, which
///   every node knows alike) are taken from the first part.
///
/// A part with an error status does not count when another part succeeded (e.g. a session
/// update that only the connection's own node can apply); all failed: the first one stands.
/// Nodes that did not answer in time are named in `unreached`.
pub fn merge(parts: Vec<(u16, Value)>, unreached: &[String]) -> (u16, Value) {
    let ok: Vec<Value> = parts
        .iter()
        .filter(|(s, _)| (200..300).contains(s))
        .map(|(_, v)| v.clone())
        .collect();
    let (status, mut v) = match (ok.is_empty(), parts.first()) {
        (true, Some(first)) => first.clone(),
        (true, None) => (200, json!({})),
        (false, _) => {
            let status = parts
                .iter()
                .find(|(s, _)| (200..300).contains(s))
                .map_or(200, |p| p.0);
            let mut it = ok.into_iter();
            let first = it.next().unwrap_or_default();
            (status, it.fold(first, merge_value))
        }
    };
    if !unreached.is_empty() {
        if let Value::Object(o) = &mut v {
            o.insert("unreached".into(), json!(unreached));
        }
    }
    (status, v)
}

/// Keys every node answers alike: the first node's value stands (room membership is applied
/// on every node, so each counts the same devices added or removed).
const SAME_EVERYWHERE: &[&str] = &[
    "room",
    "version",
    "next",
    "members",
    "member_count",
    "added",
    "removed",
    "error",
];

fn merge_value(a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => Value::Object(merge_object(a, b)),
        (Value::Number(x), Value::Number(y)) => match (x.as_u64(), y.as_u64()) {
            (Some(x), Some(y)) => json!(x + y),
            _ => json!(x.as_f64().unwrap_or(0.0) + y.as_f64().unwrap_or(0.0)),
        },
        (Value::Bool(x), Value::Bool(y)) => Value::Bool(x || y),
        (Value::Array(mut x), Value::Array(y)) => {
            x.extend(y);
            Value::Array(x)
        }
        (a, _) => a,
    }
}

fn merge_object(mut a: Map<String, Value>, b: Map<String, Value>) -> Map<String, Value> {
    for (k, bv) in b {
        let Some(av) = a.remove(&k) else {
            a.insert(k, bv);
            continue;
        };
        let v = match k.as_str() {
            k if SAME_EVERYWHERE.contains(&k) => av,
            // Durable only if every node's copies were written.
            "durable" => match (av, bv) {
                (Value::Bool(x), Value::Bool(y)) => Value::Bool(x && y),
                (av, _) => av,
            },
            "offline" => match (av, bv) {
                (Value::Array(x), Value::Array(y)) => {
                    Value::Array(x.into_iter().filter(|i| y.contains(i)).collect())
                }
                (av, _) => av,
            },
            "results" => match (av, bv) {
                (Value::Array(x), Value::Array(y)) if x.len() == y.len() => Value::Array(
                    x.into_iter()
                        .zip(y)
                        .map(|(p, q)| merge_value(p, q))
                        .collect(),
                ),
                (av, _) => av,
            },
            _ => merge_value(av, bv),
        };
        a.insert(k, v);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::{
        answer, decode, first_routes_epoch, merge, next_routes_epoch, parse_route, place_results,
        request, route_nodes, route_value, split_batch, split_response, Keys, NodeInfo,
    };
    use crate::proto::{node_msg, NodeRequest};
    use serde_json::json;

    #[test]
    fn a_batch_splits_by_the_nodes_its_conn_items_name() {
        let body = br#"[{"to":"conn","conn_id":"n2:1:1","payload":"a"}, {"to":"device","app":"demo","device_id":"d","payload":"b"},{"to":"conn","conn_id":"n3:1:1","payload":"c"},{"to":"conn","conn_id":"n1:1:1","payload":"d"}]"#;
        let req = NodeRequest {
            method: "POST".into(),
            target: "/v1/push/batch".into(),
            body: body.to_vec().into(),
            order: 9,
            ..Default::default()
        };
        let owners = [Some("n2"), None, Some("n3"), Some("n1")];
        let f = split_batch(req.clone(), &owners, "n1");
        let items = |r: &NodeRequest| {
            let v: Vec<serde_json::Value> = serde_json::from_slice(&r.body).unwrap();
            v.iter()
                .map(|i| i["payload"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        // Nodes not named get the items for every node; each named node those and its own;
        // this node's own item goes to nobody.
        let all = f.all.as_ref().unwrap();
        assert_eq!(
            (items(all), all.items.clone()),
            (vec!["b".to_string()], vec![1])
        );
        assert_eq!(f.named.len(), 2);
        assert_eq!(f.named[0].0, "n2");
        assert_eq!(
            (items(&f.named[0].1), f.named[0].1.items.clone()),
            (vec!["a".into(), "b".into()], vec![0, 1])
        );
        assert_eq!(f.named[1].0, "n3");
        assert_eq!(f.named[1].1.items, vec![1, 2]);
        assert_eq!(f.named[1].1.order, 9);
        // No conn items: the request as it is, for everyone.
        let whole = split_batch(req.clone(), &[None, None], "n1");
        assert_eq!(whole.all.unwrap(), req);
        // Only conn items: nobody else gets anything.
        let only = split_batch(req, &[Some("n2"), Some("n2"), Some("n2"), Some("n2")], "n1");
        assert!(only.all.is_none());
        // A part's results go back to their places.
        let mut part = json!({"delivered": 2, "results": [{"delivered": 1}, {"delivered": 1}]});
        place_results(&mut part, &[1, 2], 4);
        assert_eq!(
            part["results"],
            json!([{}, {"delivered": 1}, {"delivered": 1}, {}])
        );
        let (_, merged) = merge(
            vec![
                (200, part),
                (
                    200,
                    json!({"delivered": 1, "results": [{"delivered": 1}, {}, {}, {}]}),
                ),
            ],
            &[],
        );
        assert_eq!(
            merged["results"],
            json!([{"delivered": 1}, {"delivered": 1}, {"delivered": 1}, {}])
        );
        assert_eq!(merged["delivered"], 3);
    }

    #[test]
    fn messages_round_trip_and_bad_ones_are_named() {
        let req = NodeRequest {
            method: "POST".into(),
            target: "/v1/push/device/demo/d1".into(),
            authorization: "Bearer t".into(),
            body: b"hi".to_vec().into(),
            content_type: "application/json".into(),
            order: 5,
            items: vec![2, 3],
        };
        let m = decode(&request("n1", 7, 1000, 2000, req.clone())).unwrap();
        assert_eq!((m.from.as_str(), m.id, m.sent_ms), ("n1", 7, 1000));
        assert_eq!(m.body, Some(node_msg::Body::Request(req.clone())));
        let a = decode(&answer("n2", 7, 1, 200, b"{}".to_vec())).unwrap();
        assert!(matches!(a.body, Some(node_msg::Body::Answer(ref x)) if x.status == 200));
        assert!(decode(b"\xff\xff\xff").is_err());
        assert!(decode(b"").unwrap_err().contains("version"));
        let bad_from = request("n 1", 1, 1, 1, req.clone());
        assert!(decode(&bad_from).unwrap_err().contains("sender"));
        let mut r = req;
        r.target = "/admin".into();
        assert!(decode(&request("n1", 1, 1, 1, r))
            .unwrap_err()
            .contains("target"));
        assert!(decode(&answer("n1", 1, 1, 42, vec![]))
            .unwrap_err()
            .contains("status"));
    }

    #[test]
    fn answers_add_up_and_keep_their_shape() {
        let parts = vec![
            (
                200,
                json!({"delivered": 1, "offline": ["u1", "d9"], "dropped": []}),
            ),
            (
                200,
                json!({"delivered": 2, "offline": ["d9"], "dropped": ["n2:1:1"]}),
            ),
        ];
        let (s, v) = merge(parts, &[]);
        assert_eq!(s, 200);
        assert_eq!(
            v,
            json!({"delivered": 3, "offline": ["d9"], "dropped": ["n2:1:1"]})
        );
        // A batch, item by item; nodes that did not answer are named.
        let a = json!({"results": [{"delivered": 1, "offline": [], "dropped": []}, {"delivered": 0, "offline": ["x"], "dropped": []}]});
        let b = json!({"results": [{"delivered": 0, "offline": ["y"], "dropped": []}, {"delivered": 0, "offline": ["x"], "dropped": []}]});
        let (_, v) = merge(vec![(200, a), (200, b)], &["n3".to_string()]);
        assert_eq!(
            v["results"][0],
            json!({"delivered": 1, "offline": [], "dropped": []})
        );
        assert_eq!(v["results"][1]["offline"], json!(["x"]));
        assert_eq!(v["unreached"], json!(["n3"]));
        // Online: any node; connections listed from all.
        let (_, v) = merge(
            vec![
                (200, json!({"online": false, "connections": []})),
                (
                    200,
                    json!({"online": true, "connections": [{"node": "n2"}]}),
                ),
            ],
            &[],
        );
        assert_eq!(v, json!({"online": true, "connections": [{"node": "n2"}]}));
        // Rooms: every node knows the members alike; online counts add up.
        let r = |online| json!({"room": "r", "members": ["a", "b"], "member_count": 2, "online": online, "next": null});
        let (_, v) = merge(vec![(200, r(1)), (200, r(2))], &[]);
        assert_eq!(
            v,
            json!({"room": "r", "members": ["a", "b"], "member_count": 2, "online": 3, "next": null})
        );
    }

    #[test]
    fn a_failed_part_gives_way_to_a_successful_one() {
        let (s, v) = merge(
            vec![
                (404, json!({"error": "no such connection"})),
                (200, json!({"updated": 2})),
            ],
            &[],
        );
        assert_eq!((s, v), (200, json!({"updated": 2})));
        let (s, _) = merge(vec![(404, json!({"error": "x"}))], &[]);
        assert_eq!(s, 404);
    }

    #[test]
    fn answers_are_read_back_from_http() {
        let b = crate::http::json(201, &json!({"a": 1}), true);
        let (s, body) = split_response(&b).unwrap();
        assert_eq!(s, 201);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(body).unwrap(),
            json!({"a": 1})
        );
        assert!(split_response(b"nonsense").is_none());
    }

    #[test]
    fn routes_name_live_nodes_and_stale_entries_go() {
        let node = |id: &str, routes| NodeInfo {
            node_id: id.into(),
            tcp: String::new(),
            ws: String::new(),
            connections: 0,
            load: 0.0,
            routes,
            draining: false,
        };
        let live = [node("n1", 7), node("n2", 9)];
        let f = |c: &str, v: &str| (c.to_string(), v.to_string());
        let fields = [
            f("n1:1:1", "3|u"),  // here (whatever its epoch): not asked
            f("n2:3:4", "9|u"),  // n2, live, its epoch
            f("n2:5:6", "10|u"), // n2's newer epoch than this table shows: counts
            f("n2:7:8", "8|u"),  // n2's older epoch (a removal lost, or a previous run)
            f("n3:1:1", &format!("{}|u", first_routes_epoch(96_000))), // absent, young: kept
            f("n4:1:1", &format!("{}|u", first_routes_epoch(94_000))), // absent, old: goes
            f("garbage", "x"),   // not a route
        ];
        let (nodes, stale) = route_nodes(&fields, &live, "n1", 100_000, 5_000);
        assert_eq!(nodes, ["n2"]);
        let gone: Vec<&str> = stale.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(gone, ["n2:7:8", "n4:1:1", "garbage"]);
        assert!(first_routes_epoch(2) > first_routes_epoch(1) + 1000);
        let e = first_routes_epoch(1_000);
        assert_eq!(next_routes_epoch(e, 1_000), e + 1);
        assert_eq!(next_routes_epoch(e, 5_000), first_routes_epoch(5_000));
        assert_eq!(
            parse_route("n2:3:4", &route_value(9, "dev")).map(|r| (r.1, r.2)),
            Some((9, "dev"))
        );
    }

    #[test]
    fn keys_share_a_slot_where_a_step_touches_several() {
        let k = Keys::new("ll:");
        assert_eq!(k.nodes(), "ll:{nodes}");
        assert_eq!(k.node("n1"), "ll:{nodes}:n1");
        assert_eq!(k.device("demo", "d1"), "ll:d:{demo:d1}");
        assert_eq!(k.channel("n1"), "ll:ch:{n1}");
    }
}
