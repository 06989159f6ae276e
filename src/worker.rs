//! The worker pool: slow or blocking work off the reactor (docs/ARCHITECTURE.md). Jobs arrive over a
//! bounded channel (the reactor `try_send`s and answers "busy" when it is full, never waits);
//! results go back over a second channel, followed by a wake of the reactor's `mio::Waker`.
//! Wakes are coalesced: a worker wakes the reactor only if no wake is already pending.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

use crate::api::{Api, ApiOut, ApiRequest, Command, Target};
use crate::backend::UpReply;
use crate::cluster::View;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proto::{code, Frame, NodeRequest};
use crate::types::{Admit, Creds, CredsRef, Ref};

pub enum Job {
    /// Admit a connecting client; `seqid` is echoed in the answer (TCP HELLO).
    /// `upgrade` travels with a WebSocket handshake and comes back with the answer.
    Auth {
        conn: Ref,
        seqid: u64,
        creds: Creds,
        remote: String,
        upgrade: Option<crate::ws::Upgrade>,
    },
    Api {
        conn: Ref,
        req: ApiRequest,
    },
    /// A TLS handshake step: what rustls was fed, processed here (key exchange, signature),
    /// so that a burst of handshakes costs the reactor no crypto.
    TlsStep {
        conn: Ref,
        tls: Box<crate::net::Shake>,
    },
}

pub enum Done {
    /// An upstream frame's answer from its service lane (`frame` is the one sent).
    Upstream {
        conn: Ref,
        frame: Frame,
        result: Result<UpReply, (u16, String)>,
    },
    Auth {
        conn: Ref,
        seqid: u64,
        upgrade: Option<crate::ws::Upgrade>,
        result: Result<Admit, (u16, String)>,
    },
    Api {
        conn: Ref,
        keep_alive: bool,
        out: ApiOut,
        /// Cluster mode: the request itself, for the other nodes' parts of a command.
        fwd: Option<crate::cluster::Forward>,
    },
    /// The TLS state back, stepped; Err: the handshake failed (rustls's alert is queued).
    TlsStep {
        conn: Ref,
        tls: Box<crate::net::Shake>,
        result: Result<(), String>,
    },
}

/// The reactor's side of the wake handshake.
pub struct Wake {
    pub waker: Waker,
    pub pending: AtomicBool,
}

