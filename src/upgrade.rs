//! The live upgrade's process side (docs/OPERATIONS.md, "Live upgrade"): the running
//! process starts the binary now at its own path, with its own arguments, and the two talk
//! over a unix `SOCK_SEQPACKET` pair — the child's end inherited as the one descriptor
//! without `CLOEXEC`, named by `LONGLINK_UPGRADE_FD`.
//!
//! The conversation, one packet each (first byte the kind):
//! 1. new → old `R` (ready: its config loaded, its workers up);
//! 2. old → new `F` packets carrying the listeners and connections (`SCM_RIGHTS`, at most
//!    [`FDS_PER_PACKET`] each), `D` packets with the state (JSON, `reactor::handoff`), and
//!    `E` with the counts of both;
//! 3. new → old `T` (taken: it is ready to serve) or `X` with why it refused (the old
//!    process resumes);
//! 4. old → new `G` (go: the old process exits without touching a socket again).
//!
//! The old process resumes too when the new one closes its end (it exited) or says nothing
//! in time; it stops the new one (SIGKILL, reaped) before it does. The new one reads and
//! writes no client socket before `G` (or the end of the stream: the old process died), so
//! until then the old one owns every byte.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The variable naming the inherited end in the new process.
pub const FD_ENV: &str = "LONGLINK_UPGRADE_FD";
/// How long the old process waits for the new one, from the start: after this it resumes.
pub const PATIENCE: Duration = Duration::from_secs(10);
/// Descriptors per packet (the kernel's `SCM_MAX_FD` is 253).
pub const FDS_PER_PACKET: usize = 250;
/// Bytes of state per packet (a seqpacket's size is bounded by the send buffer).
const CHUNK: usize = 60 * 1024;

pub const READY: u8 = b'R';
pub const FDS: u8 = b'F';
pub const DATA: u8 = b'D';
pub const END: u8 = b'E';
pub const TAKEN: u8 = b'T';
pub const REFUSED: u8 = b'X';
pub const GO: u8 = b'G';

/// The binary and arguments this process was started with, read at startup: the path is
/// what an upgrade starts (the file there then — the new binary once it is installed;
/// `/proc/self/exe` would name the replaced one).
static ORIGIN: OnceLock<(std::path::PathBuf, Vec<std::ffi::OsString>)> = OnceLock::new();

/// Called first thing in `main`. The path as started (made absolute), not resolved: with a
/// symlink switched to a new release, the upgrade runs what the link names then.
pub fn remember_origin() {
    let argv0 = std::env::args_os().next().map(std::path::PathBuf::from);
    let exe = match argv0 {
        Some(p) if p.is_absolute() => p,
        Some(p) if p.components().count() > 1 => match std::env::current_dir() {
            Ok(d) => d.join(p),
            Err(_) => std::env::current_exe().unwrap_or(p),
        },
        // Found through PATH: where it was found.
        _ => std::env::current_exe().unwrap_or_else(|_| "longlink".into()),
    };
    let args = std::env::args_os().skip(1).collect();
    let _ = ORIGIN.set((exe, args));
}

/// One end of the pair.
pub struct Channel {
    fd: OwnedFd,
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Channel {
    /// The new process's end, if this process was started by an upgrade. The variable is
    /// removed (a later upgrade's child must not see it) and the descriptor made `CLOEXEC`.
    /// Call before any thread starts.
    pub fn inherited() -> Option<io::Result<Channel>> {
        let v = std::env::var(FD_ENV).ok()?;
        // SAFETY: no other thread runs yet (the caller's contract).
        unsafe { std::env::remove_var(FD_ENV) };
        let fd: RawFd = match v.parse() {
            Ok(fd) if fd > 2 => fd,
            _ => return Some(Err(io::Error::other(format!("{FD_ENV}={v:?}")))),
        };
        // SAFETY: F_GETFD on a number: fails cleanly if it names nothing.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Some(Err(io::Error::last_os_error()));
        }
        // SAFETY: the descriptor was handed to this process for it alone.
        let ch = Channel {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        Some(ch.set_timeout(PATIENCE).map(|_| ch))
    }

    /// Blocking sends and receives give up after `d`.
    pub fn set_timeout(&self, d: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: setsockopt with a timeval of the right size.
            let r = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Another descriptor for the same end (`CLOEXEC`).
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel {
            fd: self.fd.try_clone()?,
        })
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: fcntl flag changes on our own descriptor.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            let fl = if on {
                fl | libc::O_NONBLOCK
            } else {
                fl & !libc::O_NONBLOCK
            };
            if libc::fcntl(fd, libc::F_SETFL, fl) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Sends one packet: `kind`, then `data`, with `fds` attached.
    pub fn send(&self, kind: u8, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
        assert!(fds.len() <= FDS_PER_PACKET && data.len() <= CHUNK);
        let mut head = [kind];
        let mut iov = [
            libc::iovec {
                iov_base: head.as_mut_ptr().cast(),
                iov_len: 1,
            },
            libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            },
        ];
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain data; every pointer in it points into live locals.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = 2;
            if !fds.is_empty() {
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(c).cast::<RawFd>(),
                    fds.len(),
                );
            }
            loop {
                let n = libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
                if n >= 0 {
                    return Ok(());
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }

    /// Receives one packet into `data` (its kind returned, None at end of stream); the
    /// descriptors it carries are appended to `fds`, `CLOEXEC`.
    pub fn recv(&self, data: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> io::Result<Option<u8>> {
        data.clear();
        data.resize(CHUNK + 1, 0);
        let mut iov = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        }];
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space =
            unsafe { libc::CMSG_SPACE((FDS_PER_PACKET * std::mem::size_of::<RawFd>()) as u32) }
                as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain data pointing into live locals; the kernel fills at most
        // the lengths given, and the control messages are walked with the CMSG macros.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let n = loop {
                let n = libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
                if n >= 0 {
                    break n as usize;
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            };
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let p = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
                return Err(io::Error::other("a packet came truncated"));
            }
            if n == 0 {
                return Ok(None);
            }
            data.truncate(n);
            let kind = data.remove(0);
            Ok(Some(kind))
        }
    }

    /// The old process's side: every descriptor, then the state, then the counts.
    pub fn send_state(&self, fds: &[RawFd], state: &[u8]) -> io::Result<()> {
        for part in fds.chunks(FDS_PER_PACKET) {
            self.send(FDS, &[], part)?;
        }
        for part in state.chunks(CHUNK) {
            self.send(DATA, part, &[])?;
        }
        self.send(
            END,
            format!("{} {}", fds.len(), state.len()).as_bytes(),
            &[],
        )
    }

    /// The new process's side: says it is ready, then takes the descriptors and the state.
    pub fn receive_state(&self) -> io::Result<(Vec<OwnedFd>, Vec<u8>)> {
        self.send(READY, std::process::id().to_string().as_bytes(), &[])?;
        let (mut fds, mut state, mut data) = (vec![], vec![], vec![]);
        loop {
            match self.recv(&mut data, &mut fds)? {
                Some(FDS) => {}
                Some(DATA) => state.extend_from_slice(&data),
                Some(END) => {
                    let want = format!("{} {}", fds.len(), state.len());
                    if data != want.as_bytes() {
                        return Err(io::Error::other(format!(
                            "sent {:?}, received {want}",
                            String::from_utf8_lossy(&data)
                        )));
                    }
                    return Ok((fds, state));
                }
                Some(k) => return Err(io::Error::other(format!("unexpected packet {k}"))),
                None => return Err(io::Error::other("the old process went away")),
            }
        }
    }
}

