//! The host side of hybrid vsock: one unix socket per VM.
//!
//! * Host → guest: a client connects to the VM's socket, writes `CONNECT <port>\n`; once the
//!   guest accepts, the muxer answers `OK <local port>\n` and the socket becomes a byte stream
//!   to the guest listener.
//! * Guest → host: a guest connection to host port P is joined to the unix socket `<path>_P`.
//!
//! The muxer owns the sockets and its own epoll set; the device thread watches that set's fd.
//! It consumes packets the driver sent (`from_guest`) and queues packets for the driver
//! (`pop_to_guest`). Flow control follows virtio-vsock credit: we never send a connection more
//! than the guest advertised, and we advertise a fixed buffer we keep.
use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;

/// Bytes of guest→host data we buffer per connection (advertised as `buf_alloc`).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// First local port for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Host→guest bytes read from a socket at a time.
const READ_CHUNK: usize = MAX_PKT_DATA as usize;

/// Errors from the host side of vsock.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("vsock socket path {0} already exists; remove it or pick another")]
    PathExists(PathBuf),
    #[error("cannot create vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set up the vsock event set: {0}")]
    Epoll(io::Error),
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host client connected; waiting for its `CONNECT <port>\n` line.
    AwaitConnect(Vec<u8>),
    /// REQUEST sent to the guest; waiting for RESPONSE or RST.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    local_port: u32,
    peer_port: u32,
    /// What the guest told us about its receive buffer.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Host→guest bytes queued for the guest so far.
    tx_cnt: Wrapping<u32>,
    /// Guest→host bytes written to the host socket so far.
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_sent: Wrapping<u32>,
    /// Guest→host bytes not yet written to the host socket.
    pending: VecDeque<u8>,
    /// The guest will send no more: shut our write side once `pending` drains.
    peer_done_sending: bool,
    /// The guest shut both directions while `pending` still held data: the connection ends
    /// (RST to the guest) once that data has reached the host socket.
    peer_gone: bool,
    /// The host client closed its side: read no more.
    host_eof: bool,
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Conn {
        Conn {
            stream,
            state,
            local_port,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            pending: VecDeque::new(),
            peer_done_sending: false,
            peer_gone: false,
            host_eof: false,
            interest: EventSet::empty(),
        }
    }

    /// Bytes we may still send before the guest's buffer is full.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// The events the socket should be watched for, given the connection's state.
    fn wanted_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        match self.state {
            State::AwaitConnect(_) => ev |= EventSet::IN,
            State::Connecting => {}
            State::Established => {
                if !self.host_eof && !self.peer_gone && self.peer_credit() > 0 {
                    ev |= EventSet::IN;
                }
                if !self.pending.is_empty() {
                    ev |= EventSet::OUT;
                }
            }
        }
        ev
    }

    /// Writes as much of `pending` to the host socket as it takes. Err on a broken socket.
    fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.pending.is_empty() && self.peer_done_sending {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }
}

/// The hybrid-vsock multiplexer of one VM.
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<RawFd, Conn>,
    /// (local port, guest port) → socket fd.
    ports: HashMap<(u32, u32), RawFd>,
    to_guest: VecDeque<Packet>,
    next_local_port: u32,
}

