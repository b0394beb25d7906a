//! Process stdio over separate stream connections.
//!
//! The shim opens one connection per stream to the agent's stdio port (vsock 1025 in the
//! guest, `<listen path>.io` on a host) and writes `STREAM <token>\n`. A process request
//! names the tokens of its stdin, stdout and stderr; the agent waits briefly for them,
//! then copies bytes between the streams and the process's pipes. Copies are blocking
//! threads, so a slow reader on the host holds the writer in the container (back-pressure).
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{AgentError, Result};

/// A connected stdio stream (unix on a host, vsock in a guest).
pub enum Stream {
    Unix(UnixStream),
    Vsock(vsock::VsockStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Vsock(s) => Stream::Vsock(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Vsock(s) => s.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Vsock(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Vsock(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Streams waiting to be claimed, by token, with when each arrived.
type Waiting = HashMap<String, (Stream, Instant)>;

/// Closes the waiting streams nobody claimed within [`UNCLAIMED_LIMIT`].
fn drop_unclaimed(waiting: &mut Waiting) {
    let now = Instant::now();
    waiting.retain(|_, (_, since)| now.duration_since(*since) < UNCLAIMED_LIMIT);
}

/// Streams that connected and announced their token, waiting to be claimed.
#[derive(Clone, Default)]
pub struct StreamRegistry {
    inner: Arc<(Mutex<Waiting>, Condvar)>,
}

/// How long a process request waits for its streams to connect.
pub const STREAM_WAIT: Duration = Duration::from_secs(10);
/// How long a stream nobody claims is kept: the host opens the streams before its process
/// request, and a request that fails before claiming them (an exec id in use, a bad spec)
/// leaves them; they are closed once they are this old (looked at whenever a stream arrives
/// or is claimed), so the host's copies end too.
const UNCLAIMED_LIMIT: Duration = Duration::from_secs(60);
const MAX_TOKEN: usize = 256;
const PUMP_STACK: usize = 64 * 1024;

impl StreamRegistry {
    /// Reads the `STREAM <token>` line and files the stream under its token.
    pub fn register(&self, mut stream: Stream) {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if line.len() < MAX_TOKEN => line.push(byte[0]),
                _ => return, // closed, too long or broken: drop it
            }
        }
        let Some(token) = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.strip_prefix("STREAM "))
        else {
            tracing::debug!("stdio connection without a STREAM line");
            return;
        };
        let (map, cv) = &*self.inner;
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        drop_unclaimed(&mut map);
        map.insert(token.to_string(), (stream, Instant::now()));
        cv.notify_all();
    }

    /// Takes the stream named `token`, waiting up to `timeout` for it to connect.
    pub fn claim(&self, token: &str, timeout: Duration) -> Result<Stream> {
        let (map, cv) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut guard = map.lock().unwrap_or_else(|e| e.into_inner());
        drop_unclaimed(&mut guard);
        loop {
            if let Some((s, _)) = guard.remove(token) {
                return Ok(s);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(AgentError::StdioTimeout(token.to_string()));
            }
            guard = cv
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Closes the streams of `tokens` that arrived and were not claimed (their process
    /// request failed): the host's copies see the end of them at once.
    pub fn discard(&self, tokens: &[String]) {
        let (map, _) = &*self.inner;
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        for t in tokens {
            map.remove(t);
        }
    }

    /// Accepts stdio connections on a unix socket (host mode) in a background thread.
    pub fn serve_unix(&self, path: &Path) -> io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        self.serve(move || listener.accept().map(|(c, _)| Stream::Unix(c)))
    }

    /// Accepts stdio connections on a vsock port (guest mode) in a background thread.
    pub fn serve_vsock(&self, port: u32) -> io::Result<()> {
        let addr = vsock::VsockAddr::new(vsock::VMADDR_CID_ANY, port);
        let listener = vsock::VsockListener::bind(&addr)?;
        self.serve(move || listener.accept().map(|(c, _)| Stream::Vsock(c)))
    }

    /// Runs `accept` in a loop; each new stream is registered on its own short thread, so
    /// a client that never sends its line holds up no one.
    fn serve(
        &self,
        mut accept: impl FnMut() -> io::Result<Stream> + Send + 'static,
    ) -> io::Result<()> {
        let registry = self.clone();
        std::thread::Builder::new()
            .name("stdio-accept".into())
            .stack_size(PUMP_STACK)
            .spawn(move || loop {
                match accept() {
                    Ok(stream) => {
                        let r = registry.clone();
                        let _ = std::thread::Builder::new()
                            .stack_size(PUMP_STACK)
                            .spawn(move || r.register(stream));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!("stdio listener stopped: {e}");
                        return;
                    }
                }
            })?;
        Ok(())
    }
}

/// The host side of a process's stdio once it runs: copy threads and the stdin handle.
pub struct ProcessIo {
    /// Write end of the process's stdin pipe; dropping it is end-of-file for the process.
    stdin: Arc<Mutex<Option<File>>>,
    stdin_stream: Option<Stream>,
    /// A handle on the stdin stream to stop its copy thread (CloseStdin, process exit).
    stdin_control: Option<Stream>,
    outputs: Vec<JoinHandle<()>>,
    /// The pty master of a terminal process (for resizing).
    pty: Option<File>,
}

/// What still has to be wired once the process exists.
pub enum PendingOutputs {
    /// Output pipes (read ends) and the streams they are copied to.
    Pipes(Vec<(File, Stream)>),
    /// A terminal: the pty master arrives on the console socket; its output goes to `stdout`.
    Tty {
        console: ConsoleReceiver,
        stdout: Option<Stream>,
    },
}

/// Receives the pty master that libcontainer sends over a console socket (SCM_RIGHTS).
/// The socket file is removed once the terminal is received, or when the receiver is
/// dropped unused (a create or exec that failed first).
pub struct ConsoleReceiver {
    path: PathBuf,
    handle: Option<JoinHandle<io::Result<OwnedFd>>>,
}

impl Drop for ConsoleReceiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How long the container may take to send its terminal.
const CONSOLE_WAIT: Duration = Duration::from_secs(30);

impl ConsoleReceiver {
    /// Listens on `path` for the console fd in a background thread.
    pub fn listen(path: &Path) -> Result<ConsoleReceiver> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(|e| AgentError::io(format!("bind console socket {}", path.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| AgentError::io("console socket", e))?;
        let handle = std::thread::Builder::new()
            .name("console".into())
            .stack_size(PUMP_STACK)
            .spawn(move || receive_console(listener))
            .map_err(|e| AgentError::io("start the console thread", e))?;
        Ok(ConsoleReceiver {
            path: path.into(),
            handle: Some(handle),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pty master, once received.
    pub fn finish(mut self) -> Result<OwnedFd> {
        let result = match self.handle.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("console thread panicked"))),
            None => Err(io::Error::other("console already received")),
        };
        // The socket file goes with `self`.
        result.map_err(|e| AgentError::io("receive the container's terminal", e))
    }
}

fn receive_console(listener: UnixListener) -> io::Result<OwnedFd> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let deadline = Instant::now() + CONSOLE_WAIT;
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(CONSOLE_WAIT))?;
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut data = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut data)];
    recvmsg(&conn, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            if let Some(fd) = fds.next() {
                return Ok(fd);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "console socket message carried no file descriptor",
    ))
}

/// The process's ends of its stdio, handed to libcontainer.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

fn pipe() -> Result<(File, File)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| AgentError::sys("create a pipe", e))?;
    Ok((File::from(r), File::from(w)))
}

