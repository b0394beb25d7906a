//! A process's stdio: containerd's fifos on one side, the agent's stdio streams (one hybrid
//! vsock connection per stream) on the other, copied by small threads.
//!
//! Every copy can be ended from outside at any moment: its descriptors are non-blocking and
//! it waits in `poll` on them and on the process's cancel eventfd. None blocks in `open` on
//! a fifo nobody opens, nor in a read from a guest that never closes its stream, so deleting
//! a process ends its copies whatever containerd's client or the guest does, and a client
//! waiting for the end of the output gets it.
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use shoal_agent_api::client::hybrid_vsock_connect;
use shoal_agent_api::STDIO_PORT;

/// Errors wiring stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot open a stdio stream to the agent: {0}")]
    Connect(std::io::Error),
    #[error("cannot open containerd's stdio fifo {path}: {cause}")]
    Fifo {
        path: PathBuf,
        // Not a `#[source]`: the message carries it, printed once.
        cause: std::io::Error,
    },
    #[error("cannot make the stdio copies' cancel eventfd: {0}")]
    Cancel(nix::Error),
}

/// containerd's side of a process's stdio.
#[derive(Debug, Clone, Default)]
pub struct Fifos {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Running copies for one process. Dropping it ends them, as [`ProcessIo::shut_down`] does.
pub struct ProcessIo {
    stdin: Option<(JoinHandle<()>, UnixStream)>,
    outputs: Vec<JoinHandle<()>>,
    /// Written once to end every copy.
    cancel: Arc<EventFd>,
    /// Copies told to end, still finishing.
    ending: Vec<JoinHandle<()>>,
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

fn open_stream(uds: &Path) -> Result<(UnixStream, String), IoError> {
    let token = format!(
        "{}-{}",
        std::process::id(),
        NEXT_TOKEN.fetch_add(1, Ordering::Relaxed)
    );
    let mut s = hybrid_vsock_connect(uds, STDIO_PORT).map_err(IoError::Connect)?;
    s.write_all(format!("STREAM {token}\n").as_bytes())
        .map_err(IoError::Connect)?;
    s.set_nonblocking(true).map_err(IoError::Connect)?;
    Ok((s, token))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(64 * 1024)
        .spawn(f)
        .expect("spawning a stdio thread")
}

/// Waits until `fd` has `events` (or an error or hang-up, which the next read or write
/// reports); false once `cancel` was written.
fn ready(fd: BorrowedFd<'_>, events: PollFlags, cancel: &EventFd) -> bool {
    loop {
        let mut fds = [
            PollFd::new(fd, events),
            PollFd::new(cancel.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!("stdio copy: poll failed: {e}");
                return false;
            }
        }
        if fds[1].any().unwrap_or(true) {
            return false;
        }
        if fds[0].any().unwrap_or(true) {
            return true;
        }
    }
}

/// Copies `from` to `to`, both non-blocking, until `from` ends, either side fails, or
/// `cancel` is written.
fn copy(from: &mut (impl Read + AsFd), to: &mut (impl Write + AsFd), cancel: &EventFd) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if !ready(from.as_fd(), PollFlags::POLLIN, cancel) {
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                continue
            }
            Err(_) => return,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if !ready(to.as_fd(), PollFlags::POLLOUT, cancel) {
                return;
            }
            match to.write(rest) {
                Ok(0) => return,
                Ok(k) => rest = &rest[k..],
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => return,
            }
        }
    }
}

