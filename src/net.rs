//! Sockets the reactor owns: TCP or unix-domain, listeners and streams, behind small enums;
//! TLS (rustls) on TCP as one more kind of stream, read and written like the others.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

use crate::config::ListenAddr;

pub enum Listener {
    /// With the TLS config its connections are wrapped in, on a TLS listener.
    Tcp(TcpListener, Option<Arc<rustls::ServerConfig>>),
    /// With the path and the (device, inode) of the socket file it created.
    Unix(UnixListener, std::path::PathBuf, (u64, u64)),
}

pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Boxed: most connections are not TLS, and rustls's state is several KiB.
    Tls(Box<TlsStream>),
}

/// Plaintext taken from a connection's output at a time (one full record): what rustls may
/// hold beyond the reactor's own output accounting, and what our records seal per write.
const TLS_BUFFER: usize = 16 * 1024;

/// Handshake bytes read ahead of rustls, at most: two of the largest records.
const STAGE_MAX: usize = 2 * crate::tls13::MAX_RECORD;

/// A TLS connection: the socket and its TLS state. rustls does the handshake (and the whole
/// of a TLS 1.2 connection); once a TLS 1.3 handshake is done, our own record layer
/// (`crate::tls13`) takes over with the secrets rustls negotiated, so that the connection's
/// TLS state is a few hundred bytes that a live upgrade can hand over.
pub struct TlsStream {
    tcp: TcpStream,
    mode: Mode,
}

// The records are what a connection keeps for its life, in the one box its stream has;
// boxing them apart cost an allocation more per connection (+49 B measured at 19,000).
#[allow(clippy::large_enum_variant)]
enum Mode {
    Rustls {
        /// None while a handshake step runs on a worker (the socket is left alone then).
        shake: Option<Box<Shake>>,
        /// Bytes read from the socket that rustls has not been given: rustls is fed whole
        /// records only, and no more than it takes at once, so that when the handshake ends
        /// it holds no part of a record that our record layer would need.
        stage: Vec<u8>,
        /// In the reactor's line of handshakes waiting for a worker (once).
        waiting: bool,
    },
    Records(Records),
}

/// rustls's handshake state, stepped on a worker, with the traffic secrets its key log gave
/// (`crate::tls13::Capture`) in the step that derived them.
pub struct Shake {
    conn: rustls::ServerConnection,
    secrets: Option<crate::tls13::Secrets>,
    /// Bytes given to rustls since its last step (whole records, at most `RUSTLS_TAKES`).
    given: usize,
    /// A protected record is among them (`crate::tls13::handshake_feed`).
    sealed: bool,
    /// Steps run: a handshake needs two or three; `MAX_STEPS` bounds what a client can
    /// make the workers do before it is done.
    steps: u8,
}

/// Handshake steps a connection may take (with a HelloRetryRequest, a Finished split over
/// records, a change_cipher_spec fed apart, a real client needs at most 5).
const MAX_STEPS: u8 = 16;

/// What rustls's read buffer takes between two steps when no handshake message spans
/// records (its `MAX_WIRE_SIZE`): given more, it stops mid-record, and at the switch to our
/// records that part would be lost.
const RUSTLS_TAKES: usize = crate::tls13::MAX_PLAIN + 2048 + 5;

impl Shake {
    /// Processes what rustls was fed (key exchange, signature: the handshake's crypto).
    pub fn step(&mut self) -> Result<(), String> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(format!("more than {MAX_STEPS} handshake steps"));
        }
        crate::tls13::Capture::clear();
        let r = self.conn.process_new_packets();
        (self.given, self.sealed) = (0, false);
        if let Some(s) = crate::tls13::Capture::take() {
            self.secrets = Some(s);
        }
        r.map(|_| ()).map_err(|e| e.to_string())
    }
}

/// A TLS 1.3 connection on our record layer. Idle, it holds the keys and nothing else: the
/// buffers are empty (no allocation) unless a record came in part, the socket would not take
/// all of a write, or plaintext came with the end of the handshake.
struct Records {
    keys: crate::tls13::Keys,
    /// The start of a record whose rest has not come yet.
    rx: Vec<u8>,
    /// Sealed records the socket has not taken yet.
    tx: Vec<u8>,
    /// Plaintext rustls decrypted before the switch, not read yet.
    plain: Vec<u8>,
    /// The peer's close_notify came.
    closed: bool,
}

