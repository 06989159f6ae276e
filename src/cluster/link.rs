//! The threads that talk to Redis: `ll-redis` runs commands (route writes and messages to
//! other nodes, pipelined per batch the reactor hands over; the heartbeat and the node table),
//! `ll-redis-sub` holds the subscriber connection this node's channel arrives on. Both use the
//! `redis` crate's synchronous client and reconnect with backoff and jitter; the reactor only
//! ever `try_send`s to them and hears back over a channel and its waker.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{decode, route_value, Keys, NodeInfo, View};
use crate::config::Config;
use crate::metrics::{inc, Metrics};
use crate::proto::NodeMsg;

/// A route change: a connection of `device` (and `user`) came or went.
#[derive(Clone, Debug)]
pub struct RouteOp {
    pub add: bool,
    pub app: Arc<str>,
    pub device: Arc<str>,
    pub user: Option<Arc<str>>,
    pub conn: String,
    /// The writer's route epoch (written with an add).
    pub epoch: u64,
}

/// A durable record change (`super::durable`): a tracked `ack=1` push written (`add`) or
/// removed (ACKed, given up, delivered untracked).
pub struct DurOp {
    pub app: Arc<str>,
    pub device: Arc<str>,
    /// The record's field: `durable::field(order, origin)`.
    pub field: String,
    /// For a write: the record (`durable::Record`); None = remove.
    pub add: Option<DurRec>,
    /// With a write: renew the hash's expiry (`life_ms`).
    pub renew: bool,
}

/// A durable record to write (the link adds itself as the holder).
pub struct DurRec {
    /// Given up at (unix ms, 0 = never).
    pub expires: u64,
    pub claim: u32,
    /// The node where a request waits for the push's outcome.
    pub waiter: Option<Arc<str>>,
    /// The encoded frame.
    pub body: bytes::Bytes,
}

/// What the reactor hands the link.
pub enum ToLink {
    /// One reactor turn's durable record changes; told back as `Written { token }`.
    Durable {
        ops: Vec<DurOp>,
        /// How long a device's hash is kept past its last write (its records' longest life:
        /// retransmits and the reconnect grace window).
        life_ms: u64,
        token: u64,
    },
    /// Records of a device were taken over here: the device goes in this node's index
    /// (trimmed of devices whose hash has expired, `life_ms`).
    Index {
        app: Arc<str>,
        device: Arc<str>,
        life_ms: u64,
    },
    /// Read (and take over) a device's durable records for connection `conn` (its `Ref`,
    /// packed; or an adoption's id): told back as `Records`. `only`: just the records held
    /// by that node (a dead node's, adopted).
    Recover {
        conn: u64,
        app: Arc<str>,
        device: Arc<str>,
        only: Option<String>,
    },
    /// Before copies of a device's pushes are sent again or given up: whether each record
    /// (field) is still there at the claim the copy holds (not ACKed or given up elsewhere,
    /// nor taken over by another node) — `true`: then removed by this call (a give-up: only
    /// the node whose call removes it reports it), `false`: only looked at. Told back as
    /// `Checked`.
    Check {
        id: u64,
        app: Arc<str>,
        device: Arc<str>,
        fields: Vec<(String, bool, u32)>,
    },
    /// One reactor turn's route changes, written in one pipeline.
    Routes(Vec<RouteOp>),
    /// Remove a device's (or a user's) route entries a reader found stale — each only if it
    /// still holds the value read, so a route its node has just rewritten stays.
    Unroute {
        app: Arc<str>,
        name: String,
        user: bool,
        entries: Vec<(String, String)>,
    },
    /// Keep a room's membership change (bound through this node's API) for nodes that
    /// start later.
    RoomSet {
        app: Arc<str>,
        room: String,
        devices: Vec<String>,
        add: bool,
    },
    /// Read every room of these apps: told back as `Rooms`.
    RoomsLoad { apps: Vec<Arc<str>> },
    /// Keep a status value (set through this node's API) for nodes that were not there.
    StatusSet {
        key: String,
        value: bytes::Bytes,
        ttl_ms: u64,
    },
    /// Read a status value missing here: told back as `Status`.
    StatusGet { key: String },
    /// Read a device's (or a user's) routes for request `id`: told back as `Looked`.
    Lookup {
        id: u64,
        app: Arc<str>,
        name: String,
        user: bool,
    },
    /// A node message for `node`'s channel; `request`: the id of a request of ours, told
    /// back (`Unheard`) if nobody was subscribed to hear it.
    Send {
        node: String,
        request: Option<u64>,
        msg: Vec<u8>,
    },
    /// Told back (`Barrier`) once everything queued before it has been run and answered (a
    /// live upgrade waits for the link's replies with it).
    Barrier(u64),
}

impl ToLink {
    /// What this holds, roughly, for the queue's bound.
    pub fn bytes(&self) -> usize {
        match self {
            ToLink::Routes(ops) => 64 * ops.len(),
            ToLink::Send { msg, .. } => 64 + msg.len(),
            ToLink::StatusSet { value, .. } => 64 + value.len(),
            ToLink::RoomSet { devices, .. } => 64 + 32 * devices.len(),
            ToLink::RoomsLoad { .. } => 64,
            ToLink::StatusGet { .. } => 64,
            ToLink::Unroute { entries, .. } => 64 * entries.len(),
            ToLink::Lookup { .. } => 64,
            ToLink::Durable { ops, .. } => ops
                .iter()
                .map(|o| 96 + o.add.as_ref().map_or(0, |a| a.body.len()))
                .sum(),
            ToLink::Recover { .. } | ToLink::Index { .. } => 64,
            ToLink::Check { fields, .. } => 64 + 40 * fields.len(),
            ToLink::Barrier(_) => 8,
        }
    }

    /// Redis commands this takes.
    fn commands(&self) -> usize {
        match self {
            ToLink::Routes(ops) => ops.iter().map(|o| 1 + usize::from(o.user.is_some())).sum(),
            ToLink::Send { .. }
            | ToLink::Lookup { .. }
            | ToLink::StatusSet { .. }
            | ToLink::StatusGet { .. }
            | ToLink::RoomsLoad { .. } => 1,
            ToLink::RoomSet { .. } => 2,
            ToLink::Unroute { entries, .. } => entries.len(),
            ToLink::Recover { .. } | ToLink::Check { .. } => 1,
            ToLink::Index { .. } => 2,
            // At most: writes and removals of one device in a turn share commands.
            ToLink::Durable { ops, .. } => 2 * ops.len(),
            ToLink::Barrier(_) => 0,
        }
    }
}

/// What the link tells the reactor.
pub enum FromLink {
    /// Redis is (back) up: every local route is to be written again.
    Up,
    /// Redis lost what it kept (restarted empty, flushed, or a Redis Cluster failed over
    /// and may have lost writes): routes, durable pushes, rooms and status values are to be
    /// written again, routes under a new epoch (removals may have been lost too).
    Emptied,
    /// This node may have missed other nodes' messages (its subscription broke, or its
    /// heartbeat entry lapsed so that the others stopped asking it): the rooms are to be
    /// read again. `routes`: the entry lapsed, so readers may have removed its routes as a
    /// dead node's: they are written again under a new epoch.
    Rejoined { routes: bool },
    /// A room or status write that could not go (Redis away): kept by the reactor for the
    /// return.
    Unsent(ToLink),
    /// A message on this node's channel, checked.
    Msg(NodeMsg),
    /// Request `id` reached no subscriber of `node`'s channel: that node will not answer.
    Unheard { node: String, id: u64 },
    /// Rooms kept in Redis: (app id, room, member device ids — None: that room could not be
    /// read, leave it as it is), a chunk at a time, then
    /// `Load::Done` (or `Failed`) with how many of the `RoomsLoad`s asked it answers.
    Rooms(Vec<(String, String, Option<Vec<String>>)>, Load),
    /// A status value read (None: not there, expired, or the read failed), with the
    /// milliseconds it has left.
    Status {
        key: String,
        value: Option<(Vec<u8>, u64)>,
    },
    /// Durable writes of token `token` (and every earlier one) are done: `ok` false when
    /// they could not be made (Redis away, or refused).
    Written { token: u64, ok: bool },
    /// A dead node's devices with durable records (app id, device id), a chunk at a time:
    /// this node adopts them (it won the dead node's index).
    Orphans {
        node: String,
        devices: Vec<(String, String)>,
    },
    /// A device's durable records, read for connection `conn` (None: the read failed).
    Records {
        conn: u64,
        records: Option<Vec<(String, Vec<u8>)>>,
    },
    /// Check `id`'s answer, a flag per field: there (or removed by it); None: the check
    /// failed.
    Checked { id: u64, found: Option<Vec<bool>> },
    /// The routes read for request `id`: conn id → value (None: the read failed).
    Looked {
        id: u64,
        fields: Option<Vec<(String, String)>>,
    },
    /// `ToLink::Barrier`'s token: everything queued before it has been answered.
    Barrier(u64),
}

