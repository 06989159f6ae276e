//! The worker pool: slow or blocking work off the reactor (DESIGN.md §1). Jobs arrive over a
//! bounded channel (the reactor `try_send`s and answers "busy" when it is full, never waits);
//! results go back over a second channel, followed by a wake of the reactor's `mio::Waker`.
//! Wakes are coalesced: a worker wakes the reactor only if no wake is already pending.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

use crate::api::{Api, ApiOut, ApiRequest};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proto::{code, Frame};

/// A connection as named in messages between threads: slab index and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ref {
    pub idx: u32,
    pub gen: u32,
}

pub enum Job {
    Hello {
        conn: Ref,
        frame: Frame,
        remote: String,
    },
    Api {
        conn: Ref,
        req: ApiRequest,
    },
}

/// What an admitted HELLO carries back to the reactor.
#[derive(Debug)]
pub struct Admit {
    pub app: usize,
    pub device: String,
    pub user: Option<String>,
}

pub enum Done {
    Hello {
        conn: Ref,
        seqid: u64,
        result: Result<Admit, (u16, String)>,
    },
    Api {
        conn: Ref,
        keep_alive: bool,
        out: ApiOut,
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
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn start(cfg: Arc<Config>, metrics: Arc<Metrics>, wake: Arc<Wake>) -> Pool {
        let (jobs, job_rx) = crossbeam_channel::bounded::<Job>(cfg.runtime.worker_queue);
        // Unbounded is safe: every result answers one job, and jobs are bounded.
        let (done_tx, done) = crossbeam_channel::unbounded::<Done>();
        let api = Arc::new(Api::new(cfg.clone(), metrics.clone()));
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
            handles,
        }
    }

    pub fn threads(&self) -> usize {
        self.handles.len()
    }
}

fn run(rx: Receiver<Job>, tx: Sender<Done>, wake: Arc<Wake>, api: Arc<Api>, cfg: Arc<Config>) {
    while let Ok(job) = rx.recv() {
        let done = match job {
            Job::Hello {
                conn,
                frame,
                remote,
            } => Done::Hello {
                conn,
                seqid: frame.seqid,
                result: hello(&cfg, &frame, &remote),
            },
            Job::Api { conn, req } => {
                let keep_alive = req.keep_alive;
                Done::Api {
                    conn,
                    keep_alive,
                    out: api.handle(&req, rx.len()),
                }
            }
        };
        if tx.send(done).is_err() {
            return;
        }
        wake.wake();
    }
}

/// Static-token auth of a HELLO (the backend auth callback comes with the backends issue).
fn hello(cfg: &Config, f: &Frame, remote: &str) -> Result<Admit, (u16, String)> {
    let app_id = f.header("app_id").unwrap_or("");
    let Some(app) = cfg.app_index(app_id) else {
        return Err((code::UNKNOWN_APP, format!("unknown app {app_id:?}")));
    };
    let device = f.header("device_id").unwrap_or("");
    if device.is_empty()
        || device.len() > crate::api::MAX_ID_BYTES
        || device.chars().any(char::is_control)
    {
        return Err((
            code::BAD_FRAME,
            "device_id must be 1-128 bytes without control characters".into(),
        ));
    }
    let user = f.header("user_id").filter(|u| !u.is_empty());
    if user.is_some_and(|u| u.len() > crate::api::MAX_ID_BYTES || u.chars().any(char::is_control)) {
        return Err((
            code::BAD_FRAME,
            "user_id must be at most 128 bytes without control characters".into(),
        ));
    }
    let a = &cfg.apps[app];
    let token = f.header("token").unwrap_or("");
    if !a.any_token && !a.tokens.iter().any(|t| t == token) {
        log::debug!("HELLO rejected from {remote}: bad token for app {app_id}");
        return Err((code::UNAUTHORIZED, "bad token".into()));
    }
    Ok(Admit {
        app,
        device: device.to_string(),
        user: user.map(str::to_string),
    })
}