fn dev_null(write: bool) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")
        .map_err(|e| AgentError::io("open /dev/null", e))
}

/// Stream tokens of one process (empty = not connected: /dev/null).
pub struct Tokens<'a> {
    pub stdin: &'a str,
    pub stdout: &'a str,
    pub stderr: &'a str,
}

impl ProcessIo {
    /// Claims the process's streams and builds the pipes; copying starts with [`ProcessIo::start`].
    /// With `console`, the process gets a terminal: its output goes to the stdout stream and
    /// the stderr token is not used.
    pub fn prepare(
        registry: &StreamRegistry,
        tokens: Tokens<'_>,
        console: Option<ConsoleReceiver>,
    ) -> Result<(ProcessIo, ChildStdio, PendingOutputs)> {
        let claim = |t: &str| {
            if t.is_empty() {
                Ok(None)
            } else {
                registry.claim(t, STREAM_WAIT).map(Some)
            }
        };
        if let Some(console) = console {
            let (stdin_s, stdout_s) = (claim(tokens.stdin)?, claim(tokens.stdout)?);
            // The terminal replaces stdio inside the container; these only fill the slots.
            let child = ChildStdio {
                stdin: dev_null(false)?.into(),
                stdout: dev_null(true)?.into(),
                stderr: dev_null(true)?.into(),
            };
            let io = ProcessIo {
                stdin: Arc::new(Mutex::new(None)),
                stdin_stream: stdin_s,
                stdin_control: None,
                outputs: Vec::new(),
                pty: None,
            };
            return Ok((
                io,
                child,
                PendingOutputs::Tty {
                    console,
                    stdout: stdout_s,
                },
            ));
        }
        let (stdin_s, stdout_s, stderr_s) = (
            claim(tokens.stdin)?,
            claim(tokens.stdout)?,
            claim(tokens.stderr)?,
        );

        let (child_in, host_in) = match &stdin_s {
            Some(_) => {
                let (r, w) = pipe()?;
                (r, Some(w))
            }
            None => (dev_null(false)?, None),
        };
        let mut pending = Vec::new();
        let mut out_end = |s: Option<Stream>| -> Result<File> {
            match s {
                Some(stream) => {
                    let (r, w) = pipe()?;
                    pending.push((r, stream));
                    Ok(w)
                }
                None => dev_null(true),
            }
        };
        let child_out = out_end(stdout_s)?;
        let child_err = out_end(stderr_s)?;
        let io = ProcessIo {
            stdin: Arc::new(Mutex::new(host_in)),
            stdin_stream: stdin_s,
            stdin_control: None,
            outputs: Vec::new(),
            pty: None,
        };
        let child = ChildStdio {
            stdin: child_in.into(),
            stdout: child_out.into(),
            stderr: child_err.into(),
        };
        Ok((io, child, PendingOutputs::Pipes(pending)))
    }