/// Where a rooms load stands (`FromLink::Rooms`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Load {
    More,
    Done(usize),
    Failed(usize),
}

/// Bytes the reactor may have queued for the link (messages, route writes at ~64 B each)
/// before it counts what does not fit as dropped. An unbounded channel under a byte count:
/// a bounded crossbeam channel would allocate (and touch) all of its slots up front.
const QUEUE_BYTES: usize = 64 << 20;
/// Commands one pipeline takes at most (more wait for the next round trip), so that a
/// full route rewrite does not hold up the heartbeat.
const PIPELINE_MAX: usize = 8192;
/// Node messages the subscriber may have handed the reactor and not yet seen; past it the
/// subscriber waits (and Redis buffers for it). Small: a message may be megabytes.
const INBOX: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Link {
    tx: Sender<ToLink>,
    /// Bytes queued on `tx` and not yet taken by the command thread.
    queued: Arc<AtomicUsize>,
    pub rx: Receiver<FromLink>,
    pub view: Arc<View>,
    _threads: Vec<JoinHandle<()>>,
    /// A process started by a live upgrade: the command thread waits until it has taken
    /// over (`start_commands`), so that it neither heartbeats under another route epoch nor
    /// adopts the records the old process still holds.
    later: Option<(Ctx, Receiver<ToLink>, Info)>,
    /// Set when a live upgrade handed this node over: the command thread must not delete
    /// the node's entry when it ends (the new process carries on under it).
    detached: Arc<std::sync::atomic::AtomicBool>,
}

pub type Wake = Arc<dyn Fn() + Send + Sync>;
pub type Info = Arc<dyn Fn() -> NodeInfo + Send + Sync>;

impl Link {
    /// Starts the threads. They run until the process exits; when the reactor drops the
    /// link, the command thread deletes this node's heartbeat entry (unless `detach`ed).
    /// `commands`: false in a process started by a live upgrade — only the subscriber starts
    /// now, the command thread at `start_commands`.
    pub fn start(
        cfg: &Config,
        view: Arc<View>,
        metrics: Arc<Metrics>,
        wake: Wake,
        info: Info,
        commands_now: bool,
    ) -> Link {
        let (tx, to_link) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let (from_link, rx) = crossbeam_channel::bounded(INBOX);
        let c = Ctx {
            url: cfg.cluster.redis.clone(),
            node: cfg.node_id.clone(),
            keys: Keys::new(&cfg.cluster.key_prefix),
            heartbeat: Duration::from_millis(cfg.cluster.heartbeat_ms),
            ttl_ms: cfg.cluster.node_ttl_ms,
            view: view.clone(),
            metrics,
            wake,
            out: from_link,
            queued: queued.clone(),
            detached: Default::default(),
        };
        let detached = c.detached.clone();
        let c2 = c.clone();
        let threads = vec![std::thread::Builder::new()
            .name("ll-redis-sub".into())
            .spawn(move || subscriber(c2))
            .expect("spawn ll-redis-sub")];
        let mut link = Link {
            tx,
            queued,
            rx,
            view,
            _threads: threads,
            later: Some((c, to_link, info)),
            detached,
        };
        if commands_now {
            link.start_commands(false);
        }
        link
    }

    /// Starts the command thread (once). `handed`: this process took the node over from
    /// another (a live upgrade): what that one held is here already, so the records this
    /// node holds in Redis are not adopted as a previous run's.
    pub fn start_commands(&mut self, handed: bool) {
        if let Some((c, rx, info)) = self.later.take() {
            self._threads.push(
                std::thread::Builder::new()
                    .name("ll-redis".into())
                    .spawn(move || commands(c, rx, info, handed))
                    .expect("spawn ll-redis"),
            );
        }
    }

    /// A live upgrade handed this node to another process: when this link ends, the node's
    /// entry stays.
    pub fn detach(&self) {
        self.detached.store(true, Relaxed);
    }

    /// Hands something to the link without waiting; false (counted) when its queue is full.
    pub fn send(&self, m: ToLink, metrics: &Metrics) -> bool {
        self.send_or_keep(m, metrics).is_ok()
    }

    /// `send`, giving back what did not go (its caller keeps it for later).
    pub fn send_or_keep(&self, m: ToLink, metrics: &Metrics) -> Result<(), ToLink> {
        let w = m.bytes();
        let routes = matches!(m, ToLink::Routes(_));
        let m = if self.queued.load(Relaxed) + w > QUEUE_BYTES {
            Err(m)
        } else {
            self.tx.send(m).map_err(|e| e.0)
        };
        if let Err(m) = m {
            inc(&metrics.redis_dropped);
            if routes {
                self.view.set_routes_lost();
            }
            return Err(m);
        }
        self.queued.fetch_add(w, Relaxed);
        Ok(())
    }
}

#[derive(Clone)]
struct Ctx {
    url: String,
    node: String,
    keys: Keys,
    heartbeat: Duration,
    ttl_ms: u64,
    view: Arc<View>,
    metrics: Arc<Metrics>,
    wake: Wake,
    out: Sender<FromLink>,
    queued: Arc<AtomicUsize>,
    detached: Arc<std::sync::atomic::AtomicBool>,
}

impl Ctx {
    /// The command thread took `m` off the reactor's queue.
    fn taken(&self, m: &ToLink) {
        self.queued.fetch_sub(m.bytes(), Relaxed);
    }

    fn tell(&self, m: FromLink) {
        if self.out.send(m).is_ok() {
            (self.wake)();
        }
    }

    /// The command connection: to the one server, or to the whole Redis Cluster (the
    /// crate's cluster client follows the slots).
    fn connect(&self) -> redis::RedisResult<Con> {
        let t = Some(Duration::from_secs(2));
        match cluster_seeds(&self.url) {
            Some(seeds) => {
                // Few, short retries: the crate's default (16, waits up to minutes) would
                // hold this thread — and the heartbeat — through a cluster that is down.
                let con = redis::cluster::ClusterClient::builder(seeds)
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(2))
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()?
                    .get_connection()?;
                Ok(Con::Cluster(Box::new(con)))
            }
            None => {
                let client = redis::Client::open(self.url.as_str())?;
                let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
                con.set_read_timeout(t)?;
                con.set_write_timeout(t)?;
                Ok(Con::One(con))
            }
        }
    }

    /// A plain connection to one server (`host:port` of a cluster node, or the one server).
    fn connect_one(&self, url: &str) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(url)?;
        let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(Duration::from_secs(2)))?;
        con.set_write_timeout(Some(Duration::from_secs(2)))?;
        Ok(con)
    }
}

/// `redis+cluster://h1:p1,h2:p2` → the seed URLs; None for `redis://`.
fn cluster_seeds(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix("redis+cluster://")?;
    let hosts = rest.split('/').next().unwrap_or("");
    Some(hosts.split(',').map(|h| format!("redis://{h}")).collect())
}

