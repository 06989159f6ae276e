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

/// Plaintext rustls takes from a connection's output at a time (one full record).
const TLS_BUFFER: usize = 16 * 1024;

/// A TLS connection: the socket and rustls's state (handshake, records, buffers). While a
/// handshake step runs on a worker (its crypto kept off the reactor) the state is there:
/// `tls` is None and the socket reads and writes nothing.
pub struct TlsStream {
    tcp: TcpStream,
    tls: Option<rustls::ServerConnection>,
    /// Handshake bytes fed to rustls and not processed yet (a worker's next step).
    fed: bool,
    /// In the reactor's line of handshakes waiting for a worker (once).
    waiting: bool,
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

    pub fn accept(&self) -> io::Result<(Sock, String)> {
        match self {
            Listener::Tcp(l, tls) => {
                let (s, a) = l.accept()?;
                // Frames are small and latency matters; the reactor coalesces writes itself.
                let _ = s.set_nodelay(true);
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
                            tls: Some(tls),
                            fed: false,
                            waiting: false,
                        }))
                    }
                };
                Ok((sock, a.to_string()))
            }
            Listener::Unix(l, p, _) => {
                let (s, _) = l.accept()?;
                Ok((Sock::Unix(s), format!("unix:{}", p.display())))
            }
        }
    }
}

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

    /// TLS: its state lives in this process (rustls), so a live upgrade cannot hand it over.
    pub fn is_tls(&self) -> bool {
        matches!(self, Sock::Tls(_))
    }

    /// TLS, handshake not finished (its state here, not on a worker).
    pub fn tls_handshaking(&self) -> bool {
        matches!(self, Sock::Tls(t) if t.tls.as_ref().is_some_and(|c| c.is_handshaking()))
    }

    /// TLS records encrypted and not yet on the socket (the socket would block): the
    /// reactor keeps asking for writability until they are out.
    pub fn tls_pending(&self) -> bool {
        matches!(self, Sock::Tls(t) if t.tls.as_ref().is_some_and(|c| c.wants_write()))
    }

    /// During a handshake: reads what the socket has into rustls without processing it
    /// (no crypto). Ok(0) at the end of the stream.
    pub fn tls_feed(&mut self) -> io::Result<usize> {
        let Sock::Tls(t) = self else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        let Some(c) = t.tls.as_mut() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = c.read_tls(&mut t.tcp)?;
        t.fed |= n > 0;
        Ok(n)
    }

    /// The bytes given back with the state still wait for their step.
    pub fn mark_fed(&mut self) {
        if let Sock::Tls(t) = self {
            t.fed = true;
        }
    }

    /// Marks a TLS connection as in (or out of) the line of waiting handshakes; true if
    /// that changed it (so that it joins the line once).
    pub fn tls_wait(&mut self, waiting: bool) -> bool {
        match self {
            Sock::Tls(t) => std::mem::replace(&mut t.waiting, waiting) != waiting,
            _ => false,
        }
    }

    /// Handshake bytes wait in rustls for their step.
    pub fn tls_fed(&self) -> bool {
        matches!(self, Sock::Tls(t) if t.fed && t.tls.is_some())
    }

    /// Takes the TLS state out for a worker to run a handshake step on.
    pub fn take_tls(&mut self) -> Option<rustls::ServerConnection> {
        match self {
            Sock::Tls(t) => {
                t.fed = false;
                t.tls.take()
            }
            _ => None,
        }
    }

    /// Gives the TLS state back after its step.
    pub fn put_tls(&mut self, tls: rustls::ServerConnection) {
        if let Sock::Tls(t) = self {
            t.tls = Some(tls);
        }
    }

    /// Sends TLS records waiting in rustls (handshake messages, alerts, data accepted by an
    /// earlier write); Err(WouldBlock) while some remain.
    pub fn send_pending(&mut self) -> io::Result<()> {
        match self {
            Sock::Tls(t) => t.send_pending(),
            _ => Ok(()),
        }
    }

    /// The peer as the auth backend is told it: its address, or "unix".
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
            None => Listener::Tcp(TcpListener::from_std(fd.into()), None),
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
            Sock::Tls(t) => {
                if let Some(c) = t.tls.as_mut() {
                    c.send_close_notify();
                }
                let _ = t.send_pending();
                t.tcp.shutdown(Shutdown::Write)
            }
        };
    }
}

impl TlsStream {
    fn send_pending(&mut self) -> io::Result<()> {
        let Some(c) = self.tls.as_mut() else {
            return Ok(()); // on a worker: nothing to send from here
        };
        while c.wants_write() {
            if c.write_tls(&mut self.tcp)? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Plaintext into `buf`: what rustls holds decrypted, else more records from the socket
    /// (answering the handshake as it goes). Ok(0) at the end (close_notify or the peer's
    /// FIN); WouldBlock when nothing more is there; InvalidData when the peer does not speak
    /// TLS or breaks it (rustls's alert is sent first).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(c) = self.tls.as_mut() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            match c.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // FIN without close_notify: an end all the same (clients often do this).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if c.read_tls(&mut self.tcp)? == 0 {
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

    /// Takes plaintext into rustls (up to its buffer limit) and sends what it can; Ok(n) is
    /// what rustls took, WouldBlock when it could take nothing (records still queued).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self.send_pending() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let Some(c) = self.tls.as_mut() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = c.writer().write_vectored(bufs)?;
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
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
            Sock::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
            Sock::Tls(t) => t.write_vectored(&[io::IoSlice::new(buf)]),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
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
