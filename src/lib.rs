//! longlink: a long-connection gateway.
//!
//! ```text
//!   clients (TCP) ──┐                         ┌──> worker 1 ─┐
//!   API callers ────┼──> reactor thread ──jobs┼──> worker 2 ─┼──done──> reactor (Waker)
//!   SIGTERM ────────┘    (mio Poll: every     └──> worker N ─┘
//!                         socket, timer wheel,
//!                         slab, registry)
//! ```
//!
//! The reactor owns every socket, the connection slab, the registry and the timer wheel; it
//! never blocks. Workers do the slow work (auth, API parsing and encoding) and send results
//! back with a wake. See docs/ARCHITECTURE.md and docs/LIFECYCLE.md.

pub mod api;
pub mod backend;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod deflate;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod proto;
pub mod reactor;
pub mod registry;
pub mod server;
pub mod slab;
pub mod timer;
pub mod tls13;
pub mod types;
pub mod upgrade;
pub mod worker;
pub mod ws;
