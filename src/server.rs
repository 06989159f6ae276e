//! Startup: raise the file limit, route SIGTERM/SIGINT to a signalfd the reactor polls, bind
//! every listener, start the workers, print the `listening` line, run the reactor.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mio::{Poll, Waker};
use serde_json::json;

use crate::cluster::link::Link;
use crate::cluster::View;
use crate::config::Config;
use crate::metrics::{Metrics, Transport};
use crate::net::Listener;
use crate::reactor::{Ended, Reactor, Role, WAKER};
use crate::upgrade::Channel;
use crate::worker::{Pool, Wake};

/// Open files kept back from client connections: for the internal API's connections, the
/// listeners, epoll and friends, and the backend lanes' sockets — so that clients using up
/// `max_connections` never leave the API (or an auth call) without a descriptor.
pub fn fd_reserve(cfg: &Config) -> usize {
    128 + crate::backend::max_sockets(cfg)
}

/// Runs the gateway. `upgrade`: this process was started by a live upgrade and takes the
/// old one's listeners and connections over that channel.
pub fn serve(mut cfg: Config, upgrade: Option<Channel>) -> Result<(), String> {
    api_exposure(&cfg).map_err(|e| match &upgrade {
        Some(ch) => refuse(ch, &e),
        None => e,
    })?;
    // Before any thread starts, so every thread inherits the mask and only the signalfd sees
    // the signals.
    let signal = signal_fd().map_err(|e| format!("signalfd: {e}"))?;
    let nofile = raise_nofile();
    let reserve = fd_reserve(&cfg);
    let room = (nofile as usize).saturating_sub(reserve).max(1);
    let max = cfg.limits.max_connections;
    if nofile == 0 {
        // The limit could not be read: a configured value stands, else a generous one.
        if max == 0 {
            cfg.limits.max_connections = 1_000_000;
        }
    } else if max == 0 {
        cfg.limits.max_connections = room;
    } else if max > room {
        log::warn!(
            "max_connections {max} is more than the open-files limit ({nofile}) leaves after its reserve of {reserve}: using {room}"
        );
        cfg.limits.max_connections = room;
    }
    if cfg.dev_mode {
        log::warn!(
            "no config file: dev mode, app \"{}\" admits any token",
            crate::config::DEV_APP
        );
    }
    for w in cfg.warnings() {
        log::warn!("config: {w}");
    }
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(Metrics::new(&cfg));
    let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let waker = Waker::new(poll.registry(), WAKER).map_err(|e| format!("waker: {e}"))?;
    let wake = Arc::new(Wake {
        waker,
        pending: AtomicBool::new(false),
    });

    // Bound here, or (a live upgrade) handed over by the old process: not yet, see below.
    let (mut listeners, mut bound) = (vec![], serde_json::Map::new());
    if upgrade.is_none() {
        (listeners, bound) = listen(&cfg, vec![])?;
    }
    let view = Arc::new(View::new(&cfg.node_id, cfg.cluster.enabled()));
    view.set_routes_epoch(crate::cluster::first_routes_epoch(crate::types::unix_ms()));
    let (tcp, ws) = advertised(&cfg, &bound);
    view.set_me(tcp, ws);
    let pool = Pool::start(cfg.clone(), metrics.clone(), wake.clone(), view.clone());
    if cfg.cluster.enabled() {
        metrics
            .cluster_enabled
            .store(1, std::sync::atomic::Ordering::Relaxed);
    }
    let link = cfg.cluster.enabled().then(|| {
        let w = wake.clone();
        let (v, m, c) = (view.clone(), metrics.clone(), cfg.clone());
        let info = Arc::new(move || {
            let mut me = v.me();
            me.connections = m.client_connections();
            me.load = me.connections as f64 / c.limits.max_connections.max(1) as f64;
            me
        });
        Link::start(
            &cfg,
            view.clone(),
            metrics.clone(),
            Arc::new(move || w.wake()),
            info,
            upgrade.is_none(),
        )
    });
    // A live upgrade's new process holds its reports until the old one has gone.
    let backends = Arc::new(crate::backend::Backends::start(
        &cfg,
        &metrics,
        upgrade.is_some(),
    ));
    watch_memory(metrics.clone());
    // Everything that takes time is up: from here to `TAKEN` the old process is quiet.
    let mut handed = None;
    // When the state was asked for, came in, was decoded (for the log).
    let mut times = None;
    if let Some(ch) = &upgrade {
        // The old process's socket files stay its own until it lets go (`GO`).
        crate::net::own_socket_files(false);
        // Cluster mode: this process hears the node's channel before the old one stops
        // (the old one's marker on it splits the messages between them).
        if cfg.cluster.enabled() {
            let t = std::time::Instant::now();
            while !view.hearing() {
                if t.elapsed() > std::time::Duration::from_secs(5) {
                    let why = "upgrade: not subscribed to the node's channel within 5 s";
                    return Err(refuse(ch, why));
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        let t0 = std::time::Instant::now();
        let got = ch
            .receive_state()
            .map_err(|e| e.to_string())
            .and_then(|(fds, blob)| {
                let t1 = std::time::Instant::now();
                let s = crate::reactor::Saved::decode(&blob)?;
                times = Some((t0, t1, std::time::Instant::now()));
                Ok((s, fds))
            });
        let (saved, fds) = match got {
            Ok(s) => s,
            Err(e) => return Err(refuse(ch, &format!("upgrade: {e}"))),
        };
        if let Some(e) = saved.routes_epoch() {
            view.set_routes_epoch(e); // the node's routes stay valid
        }

        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let old = crate::reactor::handed_listeners(&saved, &mut fds)
            .map_err(|e| refuse(ch, &format!("upgrade: {e}")))?;
        (listeners, bound) = listen(&cfg, old).map_err(|e| refuse(ch, &e))?;
        // What clients dial for this node: the handed listeners' addresses.
        let (tcp, ws) = advertised(&cfg, &bound);
        view.set_me(tcp, ws);
        handed = Some((saved, fds));
    }
    let mut reactor = Reactor::new(
        poll,
        cfg.clone(),
        metrics.clone(),
        listeners,
        pool.jobs.clone(),
        pool.done.clone(),
        wake,
        Some(signal),
        backends.clone(),
        pool.done_tx.clone(),
        link,
        view.clone(),
    )
    .map_err(|e| format!("reactor: {e}"))?;
    let (mut from, mut taken) = (None, 0);
    if let (Some(ch), Some((saved, fds))) = (&upgrade, handed) {
        from = Some(saved.pid());
        let n = saved.connections();
        taken = n;
        reactor
            .restore(saved, fds)
            .map_err(|e| refuse(ch, &format!("upgrade: {e}")))?;
        if let Some((t0, t1, t2)) = times {
            let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
            log::info!(
                "upgrade: state in {:.1} ms after ready, decoded in {:.1} ms, restored in {:.1} ms",
                ms(t0, t1),
                ms(t1, t2),
                ms(t2, std::time::Instant::now())
            );
        }
        metrics
            .upgrade_taken
            .store(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    let mut line = json!({"event": "listening", "node_id": cfg.node_id, "pid": std::process::id()});
    line.as_object_mut().unwrap().extend(bound);
    if let Some(pid) = from {
        line["upgraded_from"] = pid.into();
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    drop(out);
    // systemd hears of the new main process before the old one exits (it reads notices
    // before it handles a child's exit).
    crate::upgrade::notify_systemd();
    if let Some(ch) = &upgrade {
        // Taken; no socket is touched before the old process says go (or is gone: then the
        // connections are this one's either way). Giving up, it stops this process first.
        let (mut data, mut fds) = (vec![], vec![]);
        let go = ch
            .send(crate::upgrade::TAKEN, &[], &[])
            .and_then(|_| ch.recv(&mut data, &mut fds));
        match go {
            Ok(Some(crate::upgrade::GO)) => {}
            Ok(None) => log::warn!("upgrade: the old process went away before it said go"),
            Ok(Some(k)) => log::warn!("upgrade: unexpected packet {k} from the old process"),
            Err(e) => log::warn!("upgrade: waiting for the old process: {e}"),
        }
        crate::net::own_socket_files(true);
        release_reports_after(ch, backends.clone());
        log::info!(
            "upgrade: took over from pid {} ({} connections)",
            from.unwrap_or(0),
            taken
        );
    }
    log::info!(
        "longlink {} node {} up: {} workers, open files limit {nofile}, max_connections {}",
        env!("CARGO_PKG_VERSION"),
        cfg.node_id,
        pool.threads(),
        cfg.limits.max_connections
    );

    let r = reactor.run().map_err(|e| format!("reactor: {e}"));
    let mut channel = None;
    if r == Ok(Ended::HandedOver) {
        log::info!("upgrade: handed over; closing this process's copies");
        // Open until the report under way is posted: the new process posts after it.
        channel = reactor.keep_upgrade_channel();
    }
    // Handed over, this only closes descriptors (no shutdown, no BYE or close frame): the
    // new process holds the connections. Queued events (the offline events of connections
    // just closed, at a shutdown) then get a moment to go.
    drop(reactor);
    let posted = backends.finish(std::time::Duration::from_secs(3));
    if let Some(ch) = channel {
        // This process may itself be a new one whose old one has not gone: the next
        // process must not post before that one's last report either.
        backends.wait_released(RELEASE_WAIT);
        if posted {
            drop(ch);
        } else {
            // A post still under way: the channel closes at exit, after it.
            std::mem::forget(ch);
        }
    }
    r.map(|_| ())
}

/// The longest a new process holds its reports for the old one: more than the old one
/// takes at worst after go (2 s for the cluster link, 3 s for its last report).
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The new process of a live upgrade: its reports (events, pushes given up) wait until the
/// old process has posted the one it was on and closed the channel at its exit (or
/// `RELEASE_WAIT`, should it hang), so that a backend sees them in order, not interleaved.
fn release_reports_after(ch: &Channel, backends: Arc<crate::backend::Backends>) {
    if !backends.reports_any() {
        return;
    }
    let ch = match ch.try_clone() {
        Ok(c) => c,
        Err(e) => {
            log::warn!("upgrade: reports posted at once ({e})");
            backends.release();
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("ll-upgrade-reports".into())
        .spawn({
            let backends = backends.clone();
            move || {
                let _ = ch.set_nonblocking(false);
                let _ = ch.set_timeout(RELEASE_WAIT);
                let _ = ch.recv(&mut vec![], &mut vec![]);
                backends.release();
            }
        });
    if spawned.is_err() {
        backends.release();
    }
}

/// Binds the configured listeners, taking over `old` ones (a live upgrade) where the
/// address is unchanged (or the configured port is 0: "any", as the old one was given).
/// An old listener the config no longer has is closed. Returns the listeners and the
/// `listening` line's addresses.
#[allow(clippy::type_complexity)]
/// `old`: listeners handed over by a live upgrade, each with whether it was TLS (kept where
/// the config still names its address; a TLS one takes the config's certificates, re-read).
fn listen(
    cfg: &Config,
    old: Vec<(Listener, Role, bool)>,
) -> Result<
    (
        Vec<(Listener, Role)>,
        serde_json::Map<String, serde_json::Value>,
    ),
    String,
> {
    let mut old: Vec<Option<(Listener, Role, bool)>> = old.into_iter().map(Some).collect();
    let mut listeners = vec![];
    let mut bound = serde_json::Map::new();
    let specs = [
        ("tcp", &cfg.listen.tcp, Role::Client(Transport::Tcp), false),
        ("http", &cfg.listen.http, Role::Http, false),
        ("api", &cfg.listen.api, Role::Api, false),
        (
            "tcp_tls",
            &cfg.listen.tcp_tls,
            Role::Client(Transport::Tcp),
            true,
        ),
        ("https", &cfg.listen.https, Role::Http, true),
    ];
    for (name, addr, role, tls) in specs {
        if tls && addr.is_none() {
            continue; // TLS listeners are named in the listening line only when on
        }
        let Some(addr) = addr else {
            bound.insert(name.into(), serde_json::Value::Null); // disabled ("")
            continue;
        };
        let same = |l: &Listener| match addr {
            crate::config::ListenAddr::Tcp(a) => {
                l.unix_file().is_none() && (a.port() == 0 || l.local() == a.to_string())
            }
            crate::config::ListenAddr::Unix(p) => l.unix_file().is_some_and(|(q, _)| &q == p),
        };
        let kept = old
            .iter_mut()
            .find(|o| {
                o.as_ref()
                    .is_some_and(|(l, r, t)| *r == role && *t == tls && same(l))
            })
            .and_then(Option::take);
        let mut l = match kept {
            Some((l, _, _)) => l,
            None => {
                // Several nodes on one host may share the client ports (the kernel spreads
                // new connections); the API port stays each node's own.
                let share = cfg.listen.reuse_port && role != Role::Api;
                Listener::bind(addr, share)
                    .map_err(|e| format!("cannot listen on {addr} ({name}): {e}"))?
            }
        };
        if tls {
            let server = cfg.tls.server.clone().ok_or("TLS listener without [tls]")?;
            if !l.set_tls(server) {
                return Err(format!("{name}: TLS listens on TCP only, not {addr}"));
            }
        }
        let local = l.local();
        log::info!("{name} listening on {local}");
        bound.insert(name.into(), local.into());
        listeners.push((l, role));
    }
    for (l, role, _) in old.into_iter().flatten() {
        log::info!(
            "upgrade: {role:?} listener {} closed (not in the config)",
            l.local()
        );
    }
    Ok((listeners, bound))
}

/// The internal API pushes to every client and kicks them: bound where others can reach it
/// (not loopback, not a unix socket) it must have a token, unless the config says the
/// network in front of it is trusted (`[api] allow_open = true`).
pub fn api_exposure(cfg: &Config) -> Result<(), String> {
    let Some(crate::config::ListenAddr::Tcp(a)) = &cfg.listen.api else {
        return Ok(());
    };
    if a.ip().is_loopback() || !cfg.api.token.is_empty() || cfg.api.allow_open {
        return Ok(());
    }
    Err(format!(
        "the internal API would listen on {a}, off loopback, with no [api] token: set one (or, on a trusted network, [api] allow_open = true)"
    ))
}

/// Tells the old process why the upgrade is refused; returns the reason.
fn refuse(ch: &Channel, why: &str) -> String {
    let _ = ch.send(crate::upgrade::REFUSED, why.as_bytes(), &[]);
    why.to_string()
}

/// What clients should dial for this node: the configured `advertise_*`, else the bound
/// client listeners (a wildcard bind advertises 127.0.0.1 — set `advertise_*` for others).
fn advertised(
    cfg: &Config,
    bound: &serde_json::Map<String, serde_json::Value>,
) -> (String, String) {
    let at = |k: &str| {
        bound
            .get(k)
            .and_then(|v| v.as_str())
            .filter(|a| !a.starts_with("unix:"))
            .map(|a| {
                a.replace("0.0.0.0:", "127.0.0.1:")
                    .replace("[::]:", "[::1]:")
            })
    };
    let tcp = match &cfg.cluster.advertise_tcp {
        a if !a.is_empty() => a.clone(),
        _ => at("tcp").unwrap_or_default(),
    };
    let ws = match &cfg.cluster.advertise_ws {
        a if !a.is_empty() => a.clone(),
        _ => at("http").map_or(String::new(), |a| format!("ws://{a}/ws")),
    };
    (tcp, ws)
}

/// Gives free heap memory back to the system once the process, having changed since the
/// last time, holds still: a hostile or bursty minute leaves free chunks between live ones,
/// which glibc returns only on `malloc_trim`. The reactor also trims after mass closes; this
/// catches what trickles (abusers coming and going a few at a time). Waiting for calm trims
/// once per burst, after it, not over and over during it. Off the reactor: a trim of a
/// large heap takes milliseconds.
fn watch_memory(metrics: Arc<Metrics>) {
    let _ = std::thread::Builder::new()
        .name("ll-memory".into())
        .spawn(move || {
            let mut policy = TrimPolicy::default();
            loop {
                std::thread::sleep(std::time::Duration::from_secs(2));
                let look = MemoryLook::now();
                if policy.look(look) {
                    // SAFETY: malloc_trim only releases free memory; any thread may call it.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                    metrics
                        .memory_trims
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    policy.trimmed(MemoryLook::now());
                }
            }
        });
}

/// What the memory watcher reads every look.
#[derive(Clone, Copy, Debug)]
struct MemoryLook {
    /// Resident set size.
    rss: u64,
    /// Resident anonymous memory (the heap, stacks, mmapped chunks).
    anon: u64,
    /// Heap bytes allocated and in use.
    in_use: u64,
}

impl MemoryLook {
    fn now() -> MemoryLook {
        let (rss, anon) = crate::metrics::rss_and_anon_bytes();
        MemoryLook {
            rss,
            anon,
            in_use: crate::metrics::heap_bytes().0,
        }
    }

    /// Resident memory that nothing live holds: mostly freed heap pages still mapped. Neither
    /// RSS nor the allocator's free bytes show it: after a trim, churn that reuses the
    /// released chunks faults their pages in again without moving either (the free bytes
    /// count released and resident free memory alike), so a process can sit megabytes
    /// above what a trim would leave with nothing changed by those measures.
    fn slack(&self) -> u64 {
        self.anon.saturating_sub(self.in_use)
    }
}

/// When the memory watcher trims: once the process is calm (RSS held still since the last
/// look) and its slack has grown by a step over the lowest it has been since the watcher's
/// own last trim (a trim by the reactor lowers it too). A live set that grows raises RSS
/// and use together and triggers nothing; a trim that cannot get lower (fragments, a
/// thread arena's top) sets the new low, so it is not tried again and again.
#[derive(Debug, Default)]
struct TrimPolicy {
    prev_rss: u64,
    /// The lowest slack since the last trim of ours, None before the first look.
    low: Option<u64>,
}

impl TrimPolicy {
    /// One look; true when now is the time to trim.
    fn look(&mut self, m: MemoryLook) -> bool {
        let calm = m.rss.abs_diff(self.prev_rss) < (64 << 10).max(m.rss / 64);
        self.prev_rss = m.rss;
        let slack = m.slack();
        let low = self.low.map_or(slack, |l| l.min(slack));
        self.low = Some(low);
        // A step of an eighth of what is in use, within 512 KiB..4 MiB: a large heap's churn
        // refaults released pages all the time, and each trim holds the allocator's locks;
        // the cap keeps what trickles back under a tenth of a large process's RSS.
        let step = (m.in_use / 8).clamp(512 << 10, 4 << 20);
        calm && slack > low + step
    }

    /// Just after a trim.
    fn trimmed(&mut self, m: MemoryLook) {
        self.prev_rss = m.rss;
        self.low = Some(m.slack());
    }
}

/// Blocks SIGTERM, SIGINT (shut down), SIGUSR1 (drain) and SIGHUP (the live upgrade) and
/// returns a nonblocking signalfd for them.
fn signal_fd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain libc calls on a local sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Raises the soft open-files limit to the hard one; returns the limit in force.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::{MemoryLook, TrimPolicy};

    const MB: u64 = 1 << 20;

    fn look(rss: u64, anon: u64, in_use: u64) -> MemoryLook {
        MemoryLook { rss, anon, in_use }
    }

    #[test]
    fn the_watcher_trims_slack_regained_after_a_trim_once_calm() {
        let mut p = TrimPolicy::default();
        assert!(!p.look(look(20 * MB, 4 * MB, 2 * MB)));
        assert!(!p.look(look(20 * MB, 4 * MB, 2 * MB)));
        // A burst: RSS jumps, nothing happens while it moves.
        assert!(!p.look(look(26 * MB, 10 * MB, 5 * MB)));
        // Over, and calm: its frees are slack.
        assert!(p.look(look(26 * MB, 10 * MB, 2 * MB)));
        p.trimmed(look(21 * MB, 5 * MB, 2 * MB));
        assert!(!p.look(look(21 * MB, 5 * MB, 2 * MB)));
        // Churn faults released pages in again without moving RSS by much: still slack, and
        // the trim comes without RSS or the free bytes having moved by a step.
        assert!(!p.look(look(21 * MB + 300_000, 5 * MB + 300_000, 2 * MB)));
        assert!(p.look(look(21 * MB + 600_000, 5 * MB + 600_000, 2 * MB)));
    }

    #[test]
    fn the_watcher_leaves_a_growing_live_set_and_unreleasable_fragments_alone() {
        let mut p = TrimPolicy::default();
        assert!(!p.look(look(20 * MB, 4 * MB, 2 * MB)));
        // Growth of what is live raises use with RSS: nothing to trim, however calm.
        for i in 1..=10 {
            assert!(!p.look(look(20 * MB + i * MB, 4 * MB + i * MB, 2 * MB + i * MB)));
            assert!(!p.look(look(20 * MB + i * MB, 4 * MB + i * MB, 2 * MB + i * MB)));
        }
        // A trim that could not get back down sets the low: not tried again every look.
        p.trimmed(look(31 * MB, 15 * MB, 11 * MB));
        for _ in 0..5 {
            assert!(!p.look(look(31 * MB, 15 * MB, 11 * MB)));
        }
        // The step grows with the heap: an eighth of what is in use (1.3 MB here), so a
        // calm megabyte of slack is not enough, one and a half is.
        assert!(!p.look(look(
            31 * MB + 300_000,
            15 * MB + 300_000,
            11 * MB - 700_000
        )));
        assert!(p.look(look(
            31 * MB + 300_000,
            15 * MB + 300_000,
            11 * MB - 1_200_000
        )));
        // Capped at 4 MiB: on a heap of 100 MB, 5 MB of slack regained is trimmed.
        let mut p = TrimPolicy::default();
        assert!(!p.look(look(150 * MB, 120 * MB, 100 * MB)));
        assert!(!p.look(look(150 * MB, 120 * MB, 96 * MB)));
        assert!(p.look(look(150 * MB, 120 * MB, 95 * MB)));
    }

    #[test]
    fn a_trim_by_the_reactor_lowers_the_mark_the_watcher_judges_from() {
        let mut p = TrimPolicy::default();
        assert!(!p.look(look(24 * MB, 8 * MB, 2 * MB)));
        // The reactor trimmed (after a mass close): the slack is lower now.
        assert!(!p.look(look(20 * MB, 4 * MB, 2 * MB)));
        assert!(!p.look(look(20 * MB, 4 * MB, 2 * MB)));
        assert!(!p.look(look(20 * MB + 300_000, 4 * MB + 300_000, 2 * MB)));
        assert!(p.look(look(20 * MB + 600_000, 4 * MB + 600_000, 2 * MB)));
    }
}