/// A TLS 1.3 connection's state as it crosses to another process at a live upgrade.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsState {
    pub keys: crate::tls13::SavedKeys,
    pub rx: Vec<u8>,
    pub tx: Vec<u8>,
    pub plain: Vec<u8>,
    pub closed: bool,
}

thread_local! {
    /// Where records are sealed before they go to the socket (the reactor's thread only):
    /// what the socket does not take is kept by the connection, the rest costs it nothing.
    static SEAL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Listener {
    /// `reuse_port`: SO_REUSEPORT, so that several processes can listen on one port.
    pub fn bind(addr: &ListenAddr, reuse_port: bool) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => {
                let domain = if a.is_ipv4() {
                    socket2::Domain::IPV4
                } else {
                    socket2::Domain::IPV6
                };
                let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
                s.set_reuse_address(true)?;
                if reuse_port {
                    s.set_reuse_port(true)?;
                }
                s.set_nonblocking(true)?;
                s.set_cloexec(true)?;
                s.bind(&(*a).into())?;
                // Frames are small and latency matters (the reactor coalesces writes
                // itself); accepted sockets inherit this from the listener on Linux, which
                // saves a setsockopt per connection.
                s.set_nodelay(true)?;
                // A deep backlog: connection storms (reconnects after a deploy) queue in the
                // kernel instead of being refused.
                s.listen(4096)?;
                Ok(Listener::Tcp(TcpListener::from_std(s.into()), None))
            }
            ListenAddr::Unix(p) => {
                use std::os::unix::fs::{FileTypeExt, MetadataExt};
                // A socket file left by a previous run would make bind fail: replace it, but
                // only if nobody accepts on it (else another gateway is serving there).
                if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                    // Non-blocking, so a listener with a full backlog cannot hang startup:
                    // refused = nobody listens (stale, replaced); anything else = leave it.
                    let probe =
                        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
                    probe.set_nonblocking(true)?;
                    match probe.connect(&socket2::SockAddr::unix(p)?) {
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                            let _ = std::fs::remove_file(p);
                        }
                        Err(e) if e.raw_os_error() != Some(libc::EAGAIN) => {
                            return Err(io::Error::new(
                                e.kind(),
                                format!("the socket file is there and cannot be probed: {e}"),
                            ));
                        }
                        _ => {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                "the socket is in use: another process accepts connections on it",
                            ));
                        }
                    }
                }
                let l = UnixListener::bind(p)?;
                let m = std::fs::metadata(p)?;
                Ok(Listener::Unix(l, p.clone(), (m.dev(), m.ino())))
            }
        }
    }

    /// The bound address as printed in the `listening` line.
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l, _) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, p, _) => format!("unix:{}", p.display()),
        }
    }

    /// A connection and its peer's address (None on a unix socket: a local peer).
    pub fn accept(&self) -> io::Result<(Sock, Option<std::net::SocketAddr>)> {
        match self {
            Listener::Tcp(l, tls) => {
                // (TCP_NODELAY comes from the listener, but see `NODELAY_EACH`.)
                let (s, a) = sys_accept(l.as_raw_fd())?;
                if NODELAY_EACH.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = s.set_nodelay(true);
                }
                let sock = match tls {
                    None => Sock::Tcp(s),
                    Some(cfg) => {
                        let mut tls = rustls::ServerConnection::new(cfg.clone())
                            .map_err(|e| io::Error::other(e.to_string()))?;
                        // What rustls may hold beyond the reactor's own output accounting:
                        // one record's worth; more waits in the connection's Output.
                        tls.set_buffer_limit(Some(TLS_BUFFER));
                        Sock::Tls(Box::new(TlsStream {
                            tcp: s,
                            mode: Mode::Rustls {
                                shake: Some(Box::new(Shake {
                                    conn: tls,
                                    secrets: None,
                                    given: 0,
                                    sealed: false,
                                    steps: 0,
                                })),
                                stage: Vec::new(),
                                waiting: false,
                            },
                        }))
                    }
                };
                Ok((sock, Some(a)))
            }
            Listener::Unix(l, _, _) => {
                let (s, _) = l.accept()?;
                Ok((Sock::Unix(s), None))
            }
        }
    }
}