/// The command connection, of either deployment shape.
enum Con {
    One(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Con {
    /// Runs `cmds` as one pipeline (a cluster pipeline sends each to its slot's master);
    /// returns the replies of those marked `true`, in order. A command Redis refuses (a key
    /// of the wrong type, a full memory) answers for itself (an error value), counted and
    /// logged; the others still count. `Err` is only a connection that failed.
    fn run(
        &mut self,
        c: &Ctx,
        cmds: Vec<(redis::Cmd, bool)>,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        let keep: Vec<bool> = cmds.iter().map(|k| k.1).collect();
        let all = match self {
            Con::One(con) => {
                let mut p = redis::pipe();
                p.ignore_errors();
                for (cmd, _) in cmds {
                    p.add_command(cmd);
                }
                p.query::<Vec<redis::Value>>(con)?
            }
            Con::Cluster(con) => {
                let mut p = redis::cluster::cluster_pipe();
                for (cmd, _) in cmds {
                    p.add_command(cmd);
                }
                let mut v = match p.query::<Vec<redis::Value>>(con) {
                    Ok(v) => v,
                    Err(e) if lost(&e) => return Err(e),
                    // The crate's cluster pipeline has no `ignore_errors`: one error reply
                    // fails the whole answer, though every command went. The failed ones are
                    // named in the error. Of the others, a read is read again alone; a
                    // write ran (its reply only says so); a message is taken as heard; a
                    // script whose reply says what that call did answers `Nil`, which its
                    // reader takes for a failed read.
                    Err(e) => {
                        let Some(failed) = e.clone().into_server_errors() else {
                            return Err(e);
                        };
                        let mut v = Vec::with_capacity(keep.len());
                        for (i, cmd) in p.cmd_iter().enumerate() {
                            v.push(match failed.iter().find(|f| f.0 == i) {
                                Some((_, err)) => redis::Value::ServerError(err.clone()),
                                None if !keep[i] => redis::Value::Nil,
                                None if is_publish(cmd) => redis::Value::Int(1),
                                None if read_only(cmd) => one(con, cmd)?,
                                None if is_eval(cmd) => redis::Value::Nil,
                                None => redis::Value::Int(0),
                            });
                        }
                        v
                    }
                };
                // A command redirected (its slot moved: a failover, a resharding) did not
                // run, and the crate does not follow redirects in a pipeline: run alone, it
                // does (and learns the new slots). If that is redirected again, the cluster
                // is not settled: the rest stay failed (their readers hear so) for now.
                for (i, cmd) in p.cmd_iter().enumerate() {
                    if matches!(&v[i], redis::Value::ServerError(e) if redirected(e)) {
                        v[i] = one(con, cmd)?;
                        if matches!(&v[i], redis::Value::ServerError(e) if redirected(e)) {
                            break;
                        }
                    }
                }
                v
            }
        };
        let mut first = None;
        let mut out = Vec::with_capacity(all.len());
        for (v, keep) in all.into_iter().zip(keep) {
            if let redis::Value::ServerError(e) = &v {
                inc(&c.metrics.redis_errors);
                inc(&c.metrics.cluster_bad_messages);
                first.get_or_insert_with(|| format!("{e:?}"));
            }
            if keep {
                out.push(v);
            }
        }
        if let Some(e) = first {
            log::warn!("redis refused a command: {e}");
        }
        Ok(out)
    }
}

/// A key's Redis Cluster slot: CRC16 (XMODEM) of its hash tag (or of the key), mod 16384.
fn key_slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&x| x == b'{').and_then(|open| {
        let rest = &b[open + 1..];
        let close = rest.iter().position(|&x| x == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    let mut crc: u16 = 0;
    for &x in tagged.unwrap_or(b) {
        crc ^= u16::from(x) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc & 16383
}

/// One command on a Redis Cluster, its error reply as a value.
fn one(
    con: &mut redis::cluster::ClusterConnection,
    cmd: &redis::Cmd,
) -> redis::RedisResult<redis::Value> {
    match cmd.query::<redis::Value>(con) {
        Ok(v) => Ok(v),
        Err(e) if lost(&e) => Err(e),
        Err(e) => match e.clone().into_server_errors() {
            Some(f) if !f.is_empty() => Ok(redis::Value::ServerError(f[0].1.clone())),
            _ => Err(e),
        },
    }
}

/// An error reply that means "not here, ask there" (or "not now"): the command did not run.
fn redirected(e: &redis::ServerError) -> bool {
    use redis::ServerErrorKind as K;
    matches!(
        e.kind(),
        Some(
            K::Moved
                | K::Ask
                | K::TryAgain
                | K::ClusterDown
                | K::MasterDown
                | K::ReadOnly
                | K::BusyLoading
        )
    )
}

impl Con {
    /// `CLUSTER INFO` of the master that holds `key` (the heartbeat's own: a master that
    /// is down costs no reconnection); None on any failure.
    fn cluster_info(&mut self, key: &str) -> Option<String> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        let Con::Cluster(con) = self else {
            return None;
        };
        let mut info = cmd("CLUSTER");
        info.arg("INFO");
        let route = Route::new(key_slot(key), SlotAddr::Master);
        let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
        let v = con.route_command(&info, to).ok()?;
        redis::from_redis_value(v).ok()
    }

    fn sharded(&self) -> bool {
        matches!(self, Con::Cluster(_))
    }
}

fn cmd(name: &str) -> redis::Cmd {
    redis::cmd(name)
}

/// Deletes hash field `field` of `key` if it still holds `value` (one step on the server).
fn del_if(key: &str, field: &str, value: &str) -> redis::Cmd {
    const SCRIPT: &str = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then \
                          return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0";
    let mut e = cmd("EVAL");
    e.arg(SCRIPT).arg(1).arg(key).arg(field).arg(value);
    e
}

/// Per (op, field, claim): 1 if the record is there at that claim (`durable` record layout:
/// the claim is bytes 10–13), else 0; op `d` then removes it, in the same step.
const CHECK: &str = "local r = {} for i = 1, #ARGV, 3 do \
    local v = redis.call('HGET', KEYS[1], ARGV[i + 1]) \
    local mine = v and string.len(v) >= 13 and \
      struct.unpack('>I4', v, 10) == tonumber(ARGV[i + 2]) \
    if mine and ARGV[i] == 'd' then redis.call('HDEL', KEYS[1], ARGV[i + 1]) end \
    r[#r + 1] = mine and 1 or 0 end return r";

/// The status read (a value and what is left of its TTL).
const STATUS_GET: &str = "return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}";

/// Whether `c` only reads (running it again answers the same).
fn read_only(c: &redis::Cmd) -> bool {
    let mut args = c.args_iter();
    match args.next() {
        Some(redis::Arg::Simple(b"HGETALL" | b"SMEMBERS" | b"GET" | b"EXISTS")) => true,
        Some(redis::Arg::Simple(b"EVAL")) => {
            matches!(args.next(), Some(redis::Arg::Simple(s)) if s == STATUS_GET.as_bytes())
        }
        _ => false,
    }
}

fn is_eval(c: &redis::Cmd) -> bool {
    matches!(c.args_iter().next(), Some(redis::Arg::Simple(b"EVAL")))
}

fn is_publish(c: &redis::Cmd) -> bool {
    c.args_iter()
        .next()
        .is_some_and(|a| matches!(a, redis::Arg::Simple(b) if b.ends_with(b"PUBLISH")))
}

/// Exponential backoff with full jitter: many nodes that lost Redis at once do not come back
/// in step.
struct Backoff {
    next: Duration,
    seed: u64,
}

impl Backoff {
    fn new(seed: u64) -> Backoff {
        Backoff {
            next: BACKOFF_MIN,
            seed: seed | 1,
        }
    }

    fn wait(&mut self) {
        // xorshift: no dependency for a jitter.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let ms = self.next.as_millis() as u64;
        let d = Duration::from_millis(ms / 2 + self.seed % (ms / 2 + 1));
        std::thread::sleep(d);
        self.next = (self.next * 2).min(BACKOFF_MAX);
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

fn seed(node: &str) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    node.bytes().fold(t, |h, b| h.rotate_left(5) ^ u64::from(b)) ^ u64::from(std::process::id())
}

/// The command connection: pipelines what the reactor queued, heartbeats, reads the node
/// table. On an error it reconnects (with backoff); what the reactor queued meanwhile is
/// dropped — routes are written again on return, and requests to other nodes are answered
/// `unreached` by the reactor's timeout.
fn commands(c: Ctx, rx: Receiver<ToLink>, info: Info, handed: bool) {
    let mut backoff = Backoff::new(seed(&c.node));
    let mut warned = false;
    let mut adopted_own = handed;
    let mut beat = Beat::default();
    loop {
        let mut con = match c.connect() {
            Ok(con) => con,
            Err(e) => {
                down(&c, &mut warned, &e);
                drop_queued(&c, &rx);
                backoff.wait();
                continue;
            }
        };
        // Heartbeat first, so the node table is known before anything is routed.
        if let Err(e) = heartbeat(&c, &mut con, &info, &mut beat) {
            down(&c, &mut warned, &e);
            drop_queued(&c, &rx);
            backoff.wait();
            continue;
        }
        if warned || !c.view.writable() {
            log::info!("redis: connected to {}", c.url);
        }
        warned = false;
        c.view.set_up(true);
        c.metrics.redis_up.store(1, Relaxed);
        c.tell(FromLink::Up);
        // Its routes are written now, even while it cannot hear (and so has no entry yet):
        // if that lasts, readers may remove them as a dead node's (`heartbeat`).
        if !c.view.hearing() && !beat.entered {
            beat.unseen.get_or_insert_with(Instant::now);
        }
        if !adopted_own {
            // What this node's previous run left unacknowledged (it stopped, or died, and
            // came back before anyone adopted it) is this run's to deliver or report.
            adopted_own = true;
            if let Err(e) = adopt_left(&c, &mut con) {
                refused(&c, &e);
            }
        }
        let since = Instant::now();
        let mut next_beat = Instant::now() + c.heartbeat;
        let err = loop {
            // The backoff starts over only once a connection has lasted: one that fails
            // right after each reconnect (and each full route rewrite) is not retried flat out.
            if since.elapsed() > BACKOFF_MAX * 2 {
                backoff.reset();
            }
            let wait = next_beat.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait).inspect(|m| c.taken(m)) {
                Ok(first) => {
                    let mut batch = vec![first];
                    let mut size = batch[0].commands();
                    while size < PIPELINE_MAX {
                        match rx.try_recv().inspect(|m| c.taken(m)) {
                            Ok(m) => {
                                size += m.commands();
                                batch.push(m);
                            }
                            Err(_) => break,
                        }
                    }
                    let barriers: Vec<u64> = batch
                        .iter()
                        .filter_map(|m| match m {
                            ToLink::Barrier(t) => Some(*t),
                            _ => None,
                        })
                        .collect();
                    let r = pipeline(&c, &mut con, batch).and_then(|(apps, asked)| {
                        // Rooms to read, a chunk at a time, heartbeating between chunks: a
                        // long read must not let this node's entry lapse.
                        let mut between = |con: &mut Con| {
                            if Instant::now() >= next_beat {
                                next_beat = Instant::now() + c.heartbeat;
                                heartbeat(&c, con, &info, &mut beat)?;
                            }
                            Ok(())
                        };
                        load_rooms(&c, &mut con, &apps, asked, &mut between)
                    });
                    // After every reply of what came before it.
                    for t in barriers {
                        c.tell(FromLink::Barrier(t));
                    }
                    if let Err(e) = r {
                        if lost(&e) {
                            break e;
                        }
                        refused(&c, &e);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    leave(&c, &mut con);
                    return;
                }
            }
            if Instant::now() >= next_beat {
                if let Err(e) = heartbeat(&c, &mut con, &info, &mut beat) {
                    if lost(&e) {
                        break e;
                    }
                    refused(&c, &e);
                }
                next_beat = Instant::now() + c.heartbeat;
            }
        };
        down(&c, &mut warned, &err);
        drop_queued(&c, &rx);
        backoff.wait();
    }
}

/// Redis is away: what the reactor queued cannot go. Whoever waits on it hears so now
/// (a read failed, a request unheard) rather than at its timeout.
fn drop_queued(c: &Ctx, rx: &Receiver<ToLink>) {
    while let Ok(m) = rx.try_recv().inspect(|m| c.taken(m)) {
        match m {
            ToLink::Lookup { id, .. } => c.tell(FromLink::Looked { id, fields: None }),
            ToLink::StatusGet { key } => c.tell(FromLink::Status { key, value: None }),
            ToLink::Routes(_) => c.view.set_routes_lost(),
            ToLink::Durable { token, .. } => c.tell(FromLink::Written { token, ok: false }),
            ToLink::Recover { conn, .. } => c.tell(FromLink::Records {
                conn,
                records: None,
            }),
            m @ (ToLink::RoomSet { .. } | ToLink::StatusSet { .. }) => c.tell(FromLink::Unsent(m)),
            ToLink::RoomsLoad { .. } => c.tell(FromLink::Rooms(vec![], Load::Failed(1))),
            ToLink::Check { id, .. } => c.tell(FromLink::Checked { id, found: None }),
            ToLink::Send {
                node,
                request: Some(id),
                ..
            } => c.tell(FromLink::Unheard { node, id }),
            ToLink::Barrier(t) => c.tell(FromLink::Barrier(t)),
            _ => {}
        }
    }
}

/// The connection is gone (or unusable): reconnect. Anything else is Redis refusing a
/// command (a key of the wrong type, a full memory): counted and logged, the connection
/// kept — reconnecting would only meet the same refusal.
fn lost(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

fn refused(c: &Ctx, e: &redis::RedisError) {
    inc(&c.metrics.redis_errors);
    inc(&c.metrics.cluster_bad_messages);
    log::warn!("redis refused a command: {e}");
}

/// Shutting down: this node's entry goes now, so the others stop asking it at once rather
/// than after `node_ttl_ms`.
fn leave(c: &Ctx, con: &mut Con) {
    if c.detached.load(Relaxed) {
        return; // handed over: the new process carries on under this node's entry
    }
    // Still in the node set: the node that next finds its entry gone removes it and adopts
    // the unacknowledged pushes it left in Redis.
    let mut del = cmd("DEL");
    del.arg(c.keys.node(&c.node));
    let _ = con.run(c, vec![(del, false)]);
}

/// Redis went away (or never came): counted, logged once per outage, reported degraded.
fn down(c: &Ctx, warned: &mut bool, e: &redis::RedisError) {
    inc(&c.metrics.redis_errors);
    c.view.set_up(false);
    c.metrics.redis_up.store(0, Relaxed);
    if !*warned {
        log::warn!("redis: {e}: the cluster is degraded (local service goes on); reconnecting");
        *warned = true;
    }
}

/// Runs a batch the reactor handed over as one pipeline; returns the rooms it asked to read
/// (apps, and how many loads asked), which the caller reads after it.
fn pipeline(
    c: &Ctx,
    con: &mut Con,
    batch: Vec<ToLink>,
) -> redis::RedisResult<(Vec<Arc<str>>, usize)> {
    let routes = batch.iter().any(|m| matches!(m, ToLink::Routes(_)));
    let mut cmds = vec![];
    // Replies read back, in pipeline order: how many heard a request (PUBLISH), routes.
    let mut kept = vec![];
    // Apps whose rooms are to be read (after this round: they take two more), and how many
    // loads asked (each is told done).
    let mut loads: Vec<Arc<str>> = vec![];
    let mut asked = 0;
    // Room and status writes: kept in Redis before the messages that announce them go (on
    // a Redis Cluster the crate sends each master its share at once, in no order between
    // masters; a node that reads the rooms on hearing the message must find the write).
    let mut kept_first: Vec<(redis::Cmd, bool)> = vec![];
    // Those writes as they came, handed back (`Unsent`) if the round fails.
    let mut unsent: Vec<ToLink> = vec![];
    // Redis Cluster: sharded pub/sub, each node's channel on its own slot's master.
    let publish = if con.sharded() { "SPUBLISH" } else { "PUBLISH" };
    for m in batch {
        match m {
            ToLink::Routes(ops) => {
                for op in ops {
                    let dk = c.keys.device(&op.app, &op.device);
                    let uk = op.user.as_ref().map(|u| c.keys.user(&op.app, u));
                    if op.add {
                        let user = op.user.as_deref().unwrap_or("");
                        let mut h = cmd("HSET");
                        h.arg(&dk).arg(&op.conn).arg(route_value(op.epoch, user));
                        cmds.push((h, false));
                        if let Some(uk) = uk {
                            let mut h = cmd("HSET");
                            h.arg(&uk)
                                .arg(&op.conn)
                                .arg(route_value(op.epoch, &op.device));
                            cmds.push((h, false));
                        }
                    } else {
                        let mut h = cmd("HDEL");
                        h.arg(&dk).arg(&op.conn);
                        cmds.push((h, false));
                        if let Some(uk) = uk {
                            let mut h = cmd("HDEL");
                            h.arg(&uk).arg(&op.conn);
                            cmds.push((h, false));
                        }
                    }
                }
            }
            ToLink::Send { node, request, msg } => {
                let mut p = cmd(publish);
                p.arg(c.keys.channel(&node)).arg(msg);
                if let Some(id) = request {
                    kept.push(Kept::Heard(node, id));
                }
                cmds.push((p, request.is_some()));
            }
            ToLink::Unroute {
                app,
                name,
                user,
                entries,
            } => {
                let key = c.keys.routes(&app, &name, user);
                for (conn, value) in entries {
                    cmds.push((del_if(&key, &conn, &value), false));
                }
            }
            ToLink::RoomSet {
                app,
                room,
                devices,
                add,
            } => {
                // (Kept, to be handed back if the round fails.)
                unsent.push(ToLink::RoomSet {
                    app: app.clone(),
                    room: room.clone(),
                    devices: devices.clone(),
                    add,
                });
                let mut m = cmd(if add { "SADD" } else { "SREM" });
                m.arg(c.keys.room(&app, &room)).arg(&devices);
                kept_first.push((m, false));
                let mut idx = cmd("SADD");
                idx.arg(c.keys.rooms(&app)).arg(&room);
                kept_first.push((idx, false));
            }
            ToLink::RoomsLoad { apps } => {
                asked += 1;
                for a in apps {
                    if !loads.contains(&a) {
                        loads.push(a);
                    }
                }
            }
            ToLink::StatusSet { key, value, ttl_ms } => {
                unsent.push(ToLink::StatusSet {
                    key: key.clone(),
                    value: value.clone(),
                    ttl_ms,
                });
                let mut set = cmd("SET");
                set.arg(c.keys.status(&key))
                    .arg(&value[..])
                    .arg("PX")
                    .arg(ttl_ms.max(1));
                kept_first.push((set, false));
            }
            ToLink::StatusGet { key } => {
                let mut get = cmd("EVAL");
                get.arg(STATUS_GET).arg(1).arg(c.keys.status(&key));
                cmds.push((get, true));
                kept.push(Kept::Status(key));
            }
            ToLink::Lookup {
                id,
                app,
                name,
                user,
            } => {
                let key = c.keys.routes(&app, &name, user);
                let mut h = cmd("HGETALL");
                h.arg(key);
                cmds.push((h, true));
                kept.push(Kept::Looked(id));
            }
            ToLink::Recover {
                conn,
                app,
                device,
                only,
            } => {
                let mut e = cmd("EVAL");
                e.arg(super::durable::RECOVER)
                    .arg(1)
                    .arg(c.keys.durable(&app, &device))
                    .arg(&c.node)
                    .arg(only.as_deref().unwrap_or(""));
                cmds.push((e, true));
                kept.push(Kept::Records(conn));
            }
            ToLink::Check {
                id,
                app,
                device,
                fields,
            } => {
                let mut e = cmd("EVAL");
                e.arg(CHECK).arg(1).arg(c.keys.durable(&app, &device));
                for (f, remove, claim) in &fields {
                    e.arg(if *remove { "d" } else { "x" }).arg(f).arg(*claim);
                }
                cmds.push((e, true));
                kept.push(Kept::Checked(id));
            }
            ToLink::Barrier(_) => {} // told back by the caller, after the replies
            ToLink::Index {
                app,
                device,
                life_ms,
            } => {
                let idx = c.keys.durable_index(&c.node);
                let mut z = cmd("ZADD");
                z.arg(&idx)
                    .arg(now_ms())
                    .arg(super::durable::index_member(&app, &device));
                let mut trim = cmd("ZREMRANGEBYSCORE");
                trim.arg(&idx)
                    .arg("-inf")
                    .arg(now_ms().saturating_sub(life_ms));
                cmds.push((z, true));
                cmds.push((trim, true));
                kept.push(Kept::Ignore);
                kept.push(Kept::Ignore);
            }
            ToLink::Durable {
                ops,
                life_ms,
                token,
            } => {
                let n = durable_commands(c, ops, life_ms, &mut cmds);
                kept.push(Kept::Written(token, n));
            }
        }
    }
    let mut first_failed = None;
    if con.sharded() && !kept_first.is_empty() {
        c.metrics
            .routes_written
            .fetch_add(kept_first.len() as u64, Relaxed);
        let t = Instant::now();
        let n = kept_first.len() as u64;
        match con.run(c, std::mem::take(&mut kept_first)) {
            Ok(_) => record(c, n, t),
            Err(e) => first_failed = Some(e),
        }
    }
    // (One server runs a pipeline in order: they go first in it.)
    kept_first.append(&mut cmds);
    let cmds = kept_first;
    let n = cmds.len() as u64;
    if n == 0 {
        if let Some(e) = first_failed {
            load_failed(c, asked);
            hand_back(c, &e, unsent);
            return Err(e);
        }
        // (Rooms to load, if asked, take rounds of their own.)
        return Ok((loads, asked));
    }
    // Everything that is not a message or a read is a route write.
    let other = cmds
        .iter()
        .filter(|(c, keep)| *keep || is_publish(c))
        .count() as u64;
    c.metrics.routes_written.fetch_add(n - other, Relaxed);
    let t = Instant::now();
    let ran = match first_failed {
        Some(e) => Err(e),
        None => con.run(c, cmds),
    };
    let replies = match ran {
        Ok(r) => r,
        Err(e) => {
            if routes {
                c.view.set_routes_lost();
            }
            // Whoever waits on a read hears it failed (and asks every node instead).
            for k in kept {
                match k {
                    Kept::Looked(id) => c.tell(FromLink::Looked { id, fields: None }),
                    Kept::Status(key) => c.tell(FromLink::Status { key, value: None }),
                    Kept::Records(conn) => c.tell(FromLink::Records {
                        conn,
                        records: None,
                    }),
                    Kept::Written(token, _) => c.tell(FromLink::Written { token, ok: false }),
                    Kept::Checked(id) => c.tell(FromLink::Checked { id, found: None }),
                    Kept::Heard(..) | Kept::Ignore => {}
                }
            }
            load_failed(c, asked);
            hand_back(c, &e, unsent);
            return Err(e);
        }
    };
    record(c, n, t);
    let mut replies = replies.into_iter();
    for k in kept {
        if let Kept::Written(token, calls) = k {
            // Each command answers a number; a refused one (out of memory...) an error.
            let ok = replies
                .by_ref()
                .take(calls)
                .filter(|v| redis::from_redis_value::<i64>(v.clone()).is_ok())
                .count()
                == calls;
            if !ok {
                inc(&c.metrics.cluster_bad_messages);
            }
            c.tell(FromLink::Written { token, ok });
            continue;
        }
        let Some(v) = replies.next() else {
            break;
        };
        let known = answered(&v);
        match k {
            Kept::Written(..) | Kept::Ignore => {}
            Kept::Records(conn) => {
                let records = redis::from_redis_value::<Vec<(String, Vec<u8>)>>(v)
                    .ok()
                    .filter(|_| known);
                if records.is_none() {
                    inc(&c.metrics.cluster_bad_messages);
                }
                c.tell(FromLink::Records { conn, records });
            }
            Kept::Checked(id) => {
                let found = redis::from_redis_value::<Vec<i64>>(v)
                    .map(|f| f.into_iter().map(|n| n > 0).collect())
                    .ok()
                    .filter(|_| known);
                c.tell(FromLink::Checked { id, found });
            }
            Kept::Heard(node, id) => {
                if redis::from_redis_value::<i64>(v).unwrap_or(0) == 0 {
                    c.tell(FromLink::Unheard { node, id });
                }
            }
            Kept::Status(key) => {
                let value = match redis::from_redis_value::<(Option<Vec<u8>>, i64)>(v) {
                    Ok((Some(b), ttl)) if ttl > 0 => Some((b, ttl as u64)),
                    Ok(_) => None,
                    Err(_) => {
                        inc(&c.metrics.cluster_bad_messages);
                        None
                    }
                };
                c.tell(FromLink::Status { key, value });
            }
            Kept::Looked(id) => {
                let fields = redis::from_redis_value::<Vec<(String, String)>>(v)
                    .ok()
                    .filter(|_| known);
                if fields.is_none() {
                    inc(&c.metrics.cluster_bad_messages);
                }
                c.tell(FromLink::Looked { id, fields });
            }
        }
    }
    Ok((loads, asked))
}

/// A round that failed: its room and status writes go back to the reactor, to be written
/// when Redis is back — only if the connection was lost (refused, they would be again).
fn hand_back(c: &Ctx, e: &redis::RedisError, unsent: Vec<ToLink>) {
    if lost(e) {
        unsent.into_iter().for_each(|m| c.tell(FromLink::Unsent(m)));
    }
}

fn load_failed(c: &Ctx, asked: usize) {
    if asked > 0 {
        c.tell(FromLink::Rooms(vec![], Load::Failed(asked)));
    }
}

/// Reads every room of `apps` (the index, then each room's members), for a node that has
/// just started or may have missed membership changes; told back as `Rooms`, done once for
/// the `asked` loads (or failed). `between` runs between chunks (the heartbeat).
fn load_rooms(
    c: &Ctx,
    con: &mut Con,
    apps: &[Arc<str>],
    asked: usize,
    between: &mut dyn FnMut(&mut Con) -> redis::RedisResult<()>,
) -> redis::RedisResult<()> {
    if asked == 0 {
        return Ok(());
    }
    let r = read_rooms(c, con, apps, between);
    match r {
        Ok(()) => c.tell(FromLink::Rooms(vec![], Load::Done(asked))),
        Err(_) => load_failed(c, asked),
    }
    r
}

/// A reply as `T`; a reply of another shape is Redis refusing (the key is not what we keep
/// there), not a lost connection (the crate's parse errors count as unrecoverable).
fn parsed<T: redis::FromRedisValue>(v: redis::Value) -> redis::RedisResult<T> {
    redis::from_redis_value(v).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::Client,
            "a reply of the wrong type",
            e.to_string(),
        ))
    })
}

/// Whether a reply is an answer at all: not refused, and not `Nil`, which no reply read
/// here gives — a reply not known (`Con::run`).
fn answered(v: &redis::Value) -> bool {
    !matches!(v, redis::Value::ServerError(_) | redis::Value::Nil)
}

/// A reply that must be there, as `T`: none, refused or not known is an error saying `what`
/// could not be done (a refusal: the connection is kept).
fn answer<T: redis::FromRedisValue>(
    v: Option<redis::Value>,
    what: &'static str,
) -> redis::RedisResult<T> {
    match v {
        Some(v) if answered(&v) => parsed(v),
        _ => Err(redis::RedisError::from((redis::ErrorKind::Client, what))),
    }
}

fn read_rooms(
    c: &Ctx,
    con: &mut Con,
    apps: &[Arc<str>],
    between: &mut dyn FnMut(&mut Con) -> redis::RedisResult<()>,
) -> redis::RedisResult<()> {
    let idx: Vec<_> = apps
        .iter()
        .map(|a| {
            let mut m = cmd("SMEMBERS");
            m.arg(c.keys.rooms(a));
            (m, true)
        })
        .collect();
    let mut rooms = vec![];
    for (app, v) in apps.iter().zip(con.run(c, idx)?) {
        // An index that cannot be read fails the load: read as empty, it would remove
        // every room of the app here.
        let names: Vec<String> = answer(Some(v), "a rooms index could not be read")?;
        rooms.extend(names.into_iter().map(|r| (app.to_string(), r)));
    }
    for chunk in rooms.chunks(1024) {
        between(con)?;
        let reads: Vec<_> = chunk
            .iter()
            .map(|(app, room)| {
                let mut m = cmd("SMEMBERS");
                m.arg(c.keys.room(app, room));
                (m, true)
            })
            .collect();
        let mut out = vec![];
        for ((app, room), v) in chunk.iter().zip(con.run(c, reads)?) {
            // A room that cannot be read (a key of the wrong type...) is None: its
            // membership here stays as it is.
            let devices = answered(&v)
                .then(|| redis::from_redis_value::<Vec<String>>(v).ok())
                .flatten();
            out.push((app.clone(), room.clone(), devices));
        }
        c.tell(FromLink::Rooms(out, Load::More));
    }
    Ok(())
}

/// A reply the pipeline reads back.
enum Kept {
    Heard(String, u64),
    Looked(u64),
    Status(String),
    Records(u64),
    Checked(u64),
    /// A reply nobody waits for (not a route write either).
    Ignore,
    /// A durable token and how many commands (replies) it took.
    Written(u64, usize),
}

/// A turn's durable record changes as plain commands, grouped by device hash (in first-seen
/// order): each run of writes is one `HSET` of all their fields (then a `PEXPIRE` if one of
/// them renews the hash), each run of removals one `HDEL`, in order. (Plain commands cost
/// Redis half the CPU of the same steps in a script: 1.7 against 3.5 µs per push written
/// and removed, measured here; a device with several pushes in a turn costs less again.)
/// Returns how many commands.
fn durable_commands(
    c: &Ctx,
    ops: Vec<DurOp>,
    life_ms: u64,
    cmds: &mut Vec<(redis::Cmd, bool)>,
) -> usize {
    let mut groups: Vec<(String, Vec<DurOp>)> = Vec::with_capacity(ops.len());
    let mut at: std::collections::HashMap<(Arc<str>, Arc<str>), usize> =
        std::collections::HashMap::with_capacity(ops.len());
    for op in ops {
        let i = *at
            .entry((op.app.clone(), op.device.clone()))
            .or_insert_with(|| {
                groups.push((c.keys.durable(&op.app, &op.device), vec![]));
                groups.len() - 1
            });
        groups[i].1.push(op);
    }
    let n = cmds.len();
    let mut rec = Vec::with_capacity(256);
    let mut renewed = false;
    for (key, steps) in groups {
        for run in steps.chunk_by(|a, b| a.add.is_some() == b.add.is_some()) {
            if run[0].add.is_none() {
                let mut h = cmd("HDEL");
                h.arg(&key);
                run.iter().for_each(|op| {
                    h.arg(&op.field);
                });
                cmds.push((h, true));
                continue;
            }
            let mut h = cmd("HSET");
            h.arg(&key);
            for op in run {
                if let Some(a) = &op.add {
                    rec.clear();
                    let waiter = a.waiter.as_deref().unwrap_or("");
                    let (exp, claim) = (a.expires, a.claim);
                    super::durable::encode_into(&mut rec, exp, claim, &c.node, waiter, &a.body);
                    h.arg(&op.field).arg(&rec[..]);
                }
            }
            cmds.push((h, true));
            if let Some(op) = run.iter().find(|op| op.renew) {
                let mut e = cmd("PEXPIRE");
                e.arg(&key).arg(life_ms);
                cmds.push((e, true));
                // In this node's index, for whoever adopts its records if it dies.
                let mut z = cmd("ZADD");
                z.arg(c.keys.durable_index(&c.node))
                    .arg(now_ms())
                    .arg(super::durable::index_member(&op.app, &op.device));
                cmds.push((z, true));
                renewed = true;
            }
        }
    }
    if renewed {
        // Devices whose hash has expired by now leave the index.
        let mut z = cmd("ZREMRANGEBYSCORE");
        z.arg(c.keys.durable_index(&c.node))
            .arg("-inf")
            .arg(now_ms().saturating_sub(life_ms));
        cmds.push((z, true));
    }
    cmds.len() - n
}

fn now_ms() -> u64 {
    crate::types::unix_ms()
}

fn record(c: &Ctx, commands: u64, since: Instant) {
    let m = &c.metrics;
    m.redis_commands.fetch_add(commands, Relaxed);
    m.redis_pipelines.fetch_add(1, Relaxed);
    m.redis_pipeline_depth.store(commands, Relaxed);
    m.redis_latency_us
        .fetch_add(since.elapsed().as_micros() as u64, Relaxed);
}

/// What heartbeats remember from one to the next.
#[derive(Default)]
struct Beat {
    /// The dataset's token last seen.
    born: Option<String>,
    /// This node has set its entry before (so finding it gone means it had lapsed).
    entered: bool,
    /// Since when it has had routes written and no entry yet (it could not hear).
    unseen: Option<Instant>,
    /// A Redis Cluster's highest `cluster_current_epoch` seen: a failover raises it.
    epoch: Option<u64>,
    /// The route epochs this process wrote into its entry last, as confirmed and as tried
    /// (a reply lost after the SET ran leaves the two apart): an entry found with neither
    /// (nor the one being written now) was written by another process under the node's id.
    wrote: Option<u64>,
    tried: Option<u64>,
    /// Such a process was seen; `intact` counts the heartbeats in a row since that found
    /// the entry this process's own again.
    shared: bool,
    intact: u32,
    /// When that was last logged (once every `CONFLICT_LOG_EVERY`; counted every time).
    logged: Option<Instant>,
}

/// Heartbeats in a row that must find the entry this process's own before a node that saw
/// another process under its id writes its routes again (one alone may fall between the
/// other's beats).
const INTACT_BEATS: u32 = 3;
const CONFLICT_LOG_EVERY: Duration = Duration::from_secs(10);

/// One heartbeat: this node's entry (expiring `node_ttl_ms` from now) and the node table —
/// a few commands whatever the number of connections: SET, SADD, SMEMBERS, then one GET per
/// node of the table (pipelined; every key in one slot, `{nodes}`).
fn heartbeat(c: &Ctx, con: &mut Con, info: &Info, beat: &mut Beat) -> redis::RedisResult<()> {
    let t = Instant::now();
    // The dataset's token: set if missing (by whichever node comes first), read back.
    const BORN: &str =
        "redis.call('SET', KEYS[1], ARGV[1], 'NX') return redis.call('GET', KEYS[1])";
    let mut e = cmd("EVAL");
    e.arg(BORN)
        .arg(1)
        .arg(c.keys.born())
        .arg(format!("{}:{}", c.node, now_ms()));
    // (Refused — out of memory, a script not allowed — it only costs this check.)
    let token: Option<String> = match con.run(c, vec![(e, true)]) {
        Ok(mut r) => r.pop().and_then(|v| redis::from_redis_value(v).ok()),
        Err(e) if lost(&e) => return Err(e),
        Err(e) => {
            refused(c, &e);
            None
        }
    };
    if let Some(token) = token {
        if beat.born.as_ref().is_some_and(|b| *b != token) {
            log::warn!("redis: it lost what it kept (restarted empty?): writing everything again");
            c.tell(FromLink::Emptied);
        }
        beat.born = Some(token);
    }
    if con.sharded() {
        // A failover promotes a replica that may lack the last writes it was sent: the
        // cluster's epoch rises, and everything is written again. (Asked of any master;
        // the highest seen counts, so one that has not heard yet is no false alarm.)
        if let Some(text) = con.cluster_info(&c.keys.nodes()) {
            let epoch = text.lines().find_map(|l| {
                l.strip_prefix("cluster_current_epoch:")
                    .and_then(|e| e.trim().parse::<u64>().ok())
            });
            if let Some(e) = epoch {
                if beat.epoch.is_some_and(|old| e > old) {
                    log::warn!("redis: the cluster's epoch rose to {e} (a failover?): writing everything again");
                    c.tell(FromLink::Emptied);
                }
                beat.epoch = Some(beat.epoch.map_or(e, |old| old.max(e)));
            }
        }
    }
    let me = info();
    let json = serde_json::to_string(&me).unwrap_or_default();
    let mut cmds = vec![];
    // Alive to the others only while this node hears its channel: a node that cannot hear
    // would let every request to it time out; silent, it expires and is not asked.
    let hearing = c.view.hearing();
    if hearing {
        // Set, giving back what was there: '' when it had gone (nil means no answer: a
        // sharded pipeline fills that in for a script whose reply it lost).
        const ENTER: &str = "local was = redis.call('GET', KEYS[1]) \
                             redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
                             if was then return was end return ''";
        let mut set = cmd("EVAL");
        set.arg(ENTER)
            .arg(1)
            .arg(c.keys.node(&c.node))
            .arg(json)
            .arg(c.ttl_ms);
        let mut sadd = cmd("SADD");
        sadd.arg(c.keys.nodes()).arg(&c.node);
        cmds.push((set, true));
        cmds.push((sadd, false));
    }
    let mut members = cmd("SMEMBERS");
    members.arg(c.keys.nodes());
    cmds.push((members, true));
    let mut n = cmds.len();
    if hearing {
        beat.tried = Some(me.routes);
    }
    let mut replies = con.run(c, cmds)?;
    let ids: Vec<String> = match replies.pop() {
        Some(v) => parsed(v)?,
        None => vec![],
    };
    if hearing {
        // Some(empty): the entry had gone; Some(bytes): what was there; None: no answer
        // (refused, or lost in a sharded pipeline): nothing is concluded from it.
        let was = replies
            .pop()
            .and_then(|v| redis::from_redis_value::<Option<Vec<u8>>>(v).ok().flatten());
        // (Unseen longer than a reader's allowance counts as a lapse too.)
        let young = Duration::from_millis(c.ttl_ms) + c.heartbeat;
        let unseen = beat.unseen.take().is_some_and(|t| t.elapsed() > young);
        if was.as_ref().is_some_and(|b| b.is_empty()) && (beat.entered || unseen) {
            // Gone a while (stopped, cut off, not hearing): the others took this node for
            // dead, stopped asking it and may have removed its routes.
            log::warn!("cluster: this node's entry had lapsed: its routes are written again and the rooms read again");
            c.tell(FromLink::Rejoined { routes: true });
            beat.shared = false; // (the other, if any, left its entry: this is the heal)
        }
        if let Some(b) = was
            .as_ref()
            .filter(|b| !b.is_empty() && beat.wrote.is_some())
        {
            let found = serde_json::from_slice::<NodeInfo>(b).map_or(0, |i| i.routes);
            let own = [beat.wrote, beat.tried, Some(me.routes)].contains(&Some(found));
            if !own {
                // Another process heartbeats as this node (a copied config): readers take
                // the routes of whichever wrote last for the node's and remove the other's.
                inc(&c.metrics.cluster_node_id_conflicts);
                if beat
                    .logged
                    .is_none_or(|t| t.elapsed() >= CONFLICT_LOG_EVERY)
                {
                    beat.logged = Some(Instant::now());
                    log::error!(
                        "cluster: another process is heartbeating as node {:?} (route epoch {found}, this one's {}): every node needs a node_id of its own; until one of them stops, each one's routes are taken for stale",
                        c.node,
                        me.routes
                    );
                }
                (beat.shared, beat.intact) = (true, 0);
            } else if beat.shared {
                beat.intact += 1;
                if beat.intact >= INTACT_BEATS {
                    // The other has gone: what readers removed meanwhile is written again.
                    log::warn!("cluster: this node's entry is its own again: its routes are written again and the rooms read again");
                    c.tell(FromLink::Rejoined { routes: true });
                    (beat.shared, beat.intact) = (false, 0);
                }
            }
        }
        if was.is_some() {
            beat.entered = true;
            beat.wrote = Some(me.routes);
        }
    }
    let gets: Vec<_> = ids
        .iter()
        .map(|i| {
            let mut g = cmd("GET");
            g.arg(c.keys.node(i));
            (g, true)
        })
        .collect();
    n += gets.len();
    let infos = if gets.is_empty() {
        vec![]
    } else {
        con.run(c, gets)?
    };
    let mut live = vec![];
    let mut dead = vec![];
    // An entry that could not be read or understood (a node of another version?) is not
    // known dead: route entries of absent nodes are not removed on this table.
    let mut sure = true;
    for (id, v) in ids.iter().zip(infos) {
        match redis::from_redis_value::<Option<Vec<u8>>>(v) {
            Ok(Some(b)) => match serde_json::from_slice::<NodeInfo>(&b) {
                Ok(i) if &i.node_id == id => live.push(i),
                _ => {
                    sure = false;
                    inc(&c.metrics.cluster_bad_messages);
                    log::debug!("redis: node entry {id:?} is not a node's heartbeat: skipped");
                }
            },
            Ok(None) => dead.push(id.clone()),
            Err(_) => {
                sure = false;
                inc(&c.metrics.cluster_bad_messages)
            }
        }
    }
    if !dead.is_empty() {
        // Gone for good (its entry expired): forgotten — only if its entry is still gone
        // (a node late with its heartbeat is not). The node whose SREM removes it (one,
        // whatever the number of nodes that saw it go) adopts its durable records.
        const FORGET: &str = "if redis.call('EXISTS', KEYS[2]) == 0 then \
                              return redis.call('SREM', KEYS[1], ARGV[1]) end return 0";
        // One at a time: a node not reached stays in the set for the next heartbeat.
        for d in &dead {
            let mut e = cmd("EVAL");
            e.arg(FORGET)
                .arg(2)
                .arg(c.keys.nodes())
                .arg(c.keys.node(d))
                .arg(d);
            let removed = con.run(c, vec![(e, true)])?;
            n += 1;
            let won = removed
                .into_iter()
                .next()
                .map(redis::from_redis_value::<i64>);
            if won == Some(Ok(1)) {
                if let Err(e) = adopt(c, con, d) {
                    // Left claimed (`:by:` this node, listed in its claims): resumed at this
                    // node's next start.
                    log::warn!("cluster: adopting {d}'s pushes failed: {e}");
                    if lost(&e) {
                        return Err(e);
                    }
                }
            }
        }
    }
    live.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    c.metrics.cluster_nodes.store(live.len() as u64, Relaxed);
    c.view.set_nodes(live, sure);
    record(c, n as u64, t);
    Ok(())
}

/// At start: what this node's previous run left (its own index, and adoptions it had
/// claimed and not finished) is adopted.
fn adopt_left(c: &Ctx, con: &mut Con) -> redis::RedisResult<()> {
    let mut m = cmd("SMEMBERS");
    m.arg(c.keys.durable_claims(&c.node));
    let claimed: Vec<String> = match con.run(c, vec![(m, true)])?.pop() {
        Some(v) => parsed(v)?,
        None => vec![],
    };
    for node in std::iter::once(c.node.clone()).chain(claimed) {
        adopt(c, con, &node)?;
    }
    Ok(())
}

/// Adopts dead node `node`'s durable records (or, at start, this node's own from its
/// previous run): its index is claimed (renamed, so one node does it), and its devices go to
/// the reactor (`Orphans`), which takes their records over.
fn adopt(c: &Ctx, con: &mut Con, node: &str) -> redis::RedisResult<()> {
    // Claimed: renamed to this node's name for it (merged into one an earlier, broken-off
    // attempt of this node left, which is then resumed).
    const CLAIM: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then \
                           if redis.call('EXISTS', KEYS[2]) == 1 then \
                             redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], \
                               'AGGREGATE', 'MAX') \
                             redis.call('DEL', KEYS[1]) \
                           else redis.call('RENAME', KEYS[1], KEYS[2]) end \
                           return 1 end \
                         return redis.call('EXISTS', KEYS[2])";
    let idx = c.keys.durable_index(node);
    let mine = format!("{idx}:by:{}", c.node); // same slot: `{node}`
    let mut e = cmd("EVAL");
    e.arg(CLAIM).arg(2).arg(&idx).arg(&mine);
    let got = con.run(c, vec![(e, true)])?;
    if got.into_iter().next().map(redis::from_redis_value::<i64>) != Some(Ok(1)) {
        return Ok(());
    }
    log::info!("cluster: adopting the unacknowledged pushes of {node}");
    // Listed until done, so that a start of this node resumes it if it is cut short.
    let claims = c.keys.durable_claims(&c.node);
    let mut sadd = cmd("SADD");
    sadd.arg(&claims).arg(node);
    con.run(c, vec![(sadd, false)])?;
    loop {
        // Read, told, then removed (not popped: a pop whose reply were lost, or run again
        // by the crate's retry, would lose its devices).
        let mut page = cmd("ZRANGE");
        page.arg(&mine).arg(0).arg(999);
        let v = con.run(c, vec![(page, true)])?.pop();
        let members: Vec<String> = answer(v, "an adopted index could not be read")?;
        if members.is_empty() {
            let mut srem = cmd("SREM");
            srem.arg(&claims).arg(node);
            con.run(c, vec![(srem, false)])?;
            return Ok(());
        }
        let devices = members
            .iter()
            .filter_map(|m| super::durable::parse_index_member(m))
            .map(|(a, d)| (a.to_string(), d.to_string()))
            .collect();
        c.tell(FromLink::Orphans {
            node: node.to_string(),
            devices,
        });
        let mut rem = cmd("ZREM");
        rem.arg(&mine).arg(&members);
        // (Refused, the same page would be read and told again and again: stop here;
        // the claim is resumed at this node's next start.)
        let removed = con.run(c, vec![(rem, true)])?.pop();
        answer::<i64>(removed, "an adopted index page could not be removed")?;
    }
}

