//! Sockets the reactor owns: TCP or unix-domain, listeners and streams, behind small enums.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

use crate::config::ListenAddr;

pub enum Listener {
    Tcp(TcpListener),
    /// With the path and the (device, inode) of the socket file it created.
    Unix(UnixListener, std::path::PathBuf, (u64, u64)),
}

pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
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
                Ok(Listener::Tcp(TcpListener::from_std(s.into())))
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
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, p, _) => format!("unix:{}", p.display()),
        }
    }

    pub fn accept(&self) -> io::Result<(Sock, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept()?;
                // Frames are small and latency matters; the reactor coalesces writes itself.
                let _ = s.set_nodelay(true);
                Ok((Sock::Tcp(s), a.to_string()))
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
            Listener::Tcp(l) => l.register(r, t, i),
            Listener::Unix(l, _, _) => l.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.reregister(r, t, i),
            Listener::Unix(l, _, _) => l.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.deregister(r),
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
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Sock::Unix(_))
    }

    /// A TCP peer's address (None for unix sockets, or a connection already reset).
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Sock::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
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
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _, _) => l.as_raw_fd(),
        }
    }

    /// A unix listener's path and socket file identity.
    pub fn unix_file(&self) -> Option<(std::path::PathBuf, (u64, u64))> {
        match self {
            Listener::Unix(_, p, id) => Some((p.clone(), *id)),
            Listener::Tcp(_) => None,
        }
    }

    /// The descriptor must be a listening socket: TCP, or unix at `unix`'s path.
    pub fn from_fd(fd: OwnedFd, unix: Option<(std::path::PathBuf, (u64, u64))>) -> Listener {
        match unix {
            Some((p, id)) => Listener::Unix(UnixListener::from_std(fd.into()), p, id),
            None => Listener::Tcp(TcpListener::from_std(fd.into())),
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
    pub fn refuse(mut self, bytes: &[u8]) {
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

    pub fn shutdown_write(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Write),
            Sock::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
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
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.reregister(r, t, i),
            Sock::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.deregister(r),
            Sock::Unix(s) => s.deregister(r),
        }
    }
}