/// Accepted connections get TCP_NODELAY set one by one: a listener was taken over from a
/// binary that did not set it on its listeners (`Listener::from_fd`).
static NODELAY_EACH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether listeners remove their socket files when dropped: not in a process started by a
/// live upgrade until it has taken over (failing before, it must leave the old process's
/// files alone).
static OWN_SOCKET_FILES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

pub fn own_socket_files(own: bool) {
    OWN_SOCKET_FILES.store(own, std::sync::atomic::Ordering::Relaxed);
}

impl Drop for Listener {
    /// Removes the socket file, if it is still the one this listener created (another
    /// process may have replaced it since).
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if !OWN_SOCKET_FILES.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Listener::Unix(_, p, id) = self {
            if std::fs::symlink_metadata(&*p).is_ok_and(|m| (m.dev(), m.ino()) == *id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl Source for Listener {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l, _) => l.register(r, t, i),
            Listener::Unix(l, _, _) => l.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l, _) => l.reregister(r, t, i),
            Listener::Unix(l, _, _) => l.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Listener::Tcp(l, _) => l.deregister(r),
            Listener::Unix(l, _, _) => l.deregister(r),
        }
    }
}

/// Handing sockets to another process (the live upgrade): the raw descriptor to send, and
/// the socket back from a received one.
impl Sock {
    pub fn raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tls(t) => t.tcp.as_raw_fd(),
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Sock::Unix(_))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Sock::Tls(_))
    }

    /// TLS, handshake not finished (its state here, not on a worker).
    pub fn tls_handshaking(&self) -> bool {
        matches!(self, Sock::Tls(t) if matches!(&t.mode,
            Mode::Rustls { shake: Some(s), .. } if s.conn.is_handshaking()))
    }

    /// TLS records sealed and not yet on the socket (the socket would block): the reactor
    /// keeps asking for writability until they are out.
    pub fn tls_pending(&self) -> bool {
        match self {
            Sock::Tls(t) => match &t.mode {
                Mode::Rustls { shake, .. } => shake.as_ref().is_some_and(|s| s.conn.wants_write()),
                Mode::Records(r) => !r.tx.is_empty(),
            },
            _ => false,
        }
    }

    /// During a handshake: reads what the socket has and gives rustls the whole records in
    /// it, without processing them (no crypto). Ok(0) at the end of the stream.
    pub fn tls_feed(&mut self) -> io::Result<usize> {
        let Sock::Tls(t) = self else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        let Mode::Rustls {
            shake: Some(sh),
            stage,
            ..
        } = &mut t.mode
        else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // Read in pieces onto the stage, so that it holds what came, not its bound.
        let mut piece = [0u8; 4096];
        let mut got = Ok(1); // not the end
        while stage.len() < STAGE_MAX {
            let room = piece.len().min(STAGE_MAX - stage.len());
            match t.tcp.read(&mut piece[..room]) {
                Ok(0) => return Ok(0),
                Ok(n) => {
                    stage.extend_from_slice(&piece[..n]);
                    got = Ok(n);
                    if n < room {
                        break;
                    }
                }
                Err(e) => {
                    got = Err(e);
                    break;
                }
            }
        }
        let cap = RUSTLS_TAKES.saturating_sub(sh.given);
        let (whole, sealed) = crate::tls13::handshake_feed(stage, cap, sh.sealed);
        sh.sealed = sealed;
        let mut given = &stage[..whole];
        while !given.is_empty() {
            match sh.conn.read_tls(&mut given) {
                Ok(0) | Err(_) => break, // (only garbage gets here: refused at its step)
                Ok(n) => sh.given += n,
            }
        }
        let used = whole - given.len();
        stage.drain(..used);
        if stage.is_empty() {
            *stage = Vec::new();
        }
        got
    }

    /// Marks a TLS connection as in (or out of) the line of waiting handshakes; true if
    /// that changed it (so that it joins the line once).
    pub fn tls_wait(&mut self, now: bool) -> bool {
        match self {
            Sock::Tls(t) => match &mut t.mode {
                Mode::Rustls { waiting, .. } => std::mem::replace(waiting, now) != now,
                Mode::Records(_) => false,
            },
            _ => false,
        }
    }

    /// Handshake bytes wait in rustls for their step.
    pub fn tls_fed(&self) -> bool {
        matches!(self, Sock::Tls(t) if matches!(&t.mode, Mode::Rustls { shake: Some(s), .. } if s.given > 0))
    }

    /// Takes the TLS state out for a worker to run a handshake step on.
    pub fn take_tls(&mut self) -> Option<Box<Shake>> {
        match self {
            Sock::Tls(t) => match &mut t.mode {
                Mode::Rustls { shake, .. } => shake.take(),
                Mode::Records(_) => None,
            },
            _ => None,
        }
    }

    /// Gives the TLS state back after its step (`stepped`: the step went well). A TLS 1.3
    /// handshake that has ended moves to our record layer here; Err if that fails (the
    /// connection must close). After a failed step the state goes back as it is, so that
    /// rustls's alert is sent.
    pub fn put_tls(&mut self, tls: Box<Shake>, stepped: bool) -> Result<(), String> {
        let Sock::Tls(t) = self else {
            return Ok(());
        };
        let Mode::Rustls { shake, stage, .. } = &mut t.mode else {
            return Ok(());
        };
        if !stepped
            || tls.conn.is_handshaking()
            || tls.conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3)
        {
            *shake = Some(tls);
            return Ok(());
        }
        let stage = std::mem::take(stage);
        t.mode = Mode::Records(Records::from_rustls(*tls, stage)?);
        Ok(())
    }

    /// TLS whose state is rustls's (TLS 1.2, or a handshake under way): it cannot cross a
    /// live upgrade. (On our record layer, TLS 1.3 after its handshake, it can.)
    pub fn tls_stays_behind(&self) -> bool {
        matches!(self, Sock::Tls(t) if matches!(t.mode, Mode::Rustls { .. }))
    }

    /// A crossable TLS connection's state, for the new process.
    pub fn tls_state(&self) -> Option<TlsState> {
        let Sock::Tls(t) = self else {
            return None;
        };
        let Mode::Records(r) = &t.mode else {
            return None;
        };
        Some(TlsState {
            keys: r.keys.save(),
            rx: r.rx.clone(),
            tx: r.tx.clone(),
            plain: r.plain.clone(),
            closed: r.closed,
        })
    }

    /// A TLS connection back from a received descriptor and its saved state.
    pub fn tls_from_fd(fd: OwnedFd, st: TlsState) -> Result<Sock, String> {
        if st.rx.len() > STAGE_MAX {
            return Err("a TLS connection's partial record is too long".into());
        }
        let keys = crate::tls13::Keys::load(&st.keys)?;
        Ok(Sock::Tls(Box::new(TlsStream {
            tcp: TcpStream::from_std(fd.into()),
            mode: Mode::Records(Records {
                keys,
                rx: st.rx,
                tx: st.tx,
                plain: st.plain,
                closed: st.closed,
            }),
        })))
    }

    /// Sends TLS records waiting to go (handshake messages, alerts, data accepted by an
    /// earlier write); Err(WouldBlock) while some remain.
    pub fn send_pending(&mut self) -> io::Result<()> {
        match self {
            Sock::Tls(t) => t.send_pending(),
            _ => Ok(()),
        }
    }

    /// The peer as the auth backend is told it: its address, or "unix" (a syscall: asked
    /// only when it is used).
    pub fn remote(&self) -> String {
        let tcp = match self {
            Sock::Tcp(s) => s,
            Sock::Tls(t) => &t.tcp,
            Sock::Unix(_) => return "unix".into(),
        };
        tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default()
    }

    /// A TCP peer's address (None for unix sockets, or a connection already reset).
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Sock::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
            Sock::Tls(t) => t.tcp.peer_addr().ok().map(|a| a.ip()),
            Sock::Unix(_) => None,
        }
    }

    /// The descriptor must be a connected stream socket of that family.
    pub fn from_fd(fd: OwnedFd, unix: bool) -> Sock {
        if unix {
            Sock::Unix(UnixStream::from_std(fd.into()))
        } else {
            Sock::Tcp(TcpStream::from_std(fd.into()))
        }
    }
}