/// The subscriber connection: this node's channel, messages checked and handed to the
/// reactor; bad ones counted and skipped. On a Redis Cluster the channel is a sharded one
/// (SSUBSCRIBE on the master that owns its slot; when the slot moves, Redis unsubscribes us
/// and we subscribe again where it went).
fn subscriber(c: Ctx) {
    let mut backoff = Backoff::new(seed(&c.node).rotate_left(17));
    let channel = c.keys.channel(&c.node);
    let mut heard = false;
    loop {
        let r = match cluster_seeds(&c.url) {
            None => listen(&c, &channel, &mut backoff, &mut heard),
            Some(seeds) => listen_sharded(&c, &channel, &seeds, &mut backoff, &mut heard),
        };
        c.view.set_hearing(false);
        if let Err(e) = r {
            inc(&c.metrics.redis_errors);
            log::debug!("redis: subscriber: {e}; subscribing again");
        }
        backoff.wait();
    }
}

/// Subscribed (again): a node that heard before may have missed messages meanwhile.
fn hearing(c: &Ctx, heard: &mut bool) {
    c.view.set_hearing(true);
    if std::mem::replace(heard, true) {
        c.tell(FromLink::Rejoined { routes: false });
    }
}

fn listen(
    c: &Ctx,
    channel: &str,
    backoff: &mut Backoff,
    heard: &mut bool,
) -> redis::RedisResult<()> {
    let mut con = c.connect_one(&c.url)?;
    let mut ps = con.as_pubsub();
    ps.subscribe(channel)?;
    ps.set_read_timeout(Some(Duration::from_secs(1)))?;
    backoff.reset();
    hearing(c, heard);
    loop {
        match ps.get_message() {
            Ok(msg) => hand(c, channel, msg.get_payload_bytes()),
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(e),
        }
    }
}