impl Muxer {
    /// Binds the VM's socket at `path` (which must not exist).
    pub fn new(path: &Path, guest_cid: u64) -> Result<Muxer, MuxerError> {
        if path.symlink_metadata().is_ok() {
            return Err(MuxerError::PathExists(path.into()));
        }
        let listener = UnixListener::bind(path).map_err(|source| MuxerError::Bind {
            path: path.into(),
            source,
        })?;
        let cleanup = |e: io::Error| {
            let _ = std::fs::remove_file(path);
            MuxerError::Epoll(e)
        };
        listener.set_nonblocking(true).map_err(cleanup)?;
        let epoll = Epoll::new().map_err(cleanup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
            )
            .map_err(cleanup)?;
        Ok(Muxer {
            guest_cid,
            path: path.into(),
            listener,
            epoll,
            conns: HashMap::new(),
            ports: HashMap::new(),
            to_guest: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// The epoll fd that becomes readable when any socket needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of open connections (for tests and stats).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The next packet for the guest, if any.
    pub fn pop_to_guest(&mut self) -> Option<Packet> {
        self.to_guest.pop_front()
    }

    /// Puts back the unsent rest of a packet at the head of the queue.
    pub fn push_front_to_guest(&mut self, pkt: Packet) {
        self.to_guest.push_front(pkt);
    }

    pub fn has_packets_for_guest(&self) -> bool {
        !self.to_guest.is_empty()
    }

    /// Serves every socket that is ready, without blocking.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let fd = ev.data() as RawFd;
                if fd == self.listener.as_raw_fd() {
                    self.accept_all();
                } else {
                    self.conn_event(fd, ev.event_set());
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("vsock: cannot make accepted socket non-blocking: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.conns
                        .insert(fd, Conn::new(stream, State::AwaitConnect(Vec::new()), 0, 0));
                    self.rearm(fd);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accept on {} failed: {e}", self.path.display());
                    return;
                }
            }
        }
    }

    fn conn_event(&mut self, fd: RawFd, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        match conn.state {
            State::AwaitConnect(_) => self.read_connect_line(fd),
            State::Connecting => {}
            State::Established => {
                if events.contains(EventSet::OUT) {
                    if let Err(e) = conn.flush() {
                        tracing::debug!("vsock: host socket write failed: {e}");
                        return self.reset(fd);
                    }
                    if conn.peer_gone && conn.pending.is_empty() {
                        return self.finish(fd);
                    }
                    self.maybe_credit_update(fd);
                }
                if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.read_host_data(fd);
                }
            }
        }
        self.rearm(fd);
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let conn = self.conns.get_mut(&fd).expect("caller checked");
        let State::AwaitConnect(line) = &mut conn.state else {
            return;
        };
        // One byte at a time: whatever follows the newline belongs to the stream.
        let mut byte = [0u8; 1];
        loop {
            match conn.stream.read(&mut byte) {
                Ok(0) => return self.close(fd),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => {
                    line.push(byte[0]);
                    if line.len() > MAX_CONNECT_LINE {
                        tracing::debug!("vsock: CONNECT line too long");
                        return self.close(fd);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close(fd),
            }
        }
        let Some(port) = parse_connect(line) else {
            tracing::debug!(line = %String::from_utf8_lossy(line), "vsock: bad CONNECT line");
            return self.close(fd);
        };
        let local_port = self.allocate_local_port(port);
        let conn = self.conns.get_mut(&fd).expect("still there");
        conn.state = State::Connecting;
        conn.local_port = local_port;
        conn.peer_port = port;
        self.ports.insert((local_port, port), fd);
        let pkt = self.packet_for(fd, OP_REQUEST);
        self.to_guest.push_back(pkt);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.ports.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    fn read_host_data(&mut self, fd: RawFd) {
        let conn = self.conns.get_mut(&fd).expect("caller checked");
        if conn.host_eof {
            return;
        }
        let want = (conn.peer_credit() as usize).min(READ_CHUNK);
        if want == 0 {
            return;
        }
        let mut buf = vec![0u8; want];
        match conn.stream.read(&mut buf) {
            Ok(0) => {
                conn.host_eof = true;
                let mut pkt = self.packet_for(fd, OP_SHUTDOWN);
                pkt.hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                self.to_guest.push_back(pkt);
            }
            Ok(n) => {
                buf.truncate(n);
                conn.tx_cnt += Wrapping(n as u32);
                let mut pkt = self.packet_for(fd, OP_RW);
                pkt.data = buf;
                self.to_guest.push_back(pkt);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => {
                tracing::debug!("vsock: host socket read failed: {e}");
                self.reset(fd);
            }
        }
    }

    /// A packet for connection `fd` with our current credit in it.
    fn packet_for(&mut self, fd: RawFd, op: u16) -> Packet {
        let conn = self.conns.get_mut(&fd).expect("connection exists");
        conn.fwd_cnt_sent = conn.fwd_cnt;
        Packet {
            hdr: Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: conn.local_port,
                dst_port: conn.peer_port,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: CONN_BUF_ALLOC,
                fwd_cnt: conn.fwd_cnt.0,
            },
            data: Vec::new(),
        }
    }

    /// Tells the guest about freed buffer space once half of it has been forwarded.
    fn maybe_credit_update(&mut self, fd: RawFd) {
        let Some(conn) = self.conns.get(&fd) else {
            return;
        };
        if (conn.fwd_cnt - conn.fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 2 {
            let pkt = self.packet_for(fd, OP_CREDIT_UPDATE);
            self.to_guest.push_back(pkt);
        }
    }

    fn rearm(&mut self, fd: RawFd) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        let wanted = conn.wanted_events();
        if wanted == conn.interest {
            return;
        }
        let op = if conn.interest.is_empty() {
            ControlOperation::Add
        } else if wanted.is_empty() {
            ControlOperation::Delete
        } else {
            ControlOperation::Modify
        };
        match self.epoll.ctl(op, fd, EpollEvent::new(wanted, fd as u64)) {
            Ok(()) => conn.interest = wanted,
            Err(e) => tracing::warn!("vsock: epoll_ctl failed: {e}"),
        }
    }

    /// Ends a connection both sides shut: the guest may free its socket.
    fn finish(&mut self, fd: RawFd) {
        let pkt = self.packet_for(fd, OP_RST);
        self.to_guest.push_back(pkt);
        self.close(fd);
    }

    /// Drops a connection without telling the guest.
    fn close(&mut self, fd: RawFd) {
        if let Some(conn) = self.conns.remove(&fd) {
            if !conn.interest.is_empty() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.ports.remove(&(conn.local_port, conn.peer_port));
        }
    }

    /// Tells the guest the connection is gone, then drops it.
    fn reset(&mut self, fd: RawFd) {
        if self
            .conns
            .get(&fd)
            .is_some_and(|c| !matches!(c.state, State::AwaitConnect(_)))
        {
            let pkt = self.packet_for(fd, OP_RST);
            self.to_guest.push_back(pkt);
        }
        self.close(fd);
    }

    /// Handles one packet the driver sent.
    pub fn from_guest(&mut self, pkt: Packet) {
        let h = pkt.hdr;
        if h.dst_cid != HOST_CID || h.src_cid != self.guest_cid || h.type_ != TYPE_STREAM {
            tracing::debug!(?h, "vsock: packet with wrong address or type");
            if h.op != OP_RST {
                self.to_guest.push_back(Packet::reply_to(&h, OP_RST));
            }
            return;
        }
        let Some(&fd) = self.ports.get(&(h.dst_port, h.src_port)) else {
            match h.op {
                OP_REQUEST => self.guest_connect(&h),
                OP_RST => {}
                _ => self.to_guest.push_back(Packet::reply_to(&h, OP_RST)),
            }
            return;
        };
        let conn = self
            .conns
            .get_mut(&fd)
            .expect("port map and connections agree");
        conn.update_peer_credit(&h);
        match (h.op, &conn.state) {
            (OP_RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                let reply = format!("OK {}\n", conn.local_port);
                // Nothing has been written to this socket yet, so its buffer takes the short
                // line whole; a failure here means the client is gone.
                if let Err(e) = conn.stream.write_all(reply.as_bytes()) {
                    tracing::debug!("vsock: cannot answer CONNECT: {e}");
                    return self.reset(fd);
                }
            }
            (OP_RW, State::Established) => {
                if conn.pending.len() + pkt.data.len() > CONN_BUF_ALLOC as usize {
                    tracing::warn!("vsock: guest overran its credit on port {}", h.src_port);
                    return self.reset(fd);
                }
                conn.pending.extend(&pkt.data);
                if conn.flush().is_err() {
                    return self.reset(fd);
                }
                self.maybe_credit_update(fd);
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, State::Established) => {
                let pkt = self.packet_for(fd, OP_CREDIT_UPDATE);
                self.to_guest.push_back(pkt);
            }
            (OP_SHUTDOWN, State::Established) => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    conn.peer_done_sending = true;
                    let _ = conn.flush();
                }
                if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    // Both directions are done: finish once what the guest sent has reached
                    // the host socket (a slow reader may still hold some of it back).
                    if conn.pending.is_empty() {
                        return self.finish(fd);
                    }
                    conn.peer_gone = true;
                }
            }
            (OP_RST, _) => return self.close(fd),
            (op, state) => {
                tracing::debug!(op, ?state, "vsock: unexpected packet for connection state");
                return self.reset(fd);
            }
        }
        self.rearm(fd);
    }