/// A socket's peer for a log line, looked up (a syscall) only if the line is written.
pub struct Peer<'a>(pub &'a Sock);

impl std::fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.remote())
    }
}

impl Listener {
    pub fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l, _) => l.as_raw_fd(),
            Listener::Unix(l, _, _) => l.as_raw_fd(),
        }
    }

    /// A unix listener's path and socket file identity.
    pub fn unix_file(&self) -> Option<(std::path::PathBuf, (u64, u64))> {
        match self {
            Listener::Unix(_, p, id) => Some((p.clone(), *id)),
            Listener::Tcp(..) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Listener::Tcp(_, Some(_)))
    }

    /// Makes a TCP listener wrap its connections in TLS with `cfg` (or replaces the config
    /// a TLS listener had: certificates re-read at a reload). False for a unix listener.
    pub fn set_tls(&mut self, cfg: Arc<rustls::ServerConfig>) -> bool {
        match self {
            Listener::Tcp(_, tls) => {
                *tls = Some(cfg);
                true
            }
            Listener::Unix(..) => false,
        }
    }

    /// The descriptor must be a listening socket: TCP, or unix at `unix`'s path. A TLS
    /// listener comes back without its config (`set_tls` gives it the new one).
    pub fn from_fd(fd: OwnedFd, unix: Option<(std::path::PathBuf, (u64, u64))>) -> Listener {
        match unix {
            Some((p, id)) => Listener::Unix(UnixListener::from_std(fd.into()), p, id),
            None => {
                // A listener from a binary that set TCP_NODELAY per connection instead: set
                // on it now, but connections already in its backlog were made without it,
                // so this process sets it on each connection it accepts (its successor gets
                // listeners that have it).
                let sock = socket2::SockRef::from(&fd);
                if !sock.nodelay().unwrap_or(true) {
                    let _ = sock.set_nodelay(true);
                    NODELAY_EACH.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Listener::Tcp(TcpListener::from_std(fd.into()), None)
            }
        }
    }

    /// Gives up the listener without removing its socket file (another process serves it
    /// now); the descriptor closes.
    pub fn hand_off(mut self) {
        if let Listener::Unix(_, p, _) = &mut self {
            *p = std::path::PathBuf::new(); // names no file: the drop removes nothing
        }
    }
}