fn listen_sharded(
    c: &Ctx,
    channel: &str,
    seeds: &[String],
    backoff: &mut Backoff,
    heard: &mut bool,
) -> redis::RedisResult<()> {
    let owner = slot_owner(c, channel, seeds)?;
    let mut con = c.connect_one(&format!("redis://{owner}"))?;
    let mut sub = cmd("SSUBSCRIBE");
    sub.arg(channel);
    con.send_packed_command(&sub.get_packed_command())?;
    // No read timeout here: the crate counts each timed-out read as a reply still owed and
    // drops the next non-push value it reads — which, in RESP2, is the next smessage. A
    // dead server still ends the read (EOF or reset).
    con.set_read_timeout(None)?;
    loop {
        let v = con.recv_response()?;
        let parts = match v {
            redis::Value::Array(p) => p,
            redis::Value::Push { data, .. } => data,
            other => {
                // An error reply (e.g. MOVED: the slot moved before we subscribed).
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "unexpected reply to SSUBSCRIBE",
                    format!("{other:?}"),
                )));
            }
        };
        let kind = match parts.first() {
            Some(redis::Value::BulkString(k)) => k.as_slice(),
            _ => b"",
        };
        match kind {
            b"ssubscribe" => {
                backoff.reset();
                hearing(c, heard);
            }
            b"smessage" => match parts.get(2) {
                Some(redis::Value::BulkString(b)) => hand(c, channel, b),
                _ => inc(&c.metrics.cluster_bad_messages),
            },
            // `sunsubscribe`: the slot moved (or the node is failing over): again, there.
            _ => return Ok(()),
        }
    }
}