    /// Starts the copy threads (after the process exists, so its pipe ends are closed here).
    pub fn start(&mut self, pending: PendingOutputs) -> Result<()> {
        let outputs = match pending {
            PendingOutputs::Pipes(outputs) => outputs,
            PendingOutputs::Tty { console, stdout } => {
                let master = File::from(console.finish()?);
                let clone = |f: &File| {
                    f.try_clone()
                        .map_err(|e| AgentError::io("duplicate the pty master", e))
                };
                *self.stdin.lock().unwrap_or_else(|e| e.into_inner()) = Some(clone(&master)?);
                self.pty = Some(clone(&master)?);
                // Reading a pty master fails with EIO once the terminal's last user is gone:
                // io::copy ends there, which is this stream's end of file.
                stdout.map(|s| vec![(master, s)]).unwrap_or_default()
            }
        };
        for (mut pipe, mut stream) in outputs {
            let spawned = std::thread::Builder::new()
                .name("stdio-out".into())
                .stack_size(PUMP_STACK)
                .spawn(move || {
                    let _ = io::copy(&mut pipe, &mut stream);
                    stream.shutdown(Shutdown::Write);
                });
            if let Ok(handle) = spawned {
                self.outputs.push(handle);
            }
        }
        if let Some(mut stream) = self.stdin_stream.take() {
            self.stdin_control = stream.try_clone().ok();
            let stdin = self.stdin.clone();
            let _ = std::thread::Builder::new()
                .name("stdio-in".into())
                .stack_size(PUMP_STACK)
                .spawn(move || {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        let n = match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut guard = stdin.lock().unwrap_or_else(|e| e.into_inner());
                        let Some(pipe) = guard.as_mut() else { break };
                        if pipe.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
                });
        }
        Ok(())
    }

    /// Sets the terminal size of a terminal process.
    pub fn resize(&self, width: u16, height: u16) -> Result<()> {
        let Some(pty) = &self.pty else {
            return Err(AgentError::Unsupported(
                "resizing a process without a terminal",
            ));
        };
        let size = rustix::termios::Winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(pty, size)
            .map_err(|e| AgentError::io("set the terminal size", e.into()))
    }

    /// Closes the process's stdin now.
    pub fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(s) = &self.stdin_control {
            s.shutdown(Shutdown::Read);
        }
    }

    /// Waits until all output has been copied out (blocking), then stops the stdin copy:
    /// nobody reads it any more.
    pub fn drain(&mut self) {
        for h in self.outputs.drain(..) {
            let _ = h.join();
        }
        self.close_stdin();
    }
}