impl Sock {
    /// Answers and lets go of a connection refused at accept: `bytes` (one write into the
    /// fresh socket's empty buffer), then what the client already sent is read and dropped
    /// (closing with unread input would send a reset, which may destroy the answer on its
    /// way) and the write side shut, so the client reads the answer, then EOF.
    ///
    /// A TLS connection is closed as it is: the answer could only go after a handshake,
    /// whose crypto is what a refusal must not spend.
    pub fn refuse(mut self, bytes: &[u8]) {
        if let Sock::Tls(t) = &self {
            let _ = t.tcp.shutdown(Shutdown::Both);
            return;
        }
        let _ = self.write(bytes);
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            match self.read(&mut sink) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        self.shutdown_write();
    }

    /// TLS says close_notify first (best effort: a full socket buffer loses it).
    pub fn shutdown_write(&mut self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Write),
            Sock::Unix(s) => s.shutdown(Shutdown::Write),
            Sock::Tls(t) => t.shutdown_write(),
        };
    }
}

impl Records {
    /// Takes over from rustls once its TLS 1.3 handshake is done: what rustls still has to
    /// send (its tickets) and has decrypted (data that came with the client's Finished) is
    /// kept, the rest of the stage is the start of the next records. The keys derived from
    /// the key log's secrets must be the ones rustls used.
    fn from_rustls(mut sh: Shake, stage: Vec<u8>) -> Result<Records, String> {
        use crate::tls13::{Keys, Suite};
        let mut tx = vec![];
        while sh.conn.wants_write() {
            sh.conn.write_tls(&mut tx).map_err(|e| e.to_string())?;
        }
        let (mut plain, mut closed) = (vec![], false);
        let mut b = [0u8; 4096];
        loop {
            match sh.conn.reader().read(&mut b) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => plain.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let suite = sh
            .conn
            .negotiated_cipher_suite()
            .and_then(|s| Suite::from_id(u16::from(s.suite())))
            .ok_or("TLS 1.3 with a suite our records lack")?;
        let secrets = sh
            .secrets
            .take()
            .ok_or("no traffic secrets from the key log")?;
        let ex = sh
            .conn
            .dangerous_extract_secrets()
            .map_err(|e| e.to_string())?;
        let keys = Keys::new(
            suite,
            (&secrets.client, ex.rx.0),
            (&secrets.server, ex.tx.0),
        )?;
        if !keys.agrees(&ex) {
            return Err("the key log's secrets do not give rustls's keys".into());
        }
        let mut rx = stage;
        rx.shrink_to_fit();
        plain.shrink_to_fit();
        tx.shrink_to_fit();
        Ok(Records {
            keys,
            rx,
            tx,
            plain,
            closed,
        })
    }
}

impl TlsStream {
    fn send_pending(&mut self) -> io::Result<()> {
        match &mut self.mode {
            Mode::Rustls { shake, .. } => {
                let Some(sh) = shake.as_mut() else {
                    return Ok(()); // on a worker: nothing to send from here
                };
                while sh.conn.wants_write() {
                    if sh.conn.write_tls(&mut self.tcp)? == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                }
                Ok(())
            }
            Mode::Records(r) => {
                while !r.tx.is_empty() {
                    match self.tcp.write(&r.tx) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => {
                            r.tx.drain(..n);
                        }
                        Err(e) => return Err(e),
                    }
                }
                r.tx = Vec::new(); // an idle connection holds no buffer
                Ok(())
            }
        }
    }