    fn guest_connect(&mut self, h: &Header) {
        let target = PathBuf::from(format!("{}_{}", self.path.display(), h.dst_port));
        let stream =
            match UnixStream::connect(&target).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("vsock: guest connect to {} failed: {e}", target.display());
                    self.to_guest.push_back(Packet::reply_to(h, OP_RST));
                    return;
                }
            };
        let fd = stream.as_raw_fd();
        let mut conn = Conn::new(stream, State::Established, h.dst_port, h.src_port);
        conn.update_peer_credit(h);
        self.conns.insert(fd, conn);
        self.ports.insert((h.dst_port, h.src_port), fd);
        let pkt = self.packet_for(fd, OP_RESPONSE);
        self.to_guest.push_back(pkt);
        self.rearm(fd);
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = text.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};

    const CID: u64 = 3;

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("shoal-mux-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs the muxer until it has a packet for the guest (or fails the test after 2 s).
    fn next_packet(m: &mut Muxer) -> Packet {
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            m.process_host_events();
            if let Some(p) = m.pop_to_guest() {
                return p;
            }
            assert!(Instant::now() < end, "no packet for the guest");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn no_packet(m: &mut Muxer) {
        for _ in 0..10 {
            m.process_host_events();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(m.pop_to_guest(), None);
    }

    fn guest_pkt(op: u16, src_port: u32, dst_port: u32) -> Packet {
        Packet {
            hdr: Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                type_: TYPE_STREAM,
                op,
                buf_alloc: 4096,
                ..Default::default()
            },
            data: Vec::new(),
        }
    }

    /// A host client connected to guest port 1024 through the muxer; returns it and its local port.
    fn connected(m: &mut Muxer, path: &Path) -> (UnixStream, BufReader<UnixStream>, u32) {
        let mut client = UnixStream::connect(path).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        let req = next_packet(m);
        assert_eq!(req.hdr.op, OP_REQUEST);
        assert_eq!(
            (req.hdr.src_cid, req.hdr.dst_cid, req.hdr.dst_port),
            (HOST_CID, CID, 1024)
        );
        assert!(req.hdr.src_port >= FIRST_LOCAL_PORT);
        assert_eq!(req.hdr.buf_alloc, CONN_BUF_ALLOC);
        let local = req.hdr.src_port;
        m.from_guest(guest_pkt(OP_RESPONSE, 1024, local));
        let mut reader = BufReader::new(client.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {local}\n"));
        (client, reader, local)
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    }

    #[test]
    fn host_to_guest_data_respects_guest_credit() {
        let dir = Dir::new("credit");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID).unwrap();
        let (mut client, _reader, local) = connected(&mut m, &path);
        client.write_all(&vec![7u8; 10_000]).unwrap();
        // The guest advertised 4096 bytes: no more than that may be in flight.
        let mut sent = 0;
        loop {
            m.process_host_events();
            match m.pop_to_guest() {
                Some(p) => {
                    assert_eq!(p.hdr.op, OP_RW);
                    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (local, 1024));
                    sent += p.data.len();
                }
                None if sent >= 4096 => break,
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        assert_eq!(sent, 4096);
        no_packet(&mut m);
        // The guest consumed 4096 bytes: another 4096 may flow.
        let mut update = guest_pkt(OP_CREDIT_UPDATE, 1024, local);
        update.hdr.fwd_cnt = 4096;
        m.from_guest(update);
        let mut more = 0;
        while more < 4096 {
            more += next_packet(&mut m).data.len();
        }
        assert_eq!(more, 4096);
        no_packet(&mut m);
    }

    #[test]
    fn guest_to_host_data_and_credit_updates() {
        let dir = Dir::new("fwd");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID).unwrap();
        let (_client, mut reader, local) = connected(&mut m, &path);
        let chunk = vec![1u8; 64 * 1024];
        let reader_thread = std::thread::spawn(move || {
            let mut got = vec![0u8; 3 * 64 * 1024];
            reader.read_exact(&mut got).unwrap();
            got
        });
        for _ in 0..3 {
            let mut p = guest_pkt(OP_RW, 1024, local);
            p.data = chunk.clone();
            m.from_guest(p);
        }
        let end = Instant::now() + Duration::from_secs(2);
        let mut update = None;
        while update.is_none() && Instant::now() < end {
            m.process_host_events();
            update = std::iter::from_fn(|| m.pop_to_guest()).find(|p| p.hdr.op == OP_CREDIT_UPDATE);
            std::thread::sleep(Duration::from_millis(2));
        }
        let update = update.expect("a credit update once half the buffer was forwarded");
        assert!(update.hdr.fwd_cnt >= CONN_BUF_ALLOC / 2);
        assert!(reader_thread.join().unwrap().iter().all(|b| *b == 1));
        // A credit request is answered with our counters.
        m.from_guest(guest_pkt(OP_CREDIT_REQUEST, 1024, local));
        let p = next_packet(&mut m);
        assert_eq!(p.hdr.op, OP_CREDIT_UPDATE);
        assert_eq!(p.hdr.fwd_cnt, 3 * 64 * 1024);
    }

    /// The guest sends data and closes while the host reader lags: every byte still
    /// reaches the host, and only then does the guest get its RST.
    #[test]
    fn guest_close_waits_for_its_data_to_reach_a_slow_host_reader() {
        let dir = Dir::new("slowclose");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID).unwrap();
        let (_client, mut reader, local) = connected(&mut m, &path);
        // More than a unix socket buffers: some stays pending in the muxer.
        let total = 4 * 64 * 1024;
        for _ in 0..4 {
            let mut p = guest_pkt(OP_RW, 1024, local);
            p.data = vec![5u8; 64 * 1024];
            m.from_guest(p);
        }
        let mut shutdown = guest_pkt(OP_SHUTDOWN, 1024, local);
        shutdown.hdr.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        m.from_guest(shutdown);
        assert_eq!(m.connection_count(), 1, "closed with data still pending");
        let reader_thread = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        let end = Instant::now() + Duration::from_secs(5);
        while m.connection_count() == 1 && Instant::now() < end {
            m.process_host_events();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(m.connection_count(), 0);
        let rst = std::iter::from_fn(|| m.pop_to_guest()).last().unwrap();
        assert_eq!(rst.hdr.op, OP_RST);
        let got = reader_thread.join().unwrap();
        assert_eq!(got.len(), total);
        assert!(got.iter().all(|b| *b == 5));
    }

    #[test]
    fn guest_overrunning_its_credit_is_reset() {
        let dir = Dir::new("overrun");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID).unwrap();
        // The client never reads, so everything the guest sends stays buffered.
        let (_client, _reader, local) = connected(&mut m, &path);
        let mut total = 0;
        while m.connection_count() == 1 && total < 4 * CONN_BUF_ALLOC as usize {
            let mut p = guest_pkt(OP_RW, 1024, local);
            p.data = vec![0u8; 64 * 1024];
            total += p.data.len();
            m.from_guest(p);
        }
        assert_eq!(m.connection_count(), 0);
        let rst = std::iter::from_fn(|| m.pop_to_guest()).last().unwrap();
        assert_eq!(rst.hdr.op, OP_RST);
    }

    #[test]
    fn guest_connects_to_host_port_sockets() {
        let dir = Dir::new("guest-init");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID).unwrap();
        let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
        m.from_guest(guest_pkt(OP_REQUEST, 40_000, 5000));
        let resp = m.pop_to_guest().unwrap();
        assert_eq!(resp.hdr.op, OP_RESPONSE);
        assert_eq!(
            (resp.hdr.src_port, resp.hdr.dst_port, resp.hdr.dst_cid),
            (5000, 40_000, CID)
        );
        let (mut server, _) = listener.accept().unwrap();
        let mut p = guest_pkt(OP_RW, 40_000, 5000);
        p.data = b"from guest".to_vec();
        m.from_guest(p);
        let mut buf = [0u8; 10];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"from guest");
        server.write_all(b"reply").unwrap();
        let p = next_packet(&mut m);
        assert_eq!((p.hdr.op, p.data.as_slice()), (OP_RW, &b"reply"[..]));
        // Host side closes: the guest is told no more data will come either way.
        drop(server);
        let p = next_packet(&mut m);
        assert_eq!(p.hdr.op, OP_SHUTDOWN);
        assert_eq!(p.hdr.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
        m.from_guest(guest_pkt(OP_RST, 40_000, 5000));
        assert_eq!(m.connection_count(), 0);

        // No socket for the port: the guest gets a reset.
        m.from_guest(guest_pkt(OP_REQUEST, 40_001, 5001));
        assert_eq!(m.pop_to_guest().unwrap().hdr.op, OP_RST);
    }

    #[test]
    fn stray_and_misaddressed_packets_are_reset() {
        let dir = Dir::new("stray");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID).unwrap();
        // Data for a connection that does not exist.
        m.from_guest(guest_pkt(OP_RW, 1, 2));
        let p = m.pop_to_guest().unwrap();
        assert_eq!((p.hdr.op, p.hdr.dst_port, p.hdr.src_port), (OP_RST, 1, 2));
        // A spoofed source CID.
        let mut spoof = guest_pkt(OP_REQUEST, 1, 2);
        spoof.hdr.src_cid = 99;
        m.from_guest(spoof);
        assert_eq!(m.pop_to_guest().unwrap().hdr.op, OP_RST);
        // Datagram type is not supported.
        let mut dgram = guest_pkt(OP_REQUEST, 1, 2);
        dgram.hdr.type_ = 3;
        m.from_guest(dgram);
        assert_eq!(m.pop_to_guest().unwrap().hdr.op, OP_RST);
        // A reset is never answered with a reset.
        m.from_guest(guest_pkt(OP_RST, 1, 2));
        assert_eq!(m.pop_to_guest(), None);
    }

    #[test]
    fn bad_connect_lines_close_the_client() {
        let dir = Dir::new("badline");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID).unwrap();
        for line in [&b"HELLO 1\n"[..], b"CONNECT abc\n", &[b'x'; 100]] {
            let mut c = UnixStream::connect(&path).unwrap();
            c.write_all(line).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            for _ in 0..5 {
                m.process_host_events();
            }
            let mut buf = [0u8; 8];
            // Closed: end of file, or a reset when the muxer left unread bytes behind.
            match c.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => panic!(
                    "client still open after {:?}: {other:?}",
                    String::from_utf8_lossy(line)
                ),
            }
        }
        assert_eq!(m.connection_count(), 0);
        assert_eq!(m.pop_to_guest(), None);
    }

    #[test]
    fn guest_refusal_closes_the_client() {
        let dir = Dir::new("refuse");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"CONNECT 77\n").unwrap();
        let req = next_packet(&mut m);
        m.from_guest(guest_pkt(OP_RST, 77, req.hdr.src_port));
        let mut buf = [0u8; 8];
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn socket_path_lifecycle() {
        let dir = Dir::new("path");
        let path = dir.0.join("v.sock");
        let m = Muxer::new(&path, CID).unwrap();
        assert!(path.exists());
        assert!(matches!(
            Muxer::new(&path, CID),
            Err(MuxerError::PathExists(_))
        ));
        drop(m);
        assert!(!path.exists());
        assert!(matches!(
            Muxer::new(&dir.0.join("missing/v.sock"), CID),
            Err(MuxerError::Bind { .. })
        ));
    }
}