/// A `SOCK_SEQPACKET` unix socketpair, both ends `CLOEXEC`.
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut sv = [0; 2];
    // SAFETY: socketpair fills two descriptors on success.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and are ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

/// Starts the binary at this process's path with its arguments and the child's end of a
/// new pair; returns the parent's end and the child.
pub fn spawn() -> io::Result<(Channel, Child)> {
    let (ours, mut theirs) = seqpacket_pair()?;
    if theirs.as_raw_fd() <= 2 {
        // Run with stdio closed, the pair took a standard number the child's stdio replaces.
        // SAFETY: F_DUPFD_CLOEXEC on our descriptor returns a new one (or -1).
        let fd = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created.
        theirs = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    let (exe, args) = ORIGIN.get().cloned().unwrap_or_else(|| {
        (
            std::env::current_exe().unwrap_or_default(),
            std::env::args_os().skip(1).collect(),
        )
    });
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(&exe);
    cmd.args(&args)
        .env(FD_ENV, fd.to_string())
        .stdin(Stdio::null());
    use std::os::unix::process::CommandExt;
    // SAFETY: only fcntl between fork and exec (async-signal-safe): the child's end, and
    // it alone, survives the exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs); // so that the child's exit reads as the end of the stream here
    Ok((Channel { fd: ours }, child))
}

/// Tells systemd (`Type=notify`) which process is the service's main one and that it is
/// ready: one datagram to `$NOTIFY_SOCKET` (a path, or `@` for the abstract namespace),
/// when set. No libsystemd: the protocol is this one datagram.
pub fn notify_systemd() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg = format!("MAINPID={}\nREADY=1\n", std::process::id());
    let sent = (|| -> io::Result<()> {
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let s = UnixDatagram::unbound()?;
        let p = path.as_encoded_bytes();
        let addr = match p.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(std::path::Path::new(&path))?,
        };
        s.send_to_addr(msg.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        log::warn!("NOTIFY_SOCKET {path:?}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Channel, Channel) {
        let (a, b) = seqpacket_pair().unwrap();
        (Channel { fd: a }, Channel { fd: b })
    }

    #[test]
    fn descriptors_and_a_large_state_cross_the_pair_whole() {
        let (old, new) = pair();
        // 600 descriptors (three packets' worth): dups of a pipe's read end.
        let mut p = [0; 2];
        // SAFETY: pipe fills two descriptors.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let fds: Vec<OwnedFd> = (0..600)
            // SAFETY: dup of a live descriptor.
            .map(|_| unsafe { OwnedFd::from_raw_fd(libc::dup(p[0])) })
            .collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let state: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (st, r2) = (state.clone(), raw.clone());
        let t = std::thread::spawn(move || {
            let mut data = vec![];
            let mut none = vec![];
            assert_eq!(old.recv(&mut data, &mut none).unwrap(), Some(READY));
            old.send_state(&r2, &st).unwrap();
            old.recv(&mut data, &mut none).unwrap()
        });
        let (got, blob) = new.receive_state().unwrap();
        assert_eq!(blob, state);
        assert_eq!(got.len(), 600);
        for f in &got {
            // SAFETY: F_GETFD on a received descriptor.
            let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(fl & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "received CLOEXEC");
        }
        new.send(TAKEN, &[], &[]).unwrap();
        assert_eq!(t.join().unwrap(), Some(TAKEN));
        // SAFETY: closing the pipe's ends we made.
        unsafe {
            libc::close(p[0]);
            libc::close(p[1]);
        }
    }

    #[test]
    fn a_peer_that_goes_away_reads_as_the_end() {
        let (old, new) = pair();
        drop(new);
        let (mut d, mut f) = (vec![], vec![]);
        assert_eq!(old.recv(&mut d, &mut f).unwrap(), None);
    }
}