    /// Plaintext into `buf` (which must hold a whole record twice over: the reactor's
    /// scratch). Ok(0) at the end (close_notify or the peer's FIN); WouldBlock when nothing
    /// more is there; InvalidData when the peer does not speak TLS or breaks it (the alert
    /// is sent first).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if matches!(self.mode, Mode::Records(_)) {
            return self.read_records(buf);
        }
        loop {
            let Mode::Rustls {
                shake: Some(sh),
                stage,
                ..
            } = &mut self.mode
            else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            let c = &mut sh.conn;
            match c.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // FIN without close_notify: an end all the same (clients often do this).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if !stage.is_empty() {
                // TLS 1.2 after its handshake: what was read ahead goes first.
                let mut given = &stage[..];
                while !given.is_empty() && matches!(c.read_tls(&mut given), Ok(n) if n > 0) {}
                let used = stage.len() - given.len();
                stage.drain(..used);
                if stage.is_empty() {
                    *stage = Vec::new();
                }
            } else if c.read_tls(&mut self.tcp)? == 0 {
                return Ok(0);
            }
            if let Err(e) = c.process_new_packets() {
                let _ = self.send_pending();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Handshake flights and alerts; the rest waits for writability (the reactor
            // asks `tls_pending` after a read).
            match self.send_pending() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Our records: the start of a record left from the last read goes in front, then the
    /// socket's bytes; whole records open in place, their data at the front of `buf`.
    fn read_records(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        debug_assert!(buf.len() >= 2 * crate::tls13::MAX_RECORD);
        loop {
            let Mode::Records(r) = &mut self.mode else {
                unreachable!("read_records on records");
            };
            if !r.plain.is_empty() {
                let n = r.plain.len().min(buf.len());
                buf[..n].copy_from_slice(&r.plain[..n]);
                r.plain.drain(..n);
                if r.plain.is_empty() {
                    r.plain = Vec::new();
                }
                return Ok(n);
            }
            if r.closed {
                return Ok(0);
            }
            let mut k = r.rx.len();
            buf[..k].copy_from_slice(&r.rx);
            r.rx = Vec::new();
            // A whole record carried over (left at the switch from rustls) is opened before
            // the socket is read: no edge may come for it.
            if !crate::tls13::whole_record(&buf[..k]) {
                match self.tcp.read(&mut buf[k..]) {
                    Ok(0) => return Ok(0), // FIN (a record cut short by it is dropped)
                    Ok(n) => k += n,
                    Err(e) => {
                        r.rx = buf[..k].to_vec();
                        return Err(e);
                    }
                }
            }
            let o = match r.keys.open(&mut buf[..k]) {
                Ok(o) => o,
                Err(f) => {
                    if let Some(a) = f.alert {
                        r.keys.seal_alert(a, &mut r.tx);
                        let _ = self.send_pending();
                    }
                    return Err(io::Error::new(io::ErrorKind::InvalidData, f.why));
                }
            };
            if o.closed {
                r.closed = true;
            } else if o.used < k {
                r.rx = buf[o.used..k].to_vec();
            }
            if o.update_requested {
                // Ours, under the old key, before anything else we send; the socket takes
                // it now or with the turn's writes (the reactor asks `tls_pending`).
                r.keys.answer_update(&mut r.tx);
                match self.send_pending() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if o.plain > 0 {
                return Ok(o.plain);
            }
        }
    }

    /// Takes plaintext (up to one record's worth) and sends what it can; Ok(n) is what was
    /// taken, WouldBlock when nothing could be (records still queued).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self.send_pending() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        match &mut self.mode {
            Mode::Rustls { shake, .. } => {
                let Some(sh) = shake.as_mut() else {
                    return Err(io::ErrorKind::WouldBlock.into());
                };
                let n = sh.conn.writer().write_vectored(bufs)?;
                match self.send_pending() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            }
            Mode::Records(r) => {
                if !r.tx.is_empty() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let tcp = &mut self.tcp;
                SEAL.with(|sealed| {
                    let mut sealed = sealed.borrow_mut();
                    sealed.clear();
                    let n = r
                        .keys
                        .seal(bufs.iter().map(|b| &**b), TLS_BUFFER, &mut sealed);
                    let mut sent = 0;
                    while sent < sealed.len() {
                        match tcp.write(&sealed[sent..]) {
                            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                            Ok(w) => sent += w,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    // Taken: what the socket did not take goes with the next writes.
                    r.tx.extend_from_slice(&sealed[sent..]);
                    Ok(n)
                })
            }
        }
    }

    /// close_notify, then the write side shut (best effort: a full socket buffer loses it).
    fn shutdown_write(&mut self) -> io::Result<()> {
        match &mut self.mode {
            Mode::Rustls { shake, .. } => {
                if let Some(sh) = shake.as_mut() {
                    sh.conn.send_close_notify();
                }
            }
            Mode::Records(r) => r
                .keys
                .seal_alert(crate::tls13::alert::CLOSE_NOTIFY, &mut r.tx),
        }
        let _ = self.send_pending();
        self.tcp.shutdown(Shutdown::Write)
    }
}

// Plain sockets are read, written and accepted through `syscall(2)` rather than libc's
// wrappers (which std and mio use). In a process with more than one thread those wrappers
// are cancellation points: each brackets its syscall with two atomic read-modify-writes of
// the thread's cancellation state (`__pthread_enable_asynccancel` and its pair): 0.4% of the
// gateway's CPU in a connect. Nothing here uses thread cancellation.

/// `syscall(2)`: the result, or the error errno holds when it returns -1.
///
/// # Safety
/// As the syscall `nr` with these arguments: every pointer valid for what it does with it.
unsafe fn sys(nr: libc::c_long, [a, b, c, d, e, f]: [libc::c_long; 6]) -> io::Result<usize> {
    // SAFETY: the caller's.
    let n = unsafe { libc::syscall(nr, a, b, c, d, e, f) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// recv(2) on `fd`.
fn sys_recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let (p, len) = (buf.as_mut_ptr() as libc::c_long, buf.len() as libc::c_long);
    // SAFETY: `buf` is valid for writes of its length; null: no peer address wanted.
    unsafe { sys(libc::SYS_recvfrom, [fd as libc::c_long, p, len, 0, 0, 0]) }
}

/// send(2) on `fd`, without SIGPIPE (as std's own `send` does).
fn sys_send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let (p, len) = (buf.as_ptr() as libc::c_long, buf.len() as libc::c_long);
    let flags = libc::MSG_NOSIGNAL as libc::c_long;
    // SAFETY: `buf` is valid for reads of its length; null: no destination address.
    unsafe { sys(libc::SYS_sendto, [fd as libc::c_long, p, len, flags, 0, 0]) }
}

/// writev(2) on `fd` (std's `write_vectored` is writev too; SIGPIPE is ignored process-wide
/// by Rust's runtime). At most UIO_MAXIOV (1,024) slices, as std: the rest is a short write.
fn sys_writev(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    let n = bufs.len().min(libc::UIO_MAXIOV as usize);
    let args = [fd as libc::c_long, bufs.as_ptr() as _, n as _, 0, 0, 0];
    // SAFETY: IoSlice is ABI-compatible with iovec on unix (std guarantees it), and the
    // slices are valid for reads for the call.
    unsafe { sys(libc::SYS_writev, args) }
}

/// accept4(2) on the listener `fd`: a non-blocking, close-on-exec stream and its peer.
fn sys_accept(fd: RawFd) -> io::Result<(TcpStream, std::net::SocketAddr)> {
    use std::os::fd::FromRawFd;
    // SAFETY: accept4 writes at most `len` bytes of address into the storage socket2 hands
    // over and sets `len`; the descriptor it returns is new and owned by nothing else.
    let (s, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let flags = (libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as libc::c_long;
            let args = [fd as libc::c_long, storage as _, len as _, flags, 0, 0];
            let n = sys(libc::SYS_accept4, args)?;
            Ok(TcpStream::from_raw_fd(n as RawFd))
        })?
    };
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accept: a peer address that is not IP"))?;
    Ok((s, peer))
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => sys_recv(s.as_raw_fd(), buf),
            Sock::Unix(s) => sys_recv(s.as_raw_fd(), buf),
            Sock::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => sys_send(s.as_raw_fd(), buf),
            Sock::Unix(s) => sys_send(s.as_raw_fd(), buf),
            Sock::Tls(t) => t.write_vectored(&[io::IoSlice::new(buf)]),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => sys_writev(s.as_raw_fd(), bufs),
            Sock::Unix(s) => sys_writev(s.as_raw_fd(), bufs),
            Sock::Tls(t) => t.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Sock {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.register(r, t, i),
            Sock::Unix(s) => s.register(r, t, i),
            Sock::Tls(s) => s.tcp.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.reregister(r, t, i),
            Sock::Unix(s) => s.reregister(r, t, i),
            Sock::Tls(s) => s.tcp.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.deregister(r),
            Sock::Unix(s) => s.deregister(r),
            Sock::Tls(s) => s.tcp.deregister(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted TCP connections have TCP_NODELAY (from the listener, not a setsockopt each),
    /// also on a listener handed over by a binary that did not set it on the listener.
    #[test]
    fn accepted_connections_have_nodelay_from_the_listener() {
        let nodelay = |s: &Sock| {
            let Sock::Tcp(t) = s else { panic!("tcp") };
            t.nodelay().unwrap()
        };
        let l = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), false).unwrap();
        let _c = std::net::TcpStream::connect(l.local()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (s, peer) = l.accept().unwrap();
        assert!(nodelay(&s));
        assert!(peer.is_some_and(|p| p.ip().is_loopback()));
        // An old listener, without it: given it when taken over.
        // A connection already in its backlog then was made without it: it gets it too.
        let raw = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        raw.set_nonblocking(true).unwrap();
        let addr = raw.local_addr().unwrap();
        let _early = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let l = Listener::from_fd(OwnedFd::from(raw), None);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        for _ in 0..2 {
            let (s, _) = l.accept().unwrap();
            assert!(nodelay(&s));
        }
    }

    /// The raw-syscall paths behave as std's: accept gives a non-blocking, close-on-exec
    /// stream and the peer's exact address, an empty listener WouldBlock; reads and writes
    /// carry bytes, an empty socket reads WouldBlock, a closed peer reads 0; writev takes
    /// more than IOV_MAX slices as a short write, not an error.
    #[test]
    fn raw_syscalls_accept_read_and_write_as_std_does() {
        use std::io::{Read as _, Write as _};
        // Loopback delivery can lag on a loaded machine: retried until it lands, not slept.
        fn until<T>(mut f: impl FnMut() -> io::Result<T>) -> T {
            let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match f() {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < end, "nothing came within 5 s");
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    r => return r.unwrap(),
                }
            }
        }
        let l = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), false).unwrap();
        let err = l.accept().err().expect("nothing to accept yet");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let mut c = std::net::TcpStream::connect(l.local()).unwrap();
        let (mut s, peer) = until(|| l.accept());
        assert_eq!(peer, Some(c.local_addr().unwrap()));
        let fd = s.raw_fd();
        // SAFETY: fcntl reads flags of a descriptor this test owns.
        let (fl, fdfl) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        };
        assert!(fl >= 0 && fdfl >= 0);
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fdfl & libc::FD_CLOEXEC, 0);
        let mut buf = [0u8; 64];
        assert_eq!(
            s.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        c.write_all(b"hello").unwrap();
        assert_eq!(until(|| s.read(&mut buf)), 5);
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(s.write(b"back").unwrap(), 4);
        let one = [7u8];
        let many: Vec<io::IoSlice<'_>> = (0..1500).map(|_| io::IoSlice::new(&one)).collect();
        assert_eq!(s.write_vectored(&many).unwrap(), 1024);
        let mut got = vec![0u8; 1028];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], b"back");
        assert!(got[4..].iter().all(|&b| b == 7));
        drop(c);
        assert_eq!(until(|| s.read(&mut buf)), 0);
    }
}