/// Opens the fifo at `path` for writing without blocking, waiting for its reader (containerd
/// opens it before asking for the process, so normally it is there) until `cancel`.
fn open_writer(path: &Path, cancel: &EventFd) -> Option<File> {
    let mut pause = Duration::from_millis(5);
    loop {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => return Some(f),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => {
                tracing::warn!("cannot open {}: {e}", path.display());
                return None;
            }
        }
        let mut fds = [PollFd::new(cancel.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(pause.as_millis()).unwrap_or(u16::MAX);
        if matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0) {
            return None;
        }
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

impl ProcessIo {
    /// Opens the agent streams for the fifos that are set and starts copying; returns the
    /// tokens to put in the agent request.
    pub fn connect(
        uds: &Path,
        fifos: &Fifos,
    ) -> Result<(shoal_agent_api::agent::Stdio, ProcessIo), IoError> {
        let mut stdio = shoal_agent_api::agent::Stdio {
            terminal: fifos.terminal,
            ..Default::default()
        };
        let cancel = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(IoError::Cancel)?,
        );
        // Dropped on an error below, which ends the copies already started.
        let mut io = ProcessIo {
            stdin: None,
            outputs: Vec::new(),
            cancel: cancel.clone(),
            ending: Vec::new(),
        };
        if !fifos.stdin.is_empty() {
            let fifo = PathBuf::from(&fifos.stdin);
            // A reader's non-blocking open of a fifo returns at once; poll then waits for
            // data, or for the hang-up once a writer has come and gone (end of file).
            let mut from_client = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&fifo)
                .map_err(|source| IoError::Fifo {
                    path: fifo,
                    cause: source,
                })?;
            let (stream, token) = open_stream(uds)?;
            stdio.stdin = token;
            let mut to_guest = stream.try_clone().map_err(IoError::Connect)?;
            let cancel = cancel.clone();
            let handle = spawn("shoal-stdin", move || {
                copy(&mut from_client, &mut to_guest, &cancel);
                let _ = to_guest.shutdown(Shutdown::Write);
            });
            io.stdin = Some((handle, stream));
        }
        let outs = [(&fifos.stdout, true), (&fifos.stderr, false)];
        for (path, is_stdout) in outs {
            if path.is_empty() || (!is_stdout && fifos.terminal) {
                continue;
            }
            let (mut from_guest, token) = open_stream(uds)?;
            if is_stdout {
                stdio.stdout = token;
            } else {
                stdio.stderr = token;
            }
            let fifo = PathBuf::from(path);
            let cancel = cancel.clone();
            io.outputs.push(spawn("shoal-stdout", move || {
                if let Some(mut to_client) = open_writer(&fifo, &cancel) {
                    // A read end of our own, never read: when containerd's reader goes (a
                    // containerd restart), writes wait for the next reader instead of
                    // failing, and the output goes on once containerd opens the fifo again.
                    let _keep = OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                        .open(format!("/proc/self/fd/{}", to_client.as_raw_fd()));
                    copy(&mut from_guest, &mut to_client, &cancel);
                }
            }));
        }
        Ok((stdio, io))
    }

    /// Waits up to `limit` for the output copies to drain (the agent closes its streams after
    /// the process's last write), so containerd sees all output before the exit event.
    pub fn drain(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.outputs.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.outputs.retain(|h| !h.is_finished());
    }

    /// Stops feeding stdin: the agent sees EOF once what was copied is through.
    pub fn close_stdin(&mut self, wait: Duration) {
        if let Some((handle, stream)) = self.stdin.take() {
            let deadline = Instant::now() + wait;
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = stream.shutdown(Shutdown::Write);
        }
    }

    /// Ends every copy now (process gone or container deleted): containerd's client sees
    /// the end of the output, and the agent the end of stdin.
    pub fn shut_down(&mut self) {
        if let Err(e) = self.cancel.write(1) {
            tracing::warn!("cannot end the stdio copies: {e}");
        }
        if let Some((handle, stream)) = self.stdin.take() {
            let _ = stream.shutdown(Shutdown::Both);
            self.ending.push(handle);
        }
        self.ending.append(&mut self.outputs);
        self.ending.retain(|h| !h.is_finished());
    }

    /// Whether every copy thread has ended.
    #[cfg(test)]
    fn ended(&self) -> bool {
        self.outputs
            .iter()
            .chain(&self.ending)
            .all(JoinHandle::is_finished)
            && self.stdin.as_ref().is_none_or(|(h, _)| h.is_finished())
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.shut_down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;

    /// The agent's side of hybrid vsock stdio, on a unix socket: answers each CONNECT and
    /// hands over every stream under its STREAM token.
    fn fake_agent(dir: &Path) -> (PathBuf, mpsc::Receiver<(String, UnixStream)>) {
        let uds = dir.join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                assert_eq!(line, format!("CONNECT {STDIO_PORT}\n"));
                conn.write_all(b"OK 1\n").unwrap();
                line.clear();
                reader.read_line(&mut line).unwrap();
                let token = line.trim().strip_prefix("STREAM ").unwrap().to_string();
                if tx.send((token, conn)).is_err() {
                    return;
                }
            }
        });
        (uds, rx)
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn fifo(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        path
    }

    /// containerd's client reading a fifo: opened before the process is asked for.
    fn client_reader(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .unwrap()
    }

    /// Reads `f` until the end of file (after its writer came and went) or `limit`; returns
    /// what was read and whether the end came.
    fn read_to_end_within(f: &mut File, limit: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(50u16)).unwrap() == 0 {
                continue;
            }
            match f.read(&mut buf) {
                Ok(0) => return (got, true),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        (got, false)
    }

    fn ended_within(io: &ProcessIo, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !io.ended() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn streams(rx: &mpsc::Receiver<(String, UnixStream)>, n: usize) -> HashMap<String, UnixStream> {
        (0..n)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect()
    }

    #[test]
    fn stdin_and_output_are_copied_until_each_side_ends() {
        let dir = scratch("flow");
        let (uds, rx) = fake_agent(&dir);
        let fifos = Fifos {
            stdin: fifo(&dir, "in").to_string_lossy().into(),
            stdout: fifo(&dir, "out").to_string_lossy().into(),
            stderr: String::new(),
            terminal: false,
        };
        let mut out = client_reader(Path::new(&fifos.stdout));
        let (stdio, io) = ProcessIo::connect(&uds, &fifos).unwrap();
        let mut guest = streams(&rx, 2);
        let mut guest_in = guest.remove(&stdio.stdin).unwrap();
        let mut guest_out = guest.remove(&stdio.stdout).unwrap();

        let mut client_in = OpenOptions::new().write(true).open(&fifos.stdin).unwrap();
        client_in.write_all(b"hello\n").unwrap();
        drop(client_in);
        let mut got = Vec::new();
        guest_in
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        guest_in.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello\n", "stdin reaches the guest, then its end");

        guest_out.write_all(b"output").unwrap();
        drop(guest_out);
        let (got, end) = read_to_end_within(&mut out, Duration::from_secs(5));
        assert_eq!((got.as_slice(), end), (&b"output"[..], true));
        assert!(
            ended_within(&io, Duration::from_secs(5)),
            "copies still run"
        );
    }

    /// `ctr run` and `ctr task exec` close a stdin fifo they never wrote without ever
    /// opening it, and remove the fifos when they are done. The copy used to wait in
    /// open(2) for a writer that never came, one host thread per process, forever.
    #[test]
    fn a_stdin_nobody_opens_ends_when_the_process_is_deleted() {
        let dir = scratch("stdin");
        let (uds, rx) = fake_agent(&dir);
        let fifos = Fifos {
            stdin: fifo(&dir, "in").to_string_lossy().into(),
            ..Default::default()
        };
        let (stdio, mut io) = ProcessIo::connect(&uds, &fifos).unwrap();
        let mut guest_in = streams(&rx, 1).remove(&stdio.stdin).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        std::fs::remove_file(&fifos.stdin).unwrap();
        assert!(!io.ended(), "the copy waits for the client");
        io.shut_down();
        assert!(
            ended_within(&io, Duration::from_secs(2)),
            "the copy goes on"
        );
        guest_in
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            guest_in.read(&mut [0u8; 8]).unwrap(),
            0,
            "the guest sees EOF"
        );
    }

    /// A guest that keeps a process's output stream open after the process is gone (or
    /// never took it: a failed exec) must not hold containerd's client, which waits for
    /// the end of the output before it returns.
    #[test]
    fn output_the_guest_never_ends_ends_for_the_client_when_the_process_is_deleted() {
        let dir = scratch("out");
        let (uds, rx) = fake_agent(&dir);
        let fifos = Fifos {
            stdout: fifo(&dir, "out").to_string_lossy().into(),
            stderr: fifo(&dir, "err").to_string_lossy().into(),
            ..Default::default()
        };
        let mut out = client_reader(Path::new(&fifos.stdout));
        let mut err = client_reader(Path::new(&fifos.stderr));
        let (stdio, io) = ProcessIo::connect(&uds, &fifos).unwrap();
        let mut guest = streams(&rx, 2);
        let mut guest_out = guest.remove(&stdio.stdout).unwrap();
        guest_out.write_all(b"partial").unwrap();
        let (got, end) = read_to_end_within(&mut out, Duration::from_millis(300));
        assert_eq!((got.as_slice(), end), (&b"partial"[..], false));

        drop(io); // the process deleted
        let (_, end) = read_to_end_within(&mut out, Duration::from_secs(2));
        assert!(end, "the client still waits for stdout");
        let (_, end) = read_to_end_within(&mut err, Duration::from_secs(2));
        assert!(end, "the client still waits for stderr");
        drop(guest);
    }

    /// containerd restarting closes its reader of an output fifo and opens a new one: the
    /// output waits for it rather than ending (the copy's writes used to fail with EPIPE).
    #[test]
    fn output_goes_on_when_the_client_reopens_the_fifo() {
        let dir = scratch("reopen");
        let (uds, rx) = fake_agent(&dir);
        let fifos = Fifos {
            stdout: fifo(&dir, "out").to_string_lossy().into(),
            ..Default::default()
        };
        let mut out = client_reader(Path::new(&fifos.stdout));
        let (stdio, io) = ProcessIo::connect(&uds, &fifos).unwrap();
        let mut guest_out = streams(&rx, 1).remove(&stdio.stdout).unwrap();
        guest_out.write_all(b"before").unwrap();
        let (got, _) = read_to_end_within(&mut out, Duration::from_millis(300));
        assert_eq!(got, b"before");
        drop(out); // containerd goes away
        guest_out.write_all(b"meanwhile").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!io.ended(), "the copy ended with the reader");
        let mut out = client_reader(Path::new(&fifos.stdout)); // and comes back
        guest_out.write_all(b" after").unwrap();
        drop(guest_out);
        let (got, end) = read_to_end_within(&mut out, Duration::from_secs(5));
        assert_eq!(
            (String::from_utf8_lossy(&got).as_ref(), end),
            ("meanwhile after", true)
        );
    }

    /// A stdin fifo that is not there is a clear error, naming it.
    #[test]
    fn a_missing_stdin_fifo_is_named() {
        let dir = scratch("missing");
        let (uds, _rx) = fake_agent(&dir);
        let fifos = Fifos {
            stdin: dir.join("gone").to_string_lossy().into(),
            ..Default::default()
        };
        let e = ProcessIo::connect(&uds, &fifos).err().unwrap().to_string();
        assert!(e.contains("stdio fifo") && e.contains("gone"), "{e}");
    }
}
