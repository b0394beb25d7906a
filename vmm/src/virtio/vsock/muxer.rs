//! The host side of hybrid vsock: one unix socket per VM.
//!
//! * Host → guest: a client connects to the VM's socket, writes `CONNECT <port>\n`; once the
//!   guest accepts, the muxer answers `OK <local port>\n` and the socket becomes a byte stream
//!   to the guest listener.
//! * Guest → host: a guest connection to host port P is joined to the unix socket `<path>_P`.
//!
//! The muxer owns the sockets, a shutdown timer and its own epoll set; the device thread
//! watches that set's fd. It consumes packets the driver sent (`from_guest`) and queues
//! packets for the driver (`pop_to_guest`). Flow control follows virtio-vsock credit: we never
//! send a connection more than the guest advertised, and we advertise a fixed buffer we keep.
//!
//! The guest is not trusted, so everything it can make the muxer hold is bounded
//! ([`GuestLimits`]):
//! * open connections, both directions together: `vsock_max_connections`; a guest REQUEST
//!   past it is answered with RST, a host client past it is closed before its `CONNECT` line
//!   is read (it reads end of file, as when the guest refuses);
//! * RSTs waiting for the guest: `vsock_max_pending_rsts`; past it, a stray packet gets no
//!   answer and a connection that ends is dropped without telling the guest;
//! * every other packet waiting for the guest belongs to an open connection, which has at
//!   most one REQUEST or RESPONSE, one SHUTDOWN, one CREDIT_UPDATE and [`MAX_QUEUED_RW`] data
//!   packets queued; a connection's packets leave the queue when it closes;
//! * guest→host bytes per connection: [`CONN_BUF_ALLOC`], the buffer we advertise (a guest
//!   that sends more is reset);
//! * a connection the host side has shut down lives at most `vsock_shutdown_timeout` after
//!   its SHUTDOWN has been handed to the guest, unless the guest answers (RST, or SHUTDOWN of
//!   both directions); then the muxer resets it itself. The clock does not run while the
//!   SHUTDOWN still waits in the queue: a slow guest would otherwise lose the data queued
//!   ahead of it, and a guest that never takes it is bounded by the connection limit;
//! * connecting to a host port never waits for the listener: a full backlog is refused.
use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;
use crate::GuestLimits;

/// Bytes of guest→host data we buffer per connection (advertised as `buf_alloc`).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Data packets (each at most [`READ_CHUNK`] bytes) one connection may have waiting for the
/// guest. The guest's credit alone does not bound them: the guest picks its `buf_alloc`
/// (up to 4 GiB) and need never post an RX buffer. Past it, the host socket is not read
/// until the guest takes some.
pub const MAX_QUEUED_RW: usize = 4;
/// First local port for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Each muxer starts its host-initiated connections at a random port this far above
/// [`FIRST_LOCAL_PORT`]. A VM restored from a template carries the guest's sockets of the
/// template's own connections (closing, their timers running); a muxer that numbered its
/// connections from the same port as the template's would give the restored sandbox's
/// first connections those very addresses, and the guest's late reset of an old socket
/// would close a new connection.
const LOCAL_PORT_SPREAD: u32 = 1 << 29;

/// Where a new muxer starts numbering its host-initiated connections.
fn first_local_port() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // std's hasher keys are random per process and differ between instances.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    FIRST_LOCAL_PORT + (random % u64::from(LOCAL_PORT_SPREAD)) as u32
}
/// Connection events the muxer remembers for [`Muxer::report`] (the oldest go first).
pub const EVENT_LOG_LEN: usize = 48;

/// One thing that happened to a connection, kept for the report on a connection that
/// broke. Fixed strings only: the guest can make events happen as fast as it sends
/// packets, so noting one costs no allocation and the log no more than its length. The
/// same event again, right after itself, is counted rather than kept twice.
#[derive(Clone, Copy, Debug)]
struct Event {
    /// When it last happened.
    at: Instant,
    local_port: u32,
    peer_port: u32,
    what: &'static str,
    /// The packet's op, where a packet made it happen.
    op: Option<u16>,
    /// How many times more it happened, in a row.
    again: u32,
}

/// Open connections [`Muxer::report`] lists (the rest are counted).
const REPORT_CONNECTIONS: usize = 16;

/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Host→guest bytes read from a socket at a time.
const READ_CHUNK: usize = MAX_PKT_DATA as usize;