impl Wake {
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }

    /// Called by the reactor before draining results.
    pub fn clear(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

pub struct Pool {
    pub jobs: Sender<Job>,
    pub done: Receiver<Done>,
    /// For backend lanes, which answer the reactor on the same channel.
    pub done_tx: Sender<Done>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn start(
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
        wake: Arc<Wake>,
        view: Arc<View>,
    ) -> Pool {
        let (jobs, job_rx) = crossbeam_channel::bounded::<Job>(cfg.runtime.worker_queue);
        // Unbounded is safe: every result answers one job, and jobs are bounded.
        let (done_tx, done) = crossbeam_channel::unbounded::<Done>();
        let api = Arc::new(Api::new(cfg.clone(), metrics.clone(), view));
        let handles = (0..cfg.worker_threads())
            .map(|i| {
                let rx = job_rx.clone();
                let tx = done_tx.clone();
                let wake = wake.clone();
                let api = api.clone();
                let cfg = cfg.clone();
                std::thread::Builder::new()
                    .name(format!("longlink-worker-{i}"))
                    .spawn(move || run(rx, tx, wake, api, cfg))
                    .expect("spawn worker")
            })
            .collect();
        Pool {
            jobs,
            done,
            done_tx,
            handles,
        }
    }

    pub fn threads(&self) -> usize {
        self.handles.len()
    }
}

fn run(rx: Receiver<Job>, tx: Sender<Done>, wake: Arc<Wake>, api: Arc<Api>, cfg: Arc<Config>) {
    while let Ok(job) = rx.recv() {
        let started = std::time::Instant::now();
        let done = match job {
            Job::Auth {
                conn,
                seqid,
                creds,
                remote,
                upgrade,
            } => Done::Auth {
                conn,
                seqid,
                upgrade,
                result: auth(&cfg, &creds.view(), &remote),
            },
            Job::TlsStep { conn, mut tls } => {
                let result = tls.step();
                Done::TlsStep { conn, tls, result }
            }
            Job::Api { conn, req } => {
                let keep_alive = req.keep_alive;
                let out = api.handle(&req, rx.len());
                let fwd = (cfg.cluster.enabled() && matches!(out, ApiOut::Command(_))).then(|| {
                    let fwd = NodeRequest {
                        method: req.method,
                        target: req.target,
                        authorization: req.authorization.unwrap_or_default(),
                        content_type: req.content_type.unwrap_or_default(),
                        body: req.body.into(),
                        order: 0, // drawn by the reactor for a push
                        items: vec![],
                    };
                    match &out {
                        // A batch's items for conn ids go to their nodes only.
                        ApiOut::Command(Command::Push {
                            pushes,
                            batch: true,
                            ..
                        }) => {
                            let owners: Vec<Option<&str>> = pushes
                                .iter()
                                .map(|p| match &p.target {
                                    Target::Conn(id) => Some(id.node.as_str()),
                                    _ => None,
                                })
                                .collect();
                            crate::cluster::split_batch(fwd, &owners, &cfg.node_id)
                        }
                        _ => crate::cluster::Forward {
                            all: Some(fwd),
                            named: vec![],
                        },
                    }
                });
                Done::Api {
                    conn,
                    keep_alive,
                    out,
                    fwd,
                }
            }
        };
        api.metrics.worker_job.observe(started.elapsed());
        if tx.send(done).is_err() {
            return;
        }
        wake.wake();
    }
}

/// Static-token auth (apps with an auth callback are checked on their backend lane). Cheap
/// enough for the reactor, which runs it itself (`reactor::upstream::start_auth`); the
/// workers keep it for requests that come as jobs.
///
/// `remote` (the peer, for the log of a refusal) is shown only if one is logged: on the
/// reactor it is a getpeername, not paid on every connection.
pub fn auth(
    cfg: &Config,
    c: &CredsRef<'_>,
    remote: &dyn std::fmt::Display,
) -> Result<Admit, (u16, String)> {
    let Some(app) = cfg.app_index(c.app_id) else {
        return Err((code::UNKNOWN_APP, format!("unknown app {:?}", c.app_id)));
    };
    c.check()?;
    let a = &cfg.apps[app];
    if let Some(j) = &a.jwt {
        return jwt_admit(j, app, c).map_err(|e| {
            log::debug!("auth rejected from {remote}: {e}");
            (code::UNAUTHORIZED, e)
        });
    }
    // Every listed token is compared, in constant time each (no early exit on a match).
    let known = a.tokens.iter().fold(false, |hit, t| {
        use subtle::ConstantTimeEq;
        hit | bool::from(t.as_bytes().ct_eq(c.token.as_bytes()))
    });
    if !a.any_token && !known {
        log::debug!(
            "auth rejected from {remote}: bad token for app {}",
            c.app_id
        );
        return Err((code::UNAUTHORIZED, "bad token".into()));
    }
    Ok(Admit {
        app,
        device: c.device_id.into(),
        user: c.user_id.map(Into::into),
        session: vec![],
        dev_tag: 0,
    })
}

/// What a client is told of a refused token: the reason, not the JWT library's own text
/// (which names the parser's internals and lists the algorithms it knows).
fn jwt_refusal(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    let why = match e.kind() {
        K::ExpiredSignature => "expired",
        K::ImmatureSignature => "not valid yet (nbf)",
        K::InvalidSignature => "bad signature",
        K::InvalidAlgorithm | K::MissingAlgorithm => "an algorithm this app does not take",
        K::MissingRequiredClaim(c) => return format!("bad token: no {c} claim"),
        K::InvalidClaimFormat(c) => return format!("bad token: claim {c} malformed"),
        K::InvalidIssuer => "wrong issuer",
        K::InvalidAudience => "wrong audience",
        _ => "malformed",
    };
    format!("bad token: {why}")
}

/// A JWT app's HELLO: the token verified (signature with the app's key and algorithm only,
/// `exp` required, `nbf`, issuer and audience when configured); `sub` is the user id, the
/// `session_claim` object the session data.
fn jwt_admit(j: &crate::config::Jwt, app: usize, c: &CredsRef<'_>) -> Result<Admit, String> {
    let mut v = jsonwebtoken::Validation::new(j.alg);
    v.leeway = j.leeway_s;
    v.validate_nbf = true;
    // A configured issuer or audience must be there, not only match when it is.
    let mut required = vec!["exp"];
    if !j.issuer.is_empty() {
        v.set_issuer(&[&j.issuer]);
        required.push("iss");
    }
    if j.audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&[&j.audience]);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    let key = j.key.as_ref().ok_or("the app's JWT key is not loaded")?;
    // RFC 7515 §4.1.11: `crit` names extensions the recipient must understand, and we
    // understand none; the JWT crate reads the field but does not enforce it.
    let header = jsonwebtoken::decode_header(c.token).map_err(|e| jwt_refusal(&e))?;
    if header.crit.is_some() {
        return Err("bad token: a critical header extension (crit) is not supported".into());
    }
    let data = jsonwebtoken::decode::<serde_json::Value>(c.token, key, &v).map_err(|e| {
        log::debug!("JWT refused: {e}");
        jwt_refusal(&e)
    })?;
    let claims = data.claims;
    // The user is the signed one or none: a HELLO's own user_id is not signed.
    let user = match claims.get("sub") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
        None | Some(serde_json::Value::Null) => None,
        Some(_) => return Err("sub is not a non-empty string".into()),
    };
    if c.user_id.is_some() && c.user_id != user.as_deref() {
        return Err("user_id is not the token's sub".into());
    }
    if let Some(u) = &user {
        crate::types::check_id("user", u).map_err(|(_, m)| format!("sub: {m}"))?;
    }
    let session = match (j.session_claim.as_str(), claims.get(&j.session_claim)) {
        ("", _) | (_, None) | (_, Some(serde_json::Value::Null)) => vec![],
        (_, Some(serde_json::Value::Object(m))) => m
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_string),
                )
            })
            .collect(),
        (claim, Some(_)) => return Err(format!("claim {claim:?} is not an object")),
    };
    crate::types::check_session(&session)?;
    Ok(Admit {
        app,
        device: c.device_id.into(),
        user: user.map(Into::into),
        session,
        dev_tag: 0,
    })
}