/// `host:port` of the master that owns `channel`'s slot, asked of the first seed that answers.
fn slot_owner(c: &Ctx, channel: &str, seeds: &[String]) -> redis::RedisResult<String> {
    let mut last = None;
    for seed in seeds {
        let mut con = match c.connect_one(seed) {
            Ok(con) => con,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let slot: i64 = cmd("CLUSTER").arg("KEYSLOT").arg(channel).query(&mut con)?;
        let ranges: Vec<redis::Value> = cmd("CLUSTER").arg("SLOTS").query(&mut con)?;
        for r in ranges {
            let redis::Value::Array(r) = r else { continue };
            let int = |v: Option<&redis::Value>| match v {
                Some(redis::Value::Int(i)) => *i,
                _ => -1,
            };
            let (lo, hi) = (int(r.first()), int(r.get(1)));
            if !(lo..=hi).contains(&slot) {
                continue;
            }
            if let Some(redis::Value::Array(m)) = r.get(2) {
                let host = match m.first() {
                    Some(redis::Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                    _ => continue,
                };
                let port = int(m.get(1));
                let host = if host.is_empty() {
                    // An empty host means "the address you reached me at".
                    seed.trim_start_matches("redis://")
                        .rsplit_once(':')
                        .map_or(host, |h| h.0.to_string())
                } else {
                    host
                };
                return Ok(format!("{host}:{port}"));
            }
        }
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "no master owns the slot of this node's channel",
        )));
    }
    Err(last.unwrap_or_else(|| {
        redis::RedisError::from((redis::ErrorKind::Client, "no cluster seed answered"))
    }))
}

/// A message off this node's channel: checked, then to the reactor.
fn hand(c: &Ctx, channel: &str, b: &[u8]) {
    match decode(b) {
        Ok(m) => {
            let lag = crate::types::unix_ms().saturating_sub(m.sent_ms);
            c.metrics.pubsub_lag_ms.store(lag, Relaxed);
            inc(&c.metrics.cluster_messages_in);
            c.tell(FromLink::Msg(m));
        }
        Err(e) => {
            inc(&c.metrics.cluster_bad_messages);
            log::debug!("redis: a message on {channel}: {e}: skipped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::key_slot;

    #[test]
    fn key_slots_are_redis_cluster_s() {
        // CRC16/XMODEM of "123456789" is 0x31C3 (Redis Cluster spec, appendix A).
        assert_eq!(key_slot("123456789"), 0x31C3);
        // A hash tag's content alone counts; an empty tag does not count as one.
        assert_eq!(key_slot("ll:{nodes}"), key_slot("nodes"));
        assert_eq!(key_slot("ll:{nodes}:n1"), key_slot("ll:{nodes}"));
        assert_eq!(key_slot("a{}b"), key_slot("a{}b"));
        assert_ne!(key_slot("a{}b"), key_slot(""));
    }
}