/// Errors from the host side of vsock.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("vsock socket path {0} already exists; remove it or pick another")]
    PathExists(PathBuf),
    #[error("cannot create vsock socket {path}: {cause}")]
    Bind { path: PathBuf, cause: io::Error },
    #[error("cannot set up the vsock event set: {0}")]
    Epoll(io::Error),
    #[error("cannot create the vsock shutdown timer: {0}")]
    Timer(io::Error),
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
    /// `fwd_cnt` as the guest last saw it (in a packet it was handed).
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
    /// Packets of this connection in the muxer's queue for the guest (RSTs not counted).
    queued: usize,
    /// How many of them are data packets (at most [`MAX_QUEUED_RW`]).
    queued_rw: usize,
    /// A CREDIT_UPDATE is among them: another one would say nothing new (the header's
    /// counters are filled in when the packet is handed to the guest).
    credit_update_queued: bool,
    /// Our SHUTDOWN was handed to the guest: unless the guest answers by then (RST, or a
    /// SHUTDOWN of both directions), the connection is reset. `None` while it is queued.
    shutdown_deadline: Option<Instant>,
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
            queued: 0,
            queued_rw: 0,
            credit_update_queued: false,
            shutdown_deadline: None,
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

    /// Whether the host socket may be read: the guest has room and is taking what it got.
    fn may_read(&self) -> bool {
        !self.host_eof
            && !self.peer_gone
            && self.peer_credit() > 0
            && self.queued_rw < MAX_QUEUED_RW
    }

    /// The events the socket should be watched for, given the connection's state.
    fn wanted_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        match self.state {
            State::AwaitConnect(_) => ev |= EventSet::IN,
            State::Connecting => {}
            State::Established => {
                if self.may_read() {
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
    /// Packets for the guest: RSTs (`queued_rsts` of them) and packets of open connections
    /// (each connection counts its own).
    to_guest: VecDeque<Packet>,
    queued_rsts: usize,
    next_local_port: u32,
    max_connections: usize,
    max_pending_rsts: usize,
    shutdown_timeout: Duration,
    /// Fires at the earliest `shutdown_deadline` (non-blocking, in the epoll set).
    timer: TimerFd,
    /// When `timer` is set to fire; `None` while it is not set.
    timer_deadline: Option<Instant>,
    /// The last [`EVENT_LOG_LEN`] connection events, for [`Muxer::report`].
    events: VecDeque<Event>,
    /// When the muxer was made: events are reported as seconds since.
    born: Instant,
}

impl Muxer {
    /// Binds the VM's socket at `path` (which must not exist); `limits` bound what the guest
    /// can make the muxer hold.
    pub fn new(path: &Path, guest_cid: u64, limits: &GuestLimits) -> Result<Muxer, MuxerError> {
        if path.symlink_metadata().is_ok() {
            return Err(MuxerError::PathExists(path.into()));
        }
        let listener = UnixListener::bind(path).map_err(|source| MuxerError::Bind {
            path: path.into(),
            cause: source,
        })?;
        let cleanup = |e: MuxerError| {
            let _ = std::fs::remove_file(path);
            e
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| cleanup(MuxerError::Epoll(e)))?;
        let epoll = Epoll::new().map_err(|e| cleanup(MuxerError::Epoll(e)))?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| cleanup(MuxerError::Timer(e.into())))?;
        for fd in [listener.as_raw_fd(), timer.as_fd().as_raw_fd()] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .map_err(|e| cleanup(MuxerError::Epoll(e)))?;
        }
        Ok(Muxer {
            guest_cid,
            // Absolute, so a thread confined to its directory finds its port sockets.
            path: std::path::absolute(path).unwrap_or_else(|_| path.into()),
            listener,
            epoll,
            conns: HashMap::new(),
            ports: HashMap::new(),
            to_guest: VecDeque::new(),
            queued_rsts: 0,
            next_local_port: first_local_port(),
            max_connections: limits.vsock_max_connections,
            max_pending_rsts: limits.vsock_max_pending_rsts,
            shutdown_timeout: limits.vsock_shutdown_timeout,
            timer,
            timer_deadline: None,
            events: VecDeque::with_capacity(EVENT_LOG_LEN),
            born: Instant::now(),
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

    /// Where the muxer stands, for a report on a guest connection that broke or stopped
    /// answering: each open connection (ports, state, bytes held, packets queued, the
    /// guest's credit), what waits for the guest, and the last connection events with the
    /// seconds since the muxer was made.
    pub fn report(&self) -> String {
        let mut conns: Vec<&Conn> = self.conns.values().collect();
        conns.sort_by_key(|c| (c.local_port, c.peer_port));
        let mut open: Vec<String> = conns
            .iter()
            .take(REPORT_CONNECTIONS)
            .map(|c| {
                let state = match c.state {
                    State::AwaitConnect(_) => "awaiting CONNECT",
                    State::Connecting => "connecting",
                    State::Established if c.peer_gone => "guest gone, draining",
                    State::Established if c.host_eof => "host closed",
                    State::Established => "established",
                };
                format!(
                    "{}->{} {state}: {} B for the host, {} packets queued, guest credit {}",
                    c.local_port,
                    c.peer_port,
                    c.pending.len(),
                    c.queued,
                    c.peer_credit()
                )
            })
            .collect();
        if conns.len() > REPORT_CONNECTIONS {
            open.push(format!("and {} more", conns.len() - REPORT_CONNECTIONS));
        }
        let events: Vec<String> = self
            .events
            .iter()
            .map(|e| {
                let op = e.op.map(|op| format!(" (op {op})")).unwrap_or_default();
                let again = match e.again {
                    0 => String::new(),
                    n => format!(", {} times in a row, the last at that time", n + 1),
                };
                format!(
                    "{:.3} {}->{} {}{op}{again}",
                    e.at.saturating_duration_since(self.born).as_secs_f64(),
                    e.local_port,
                    e.peer_port,
                    e.what
                )
            })
            .collect();
        format!(
            "vsock connections: {}; {} packets wait for the guest ({} of them RSTs); \
             last events (s since the device was made, host port->guest port):\n    {}",
            if open.is_empty() {
                "none".to_string()
            } else {
                open.join("; ")
            },
            self.to_guest.len(),
            self.queued_rsts,
            if events.is_empty() {
                "none".to_string()
            } else {
                events.join("\n    ")
            }
        )
    }

    /// Keeps `what` happening to the connection between `local_port` and `peer_port` in
    /// the event log.
    fn note(&mut self, local_port: u32, peer_port: u32, what: &'static str, op: Option<u16>) {
        if let Some(last) = self.events.back_mut() {
            if (last.local_port, last.peer_port, last.what, last.op)
                == (local_port, peer_port, what, op)
            {
                last.again = last.again.saturating_add(1);
                last.at = Instant::now();
                return;
            }
        }
        if self.events.len() == EVENT_LOG_LEN {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            at: Instant::now(),
            local_port,
            peer_port,
            what,
            op,
            again: 0,
        });
    }

    /// [`Muxer::note`] for connection `fd`.
    fn note_conn(&mut self, fd: RawFd, what: &'static str) {
        if let Some(c) = self.conns.get(&fd) {
            let (l, p) = (c.local_port, c.peer_port);
            self.note(l, p, what, None);
        }
    }

    /// [`Muxer::note`] for a packet from the guest (its host port first).
    fn note_packet(&mut self, h: &Header, what: &'static str) {
        self.note(h.dst_port, h.src_port, what, Some(h.op));
    }

    /// Packets waiting for the guest, RSTs included (for tests and stats).
    pub fn queued_for_guest(&self) -> usize {
        self.to_guest.len()
    }

    /// RSTs waiting for the guest (for tests and stats).
    pub fn queued_rsts(&self) -> usize {
        self.queued_rsts
    }

    /// The next packet for the guest, if any. A connection's packet leaves with the
    /// connection's current credit in it; a SHUTDOWN leaving starts the connection's
    /// shutdown clock.
    pub fn pop_to_guest(&mut self) -> Option<Packet> {
        let mut pkt = self.to_guest.pop_front()?;
        if pkt.hdr.op == OP_RST {
            self.queued_rsts = self.queued_rsts.saturating_sub(1);
            return Some(pkt);
        }
        if let Some(&fd) = self.ports.get(&(pkt.hdr.src_port, pkt.hdr.dst_port)) {
            let conn = self
                .conns
                .get_mut(&fd)
                .expect("port map and connections agree");
            conn.queued = conn.queued.saturating_sub(1);
            let mut shutdown_deadline = None;
            match pkt.hdr.op {
                OP_RW => conn.queued_rw = conn.queued_rw.saturating_sub(1),
                OP_CREDIT_UPDATE => conn.credit_update_queued = false,
                // Once the guest shut both directions, only the host reader is left to wait
                // for (see `from_guest`): no clock for that.
                OP_SHUTDOWN if !conn.peer_gone => {
                    let deadline = Instant::now() + self.shutdown_timeout;
                    conn.shutdown_deadline = Some(deadline);
                    shutdown_deadline = Some(deadline);
                }
                _ => {}
            }
            pkt.hdr.buf_alloc = CONN_BUF_ALLOC;
            pkt.hdr.fwd_cnt = conn.fwd_cnt.0;
            conn.fwd_cnt_sent = conn.fwd_cnt;
            // Half the data room is free again: watch the host socket if it was left alone.
            // Not sooner: the rest of a packet split over RX buffers is put back with
            // `push_front_to_guest`, and must not bring the count back up to the limit.
            if conn.queued_rw <= MAX_QUEUED_RW / 2 {
                self.rearm(fd);
            }
            // Every deadline is the same time after its SHUTDOWN left, so they come in the
            // order set: a timer already set fires first, and then sets itself for the next.
            if shutdown_deadline.is_some() && self.timer_deadline.is_none() {
                self.set_timer(shutdown_deadline);
            }
            let handed = match pkt.hdr.op {
                OP_REQUEST => Some("REQUEST handed to the guest"),
                OP_RESPONSE => Some("RESPONSE handed to the guest"),
                OP_SHUTDOWN => Some("SHUTDOWN handed to the guest"),
                _ => None,
            };
            if let Some(what) = handed {
                self.note(pkt.hdr.src_port, pkt.hdr.dst_port, what, None);
            }
        }
        Some(pkt)
    }

    /// Puts back the unsent rest of a packet at the head of the queue.
    pub fn push_front_to_guest(&mut self, pkt: Packet) {
        if pkt.hdr.op == OP_RST {
            self.queued_rsts += 1;
        } else {
            let Some(&fd) = self.ports.get(&(pkt.hdr.src_port, pkt.hdr.dst_port)) else {
                // Its connection is gone, and with it whatever it had queued.
                return;
            };
            let conn = self
                .conns
                .get_mut(&fd)
                .expect("port map and connections agree");
            conn.queued += 1;
            match pkt.hdr.op {
                OP_RW => conn.queued_rw += 1,
                OP_CREDIT_UPDATE => conn.credit_update_queued = true,
                // It did not reach the guest after all: the clock waits for it again. (A
                // stale timer finds nothing expired and sets itself for the next deadline.)
                OP_SHUTDOWN => conn.shutdown_deadline = None,
                _ => {}
            }
            if matches!(pkt.hdr.op, OP_REQUEST | OP_RESPONSE | OP_SHUTDOWN) {
                let (l, p) = (pkt.hdr.src_port, pkt.hdr.dst_port);
                self.note(
                    l,
                    p,
                    "not handed after all: put back in the queue",
                    Some(pkt.hdr.op),
                );
            }
        }
        self.to_guest.push_front(pkt);
    }

    pub fn has_packets_for_guest(&self) -> bool {
        !self.to_guest.is_empty()
    }

    /// Queues a packet of connection `fd` for the guest.
    fn push_for_conn(&mut self, fd: RawFd, pkt: Packet) {
        let conn = self.conns.get_mut(&fd).expect("connection exists");
        conn.queued += 1;
        match pkt.hdr.op {
            OP_RW => conn.queued_rw += 1,
            OP_CREDIT_UPDATE => conn.credit_update_queued = true,
            _ => {}
        }
        self.to_guest.push_back(pkt);
    }

    /// Queues an RST for the guest if fewer than `max_pending_rsts` wait already; otherwise
    /// drops it, and the guest gets no answer. Only a guest that leaves its RX queue empty
    /// reaches the limit, so it is the one to miss the answer.
    fn push_rst(&mut self, pkt: Packet) {
        if self.queued_rsts >= self.max_pending_rsts {
            crate::guest_warn!(
                "vsock: {} RSTs already wait for the guest; dropping one",
                self.queued_rsts
            );
            return;
        }
        self.queued_rsts += 1;
        self.to_guest.push_back(pkt);
    }

    /// Serves every socket that is ready, and the shutdown timer, without blocking.
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
                } else if fd == self.timer.as_fd().as_raw_fd() {
                    self.expire_shutdowns();
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
                    if self.conns.len() >= self.max_connections {
                        // Dropping the stream closes it: the client reads end of file, the
                        // same as for a guest that refuses (the protocol has no error line).
                        crate::guest_warn!(
                            "vsock: {} connections open, the most a VM may have; \
                             closing a host client",
                            self.conns.len()
                        );
                        continue;
                    }
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
                    crate::guest_warn!("vsock: accept on {} failed: {e}", self.path.display());
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
                        self.note_conn(fd, "host socket write failed; reset");
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
        self.push_for_conn(fd, pkt);
        self.note(
            local_port,
            port,
            "host client asked to connect; REQUEST queued",
            None,
        );
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
        if !conn.may_read() {
            return;
        }
        let want = (conn.peer_credit() as usize).min(READ_CHUNK);
        let mut buf = vec![0u8; want];
        match conn.stream.read(&mut buf) {
            Ok(0) => {
                conn.host_eof = true;
                // The shutdown clock starts when this leaves the queue (`pop_to_guest`).
                let mut pkt = self.packet_for(fd, OP_SHUTDOWN);
                pkt.hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                self.push_for_conn(fd, pkt);
                self.note_conn(fd, "host client closed; SHUTDOWN queued");
            }
            Ok(n) => {
                buf.truncate(n);
                conn.tx_cnt += Wrapping(n as u32);
                let mut pkt = self.packet_for(fd, OP_RW);
                pkt.data = buf;
                self.push_for_conn(fd, pkt);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => {
                tracing::debug!("vsock: host socket read failed: {e}");
                self.note_conn(fd, "host socket read failed; reset");
                self.reset(fd);
            }
        }
    }

    /// Sets the shutdown timer to fire at `at`, or stops it.
    fn set_timer(&mut self, at: Option<Instant>) {
        let result = match at {
            Some(at) => {
                // Zero would stop the timer rather than fire it at once.
                let after = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                self.timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(after)),
                    TimerSetTimeFlags::empty(),
                )
            }
            None => self.timer.unset(),
        };
        match result {
            Ok(()) => self.timer_deadline = at,
            Err(e) => {
                // The next SHUTDOWN tries again.
                self.timer_deadline = None;
                crate::guest_warn!("vsock: cannot set the shutdown timer: {e}");
            }
        }
    }

    /// Ends each connection whose guest has not answered our SHUTDOWN in time, then sets
    /// the timer for the next deadline.
    fn expire_shutdowns(&mut self) {
        // Non-blocking: takes the expiry count so the timer stops being readable.
        let _ = self.timer.wait();
        let now = Instant::now();
        let expired: Vec<RawFd> = self
            .conns
            .iter()
            .filter(|(_, c)| c.shutdown_deadline.is_some_and(|d| d <= now))
            .map(|(&fd, _)| fd)
            .collect();
        for fd in expired {
            tracing::debug!("vsock: guest did not answer SHUTDOWN in time; resetting");
            self.note_conn(fd, "guest did not answer SHUTDOWN in time; reset");
            self.reset(fd);
        }
        let next = self
            .conns
            .values()
            .filter_map(|c| c.shutdown_deadline)
            .min();
        self.set_timer(next);
    }

    /// A packet for connection `fd`. Its credit fields are filled in again when it is handed
    /// to the guest.
    fn packet_for(&self, fd: RawFd, op: u16) -> Packet {
        let conn = self.conns.get(&fd).expect("connection exists");
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

    /// Queues a CREDIT_UPDATE for connection `fd` unless one is queued already.
    fn queue_credit_update(&mut self, fd: RawFd) {
        if self.conns.get(&fd).is_some_and(|c| !c.credit_update_queued) {
            let pkt = self.packet_for(fd, OP_CREDIT_UPDATE);
            self.push_for_conn(fd, pkt);
        }
    }

    /// Tells the guest about freed buffer space once half of it has been forwarded.
    fn maybe_credit_update(&mut self, fd: RawFd) {
        let Some(conn) = self.conns.get(&fd) else {
            return;
        };
        if (conn.fwd_cnt - conn.fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 2 {
            self.queue_credit_update(fd);
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
            Err(e) => crate::guest_warn!("vsock: epoll_ctl failed: {e}"),
        }
    }

    /// Ends a connection both sides shut: the guest may free its socket.
    fn finish(&mut self, fd: RawFd) {
        self.note_conn(fd, "both sides shut; RST queued, connection ended");
        let pkt = self.packet_for(fd, OP_RST);
        self.close(fd);
        self.push_rst(pkt);
    }

    /// Drops a connection, and its packets still waiting for the guest, without telling the
    /// guest.
    fn close(&mut self, fd: RawFd) {
        if let Some(conn) = self.conns.remove(&fd) {
            if !conn.interest.is_empty() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            let key = (conn.local_port, conn.peer_port);
            // Only if the entry is this connection's: a host client still sending its
            // CONNECT line has the pair (0, 0), which may be a guest connection's too.
            if self.ports.get(&key) == Some(&fd) {
                self.ports.remove(&key);
            }
            if conn.queued > 0 {
                self.to_guest
                    .retain(|p| p.hdr.op == OP_RST || (p.hdr.src_port, p.hdr.dst_port) != key);
            }
        }
    }

    /// Tells the guest the connection is gone (if the RST queue has room), then drops it.
    fn reset(&mut self, fd: RawFd) {
        let rst = self
            .conns
            .get(&fd)
            .filter(|c| !matches!(c.state, State::AwaitConnect(_)))
            .map(|_| self.packet_for(fd, OP_RST));
        self.close(fd);
        if let Some(pkt) = rst {
            self.push_rst(pkt);
        }
    }

    /// Handles one packet the driver sent.
    pub fn from_guest(&mut self, pkt: Packet) {
        let h = pkt.hdr;
        if h.dst_cid != HOST_CID || h.src_cid != self.guest_cid || h.type_ != TYPE_STREAM {
            tracing::debug!(?h, "vsock: packet with wrong address or type");
            self.note_packet(&h, "packet with a wrong CID or type");
            if h.op != OP_RST {
                self.push_rst(Packet::reply_to(&h, OP_RST));
            }
            return;
        }
        let Some(&fd) = self.ports.get(&(h.dst_port, h.src_port)) else {
            match h.op {
                OP_REQUEST => self.guest_connect(&h),
                OP_RST => self.note_packet(&h, "RST for no connection"),
                _ => {
                    self.note_packet(&h, "packet for no connection; RST queued");
                    self.push_rst(Packet::reply_to(&h, OP_RST))
                }
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
                    self.note_packet(&h, "guest accepted, host client gone; reset");
                    return self.reset(fd);
                }
                self.note_packet(&h, "guest accepted; OK sent to the host client");
            }
            (OP_RW, State::Established) => {
                if conn.pending.len() + pkt.data.len() > CONN_BUF_ALLOC as usize {
                    crate::guest_warn!("vsock: guest overran its credit on port {}", h.src_port);
                    self.note_packet(&h, "guest overran its credit; reset");
                    return self.reset(fd);
                }
                conn.pending.extend(&pkt.data);
                if conn.flush().is_err() {
                    self.note_packet(&h, "host socket write failed; reset");
                    return self.reset(fd);
                }
                self.maybe_credit_update(fd);
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, State::Established) => self.queue_credit_update(fd),
            (OP_SHUTDOWN, State::Established) => {
                self.note_packet(
                    &h,
                    match h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) {
                        SHUTDOWN_SEND => "guest shut its sending side",
                        SHUTDOWN_RCV => "guest shut its receiving side",
                        0 => "guest SHUTDOWN without flags",
                        _ => "guest shut both sides",
                    },
                );
                let conn = self.conns.get_mut(&fd).expect("looked up above");
                if h.flags & SHUTDOWN_SEND != 0 {
                    conn.peer_done_sending = true;
                    let _ = conn.flush();
                }
                if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    // Both directions are done: finish once what the guest sent has reached
                    // the host socket (a slow reader may still hold some of it back). That
                    // wait is the host's, not the guest's: no deadline for it.
                    conn.shutdown_deadline = None;
                    if conn.pending.is_empty() {
                        return self.finish(fd);
                    }
                    conn.peer_gone = true;
                }
            }
            (OP_RST, State::Connecting) => {
                self.note_packet(&h, "guest refused the connection (RST)");
                return self.close(fd);
            }
            (OP_RST, _) => {
                self.note_packet(&h, "guest reset the connection");
                return self.close(fd);
            }
            (op, state) => {
                tracing::debug!(op, ?state, "vsock: unexpected packet for connection state");
                self.note_packet(&h, "packet unexpected in the connection's state; reset");
                return self.reset(fd);
            }
        }
        self.rearm(fd);
    }

    fn guest_connect(&mut self, h: &Header) {
        if self.conns.len() >= self.max_connections {
            crate::guest_warn!(
                "vsock: {} connections open, the most a VM may have; refusing the guest's",
                self.conns.len()
            );
            self.note_packet(h, "guest connection past the limit; RST queued");
            return self.push_rst(Packet::reply_to(h, OP_RST));
        }
        // Under the thread's chroot (confine.rs) the socket's directory is its root.
        let target = crate::confine::host_path(&PathBuf::from(format!(
            "{}_{}",
            self.path.display(),
            h.dst_port
        )));
        let stream = match connect_nonblocking(&target) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest connect to {} failed: {e}", target.display());
                self.note_packet(h, "guest connected to a host port nobody takes; RST queued");
                return self.push_rst(Packet::reply_to(h, OP_RST));
            }
        };
        let fd = stream.as_raw_fd();
        let mut conn = Conn::new(stream, State::Established, h.dst_port, h.src_port);
        conn.update_peer_credit(h);
        self.conns.insert(fd, conn);
        self.ports.insert((h.dst_port, h.src_port), fd);
        let pkt = self.packet_for(fd, OP_RESPONSE);
        self.push_for_conn(fd, pkt);
        self.note_packet(h, "guest connected to a host port; RESPONSE queued");
        self.rearm(fd);
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Connects a non-blocking stream socket to the unix socket at `path`. Unlike
/// `UnixStream::connect`, it never waits: when the listener's backlog is full it fails at
/// once (EAGAIN) instead of holding the device thread until the listener accepts.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Room is left for the terminating NUL (the zeroed last byte).
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "not a usable unix socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created here and owned by nothing else; the stream
    // takes it over and closes it when dropped (on the error path below too).
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call, and `len` is no
    // larger than its size (the path was checked to fit); connect(2) only reads it.
    let ret = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
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

    /// A template's muxer and its restored copy's: their first connections must not have
    /// the same addresses, or the guest's late reset of the template's socket closes the
    /// copy's connection (seen as "early eof" on a restored sandbox's agent connection).
    #[test]
    fn each_muxer_numbers_its_connections_from_its_own_port() {
        let dir = Dir::new("ports");
        let firsts: Vec<u32> = (0..2)
            .map(|i| {
                let path = dir.0.join(format!("v{i}.sock"));
                let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
                connected(&mut m, &path).2
            })
            .collect();
        assert!(firsts.iter().all(|p| *p >= FIRST_LOCAL_PORT), "{firsts:?}");
        assert_ne!(firsts[0], firsts[1]);
    }

    #[test]
    fn host_to_guest_data_respects_guest_credit() {
        let dir = Dir::new("credit");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
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
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
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
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
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
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
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
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
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
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
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
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
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
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"CONNECT 77\n").unwrap();
        let req = next_packet(&mut m);
        m.from_guest(guest_pkt(OP_RST, 77, req.hdr.src_port));
        let mut buf = [0u8; 8];
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        assert_eq!(m.connection_count(), 0);
    }

    /// The report names each open connection and tells, in order, what happened to the
    /// ones that ended: here one the guest refused, one it accepted and then reset, and
    /// one still open; a flood of stray packets keeps no more events than the log holds.
    #[test]
    fn the_report_tells_what_happened_to_each_connection() {
        let dir = Dir::new("report");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
        assert!(
            m.report().starts_with("vsock connections: none;"),
            "{}",
            m.report()
        );

        let mut refused = UnixStream::connect(&path).unwrap();
        refused.write_all(b"CONNECT 77\n").unwrap();
        let req = next_packet(&mut m);
        m.from_guest(guest_pkt(OP_RST, 77, req.hdr.src_port));
        let (_reset, _, reset_port) = connected(&mut m, &path);
        m.from_guest(guest_pkt(OP_RST, 1024, reset_port));
        let (_open, _, open_port) = connected(&mut m, &path);

        let report = m.report();
        let refused_port = req.hdr.src_port;
        assert!(
            report.contains(&format!("{open_port}->1024 established")),
            "{report}"
        );
        assert!(!report.contains(&format!("{reset_port}->1024 established")));
        let order = [
            format!("{refused_port}->77 host client asked to connect; REQUEST queued"),
            format!("{refused_port}->77 REQUEST handed to the guest"),
            format!("{refused_port}->77 guest refused the connection (RST) (op {OP_RST})"),
            format!("{reset_port}->1024 guest accepted; OK sent to the host client"),
            format!("{reset_port}->1024 guest reset the connection (op {OP_RST})"),
            format!("{open_port}->1024 guest accepted; OK sent to the host client"),
        ];
        let mut at = 0;
        for line in &order {
            let found = report[at..].find(line.as_str());
            assert!(
                found.is_some(),
                "{line:?} not after byte {at} of:\n{report}"
            );
            at += found.unwrap() + line.len();
        }

        for i in 0..1000 {
            m.from_guest(guest_pkt(OP_RW, 5000 + i, 6000));
        }
        let report = m.report();
        let events = report.lines().skip(1).count();
        assert_eq!(events, EVENT_LOG_LEN, "{report}");
        assert!(report.ends_with(&format!(
            "6000->5999 packet for no connection; RST queued (op {OP_RW})"
        )));
        // The same packet again and again is one event, counted.
        for _ in 0..100 {
            m.from_guest(guest_pkt(OP_RW, 7000, 6000));
        }
        let report = m.report();
        assert!(
            report.ends_with(&format!(
                "6000->7000 packet for no connection; RST queued (op {OP_RW}), 100 times in a row, the last at that time"
            )),
            "{report}"
        );
        assert!(report.contains("6000->5999 packet for no connection"));
    }

    #[test]
    fn socket_path_lifecycle() {
        let dir = Dir::new("path");
        let path = dir.0.join("v.sock");
        let m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
        assert!(path.exists());
        assert!(matches!(
            Muxer::new(&path, CID, &GuestLimits::default()),
            Err(MuxerError::PathExists(_))
        ));
        drop(m);
        assert!(!path.exists());
        assert!(matches!(
            Muxer::new(&dir.0.join("missing/v.sock"), CID, &GuestLimits::default()),
            Err(MuxerError::Bind { .. })
        ));
    }

    /// The process's resident set, in KiB.
    fn vm_rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// A guest that sends a million packets nobody asked for and never posts an RX buffer
    /// gets at most `vsock_max_pending_rsts` RSTs queued; the rest go unanswered, and the
    /// host's memory does not grow with the flood.
    ///
    /// The flood runs in a test process of its own (this test binary, run again for this
    /// test alone): the resident set is the whole process's, and tests running beside it
    /// in one process make it grow by tens of MiB.
    #[test]
    fn a_flood_of_stray_packets_queues_no_more_rsts_than_the_limit() {
        const CHILD: &str = "SHOAL_VSOCK_FLOOD_CHILD";
        if std::env::var_os(CHILD).is_some() {
            return stray_packet_flood();
        }
        let module = module_path!().split_once("::").unwrap().1;
        let name = format!("{module}::a_flood_of_stray_packets_queues_no_more_rsts_than_the_limit");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name.as_str(), "--exact", "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "flood process failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stray_packet_flood() {
        let dir = Dir::new("flood");
        let path = dir.0.join("v.sock");
        let limits = GuestLimits::default();
        let mut m = Muxer::new(&path, CID, &limits).unwrap();
        let rss_before = vm_rss_kib();
        let mut most = 0;
        for i in 0..1_000_000u32 {
            let pkt = match i % 5 {
                // Data for a connection that does not exist.
                0 => guest_pkt(OP_RW, i, 7),
                // An op virtio-vsock does not have.
                1 => guest_pkt(0x99, i, 7),
                // A spoofed source CID.
                2 => {
                    let mut p = guest_pkt(OP_SHUTDOWN, i, 7);
                    p.hdr.src_cid = 99;
                    p
                }
                // Resets are never answered.
                3 => guest_pkt(OP_RST, i, 7),
                // Connection requests to host ports nobody listens on.
                _ => guest_pkt(OP_REQUEST, i, 7 + (i & 0xff)),
            };
            m.from_guest(pkt);
            most = most.max(m.queued_for_guest());
        }
        let grown_kib = vm_rss_kib().saturating_sub(rss_before);
        assert_eq!(most, limits.vsock_max_pending_rsts);
        assert_eq!(m.queued_rsts(), limits.vsock_max_pending_rsts);
        assert_eq!(m.connection_count(), 0);
        // Unbounded, the 800,000 RSTs would take over 50 MiB.
        assert!(
            grown_kib < 16 * 1024,
            "resident set grew by {grown_kib} KiB during the flood"
        );
        // The guest takes the queued RSTs; after that, stray packets are answered again.
        let taken: Vec<Packet> = std::iter::from_fn(|| m.pop_to_guest()).collect();
        assert_eq!(taken.len(), limits.vsock_max_pending_rsts);
        assert!(taken.iter().all(|p| p.hdr.op == OP_RST));
        assert_eq!(m.queued_rsts(), 0);
        m.from_guest(guest_pkt(OP_RW, 1, 2));
        assert_eq!(m.pop_to_guest().unwrap().hdr.op, OP_RST);
    }

    /// With room for four connections, four guest requests are served and the fifth is
    /// reset without a host socket; a host client past the limit is closed and the guest
    /// hears nothing of it. Once a connection ends, a host client gets through again.
    #[test]
    fn connections_past_the_limit_are_refused_both_ways() {
        let dir = Dir::new("connlimit");
        let path = dir.0.join("v.sock");
        let limits = GuestLimits {
            vsock_max_connections: 4,
            ..GuestLimits::default()
        };
        let mut m = Muxer::new(&path, CID, &limits).unwrap();
        let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
        listener.set_nonblocking(true).unwrap();
        for port in 40_000..40_004 {
            m.from_guest(guest_pkt(OP_REQUEST, port, 5000));
            let p = m.pop_to_guest().unwrap();
            assert_eq!((p.hdr.op, p.hdr.dst_port), (OP_RESPONSE, port));
        }
        let mut servers: Vec<UnixStream> = (0..4).map(|_| listener.accept().unwrap().0).collect();
        assert_eq!(m.connection_count(), 4);

        m.from_guest(guest_pkt(OP_REQUEST, 40_004, 5000));
        let p = m.pop_to_guest().unwrap();
        assert_eq!((p.hdr.op, p.hdr.dst_port), (OP_RST, 40_004));
        assert_eq!(
            listener.accept().unwrap_err().kind(),
            ErrorKind::WouldBlock,
            "the refused request reached the host port"
        );
        assert_eq!(m.connection_count(), 4);
        // The four still carry data.
        for (i, server) in servers.iter_mut().enumerate() {
            let mut p = guest_pkt(OP_RW, 40_000 + i as u32, 5000);
            p.data = vec![i as u8; 3];
            m.from_guest(p);
            let mut got = [0u8; 3];
            server.read_exact(&mut got).unwrap();
            assert_eq!(got, [i as u8; 3]);
        }

        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        for _ in 0..5 {
            m.process_host_events();
        }
        let mut buf = [0u8; 8];
        match client.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("client past the limit still open: {other:?}"),
        }
        assert_eq!(m.pop_to_guest(), None, "the guest was asked to connect");
        assert_eq!(m.connection_count(), 4);

        m.from_guest(guest_pkt(OP_RST, 40_000, 5000));
        assert_eq!(m.connection_count(), 3);
        let _ok = connected(&mut m, &path);
        assert_eq!(m.connection_count(), 4);
    }

    /// An epoll set that wakes when the muxer's own fd does.
    fn watch_muxer(m: &Muxer) -> Epoll {
        let watcher = Epoll::new().unwrap();
        watcher
            .ctl(
                ControlOperation::Add,
                m.epoll_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        watcher
    }

    /// Waits for `watcher` to wake (the muxer's timer), no sooner than `timeout` after `since`.
    fn fires_after(watcher: &Epoll, since: Instant, timeout: Duration) {
        let mut ev = [EpollEvent::default(); 1];
        assert_eq!(
            watcher.wait(2000, &mut ev).unwrap(),
            1,
            "the timer never fired"
        );
        assert!(
            since.elapsed() >= timeout,
            "fired after {:?}",
            since.elapsed()
        );
    }

    /// A muxer in a fresh directory whose shut-down connections wait `timeout` for the guest.
    fn muxer_with_shutdown_timeout(name: &str, timeout: Duration) -> (Dir, PathBuf, Muxer) {
        let dir = Dir::new(name);
        let path = dir.0.join("v.sock");
        let limits = GuestLimits {
            vsock_shutdown_timeout: timeout,
            ..GuestLimits::default()
        };
        let m = Muxer::new(&path, CID, &limits).unwrap();
        (dir, path, m)
    }

    /// The host client stops sending on two connections, so SHUTDOWN is queued for the guest
    /// on both; while the guest takes nothing, no clock runs. Then the guest takes them,
    /// answers one with RST and never the other: that one is reset and its host socket
    /// closed the timeout after its SHUTDOWN left, woken by the muxer's fd alone. A third,
    /// untouched connection goes on.
    #[test]
    fn a_shutdown_the_guest_leaves_unanswered_ends_after_the_timeout() {
        let timeout = Duration::from_millis(50);
        let (_dir, path, mut m) = muxer_with_shutdown_timeout("killtimer", timeout);
        let (silent, mut silent_reader, silent_port) = connected(&mut m, &path);
        let (answers, mut answers_reader, answers_port) = connected(&mut m, &path);
        let (mut open, _open_reader, open_port) = connected(&mut m, &path);
        silent.shutdown(Shutdown::Write).unwrap();
        answers.shutdown(Shutdown::Write).unwrap();
        let end = Instant::now() + Duration::from_secs(2);
        while m.queued_for_guest() < 2 {
            assert!(Instant::now() < end, "no SHUTDOWN queued");
            m.process_host_events();
            std::thread::sleep(Duration::from_millis(2));
        }
        // Queued but not taken: the timeout passes several times over and nothing ends.
        std::thread::sleep(4 * timeout);
        m.process_host_events();
        assert_eq!(m.connection_count(), 3);
        assert_eq!(m.queued_for_guest(), 2);
        let sent = Instant::now();
        let mut shut = [m.pop_to_guest().unwrap(), m.pop_to_guest().unwrap()].map(|p| {
            assert_eq!(
                (p.hdr.op, p.hdr.flags),
                (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
            );
            p.hdr.src_port
        });
        shut.sort();
        let mut want = [silent_port, answers_port];
        want.sort();
        assert_eq!(shut, want);
        m.from_guest(guest_pkt(OP_RST, 1024, answers_port));
        assert_eq!(m.connection_count(), 2);
        let mut rest = Vec::new();
        answers_reader.read_to_end(&mut rest).unwrap();

        // Nothing but the timer can make the muxer's fd readable now.
        let watcher = watch_muxer(&m);
        let mut ev = [EpollEvent::default(); 1];
        fires_after(&watcher, sent, timeout);
        m.process_host_events();
        assert_eq!(m.connection_count(), 1);
        let rst = m.pop_to_guest().unwrap();
        assert_eq!(
            (rst.hdr.op, rst.hdr.src_port, rst.hdr.dst_port),
            (OP_RST, silent_port, 1024)
        );
        assert_eq!(
            m.pop_to_guest(),
            None,
            "the connection that answered was reset"
        );
        // The host client of the silent connection sees its socket closed.
        silent_reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        rest.clear();
        silent_reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        // The timer is stopped, not left readable.
        assert_eq!(
            watcher
                .wait(3 * timeout.as_millis() as i32, &mut ev)
                .unwrap(),
            0
        );

        open.write_all(b"still here").unwrap();
        let p = next_packet(&mut m);
        assert_eq!(
            (p.hdr.op, p.hdr.src_port, p.data.as_slice()),
            (OP_RW, open_port, &b"still here"[..])
        );
        assert_eq!(m.connection_count(), 1);
    }

    /// The host client writes its last bytes and closes while the guest takes nothing: the
    /// data and the SHUTDOWN wait in the queue however long that takes. The clock starts
    /// when the SHUTDOWN is handed over, and stops again if it is put back unsent.
    #[test]
    fn a_shutdown_still_queued_for_the_guest_starts_no_clock() {
        let timeout = Duration::from_millis(50);
        let (_dir, path, mut m) = muxer_with_shutdown_timeout("queuedshut", timeout);
        let (mut client, _reader, local) = connected(&mut m, &path);
        client.write_all(b"tail of stdin").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let end = Instant::now() + Duration::from_secs(2);
        while m.queued_for_guest() < 2 {
            assert!(Instant::now() < end, "data and SHUTDOWN not queued");
            m.process_host_events();
            std::thread::sleep(Duration::from_millis(2));
        }
        let watcher = watch_muxer(&m);
        let mut ev = [EpollEvent::default(); 1];
        assert_eq!(watcher.wait(200, &mut ev).unwrap(), 0, "a timer was set");
        m.process_host_events();
        assert_eq!(m.connection_count(), 1);
        assert_eq!(m.queued_for_guest(), 2);

        let data = m.pop_to_guest().unwrap();
        assert_eq!(
            (data.hdr.op, data.hdr.src_port, data.data.as_slice()),
            (OP_RW, local, &b"tail of stdin"[..])
        );
        // Handed over, then put back (say the RX buffer was unusable): no deadline left.
        let shut = m.pop_to_guest().unwrap();
        assert_eq!(shut.hdr.op, OP_SHUTDOWN);
        m.push_front_to_guest(shut);
        std::thread::sleep(4 * timeout);
        m.process_host_events();
        assert_eq!(m.connection_count(), 1);
        assert_eq!(m.queued_for_guest(), 1);

        let sent = Instant::now();
        assert_eq!(m.pop_to_guest().unwrap().hdr.op, OP_SHUTDOWN);
        fires_after(&watcher, sent, timeout);
        m.process_host_events();
        assert_eq!(m.connection_count(), 0);
        let rst = m.pop_to_guest().unwrap();
        assert_eq!((rst.hdr.op, rst.hdr.src_port), (OP_RST, local));
    }

    /// A host client that closes before its CONNECT line ends has the port pair (0, 0);
    /// closing it leaves alone a guest connection from port 0 to host port 0.
    #[test]
    fn closing_a_client_without_a_port_keeps_a_guest_connection_on_port_zero() {
        let dir = Dir::new("portzero");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
        let listener = UnixListener::bind(format!("{}_0", path.display())).unwrap();
        m.from_guest(guest_pkt(OP_REQUEST, 0, 0));
        assert_eq!(m.pop_to_guest().unwrap().hdr.op, OP_RESPONSE);
        let (mut server, _) = listener.accept().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();

        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONN").unwrap();
        let end = Instant::now() + Duration::from_secs(2);
        while m.connection_count() < 2 {
            assert!(Instant::now() < end, "client not accepted");
            m.process_host_events();
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(client);
        while m.connection_count() > 1 {
            assert!(Instant::now() < end, "client not closed");
            m.process_host_events();
            std::thread::sleep(Duration::from_millis(2));
        }

        let mut p = guest_pkt(OP_RW, 0, 0);
        p.data = b"still joined".to_vec();
        m.from_guest(p);
        let mut buf = [0u8; 12];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"still joined");
        assert_eq!(m.pop_to_guest(), None, "the guest connection was reset");
    }

    /// What one open connection can have waiting for a guest that takes nothing is bounded:
    /// host data however much credit the guest claims, credit updates however often it
    /// asks, and nothing is left behind by connections that come and go. Once the guest
    /// takes its packets, data flows again.
    #[test]
    fn an_open_connection_queues_a_bounded_number_of_packets() {
        let dir = Dir::new("connqueue");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
        let (client, _reader, local) = connected(&mut m, &path);
        let mut update = guest_pkt(OP_CREDIT_UPDATE, 1024, local);
        update.hdr.buf_alloc = u32::MAX;
        m.from_guest(update);
        // The client writes until its socket takes no more.
        client.set_nonblocking(true).unwrap();
        let chunk = vec![9u8; 64 * 1024];
        let mut written = 0;
        let mut stuck = 0;
        while stuck < 50 && written < 16 << 20 {
            match (&client).write(&chunk) {
                Ok(n) => {
                    written += n;
                    stuck = 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => stuck += 1,
                Err(e) => panic!("{e}"),
            }
            m.process_host_events();
        }
        let queued = m.queued_for_guest();
        assert!(
            (1..=MAX_QUEUED_RW).contains(&queued),
            "{queued} packets queued for the guest after {written} bytes"
        );
        let mut request = guest_pkt(OP_CREDIT_REQUEST, 1024, local);
        request.hdr.buf_alloc = u32::MAX;
        for _ in 0..10_000 {
            m.from_guest(request.clone());
        }
        assert_eq!(m.queued_for_guest(), queued + 1, "credit updates pile up");
        // Connections that open and close leave nothing queued behind.
        let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
        listener.set_nonblocking(true).unwrap();
        for _ in 0..2000 {
            m.from_guest(guest_pkt(OP_REQUEST, 40_000, 5000));
            drop(listener.accept().unwrap());
            m.from_guest(guest_pkt(OP_RST, 40_000, 5000));
        }
        assert_eq!(m.queued_for_guest(), queued + 1);
        assert_eq!(m.connection_count(), 1);

        // The guest takes everything; the muxer reads the client's socket again.
        let taken: Vec<Packet> = std::iter::from_fn(|| m.pop_to_guest()).collect();
        let update = taken.last().unwrap();
        assert_eq!(update.hdr.op, OP_CREDIT_UPDATE);
        assert!(taken[..queued].iter().all(|p| p.hdr.op == OP_RW));
        let p = next_packet(&mut m);
        assert_eq!((p.hdr.op, p.hdr.src_port), (OP_RW, local));
    }

    /// A guest connection to a host port whose listener's backlog is full is reset at
    /// once; the device thread does not wait for the listener to accept.
    #[test]
    fn a_guest_connect_to_a_full_backlog_does_not_block() {
        let dir = Dir::new("backlog");
        let path = dir.0.join("v.sock");
        let mut m = Muxer::new(&path, CID, &GuestLimits::default()).unwrap();
        let target = PathBuf::from(format!("{}_5000", path.display()));
        let listener = UnixListener::bind(&target).unwrap();
        // SAFETY: listen(2) on a listening socket this test owns only changes its backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let mut fillers = Vec::new();
        loop {
            match connect_nonblocking(&target) {
                Ok(s) => fillers.push(s),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(fillers.len() < 64, "the backlog never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            m.from_guest(guest_pkt(OP_REQUEST, 40_000, 5000));
            let _ = tx.send((m.pop_to_guest(), m.connection_count()));
        });
        let (reply, count) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the connect waited for the listener");
        assert_eq!(reply.unwrap().hdr.op, OP_RST);
        assert_eq!(count, 0);
    }
}
