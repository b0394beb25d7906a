//! Process stdio over separate stream connections.
//!
//! The shim opens one connection per stream to the agent's stdio port (vsock 1025 in the
//! guest, `<listen path>.io` on a host) and writes `STREAM <token>\n`. A process request
//! names the tokens of its stdin, stdout and stderr; the agent waits briefly for them,
//! then copies bytes between the streams and the process's pipes. Copies are blocking
//! threads, so a slow reader on the host holds the writer in the container (back-pressure).
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
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

/// Streams that connected and announced their token, waiting to be claimed.
#[derive(Clone, Default)]
pub struct StreamRegistry {
    inner: Arc<(Mutex<HashMap<String, Stream>>, Condvar)>,
}

/// How long a process request waits for its streams to connect.
pub const STREAM_WAIT: Duration = Duration::from_secs(10);
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
        map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), stream);
        cv.notify_all();
    }

    /// Takes the stream named `token`, waiting up to `timeout` for it to connect.
    pub fn claim(&self, token: &str, timeout: Duration) -> Result<Stream> {
        let (map, cv) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut guard = map.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(s) = guard.remove(token) {
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

    /// Accepts stdio connections on a unix socket (host mode) in a background thread.
    pub fn serve_unix(&self, path: &Path) -> io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let registry = self.clone();
        std::thread::Builder::new()
            .name("stdio-accept".into())
            .stack_size(PUMP_STACK)
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let r = registry.clone();
                    let _ = std::thread::Builder::new()
                        .stack_size(PUMP_STACK)
                        .spawn(move || r.register(Stream::Unix(conn)));
                }
            })?;
        Ok(())
    }

    /// Accepts stdio connections on a vsock port (guest mode) in a background thread.
    pub fn serve_vsock(&self, port: u32) -> io::Result<()> {
        let listener =
            vsock::VsockListener::bind(&vsock::VsockAddr::new(vsock::VMADDR_CID_ANY, port))?;
        let registry = self.clone();
        std::thread::Builder::new()
            .name("stdio-accept".into())
            .stack_size(PUMP_STACK)
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let r = registry.clone();
                    let _ = std::thread::Builder::new()
                        .stack_size(PUMP_STACK)
                        .spawn(move || r.register(Stream::Vsock(conn)));
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
    outputs: Vec<JoinHandle<()>>,
}

/// Output pipes (read ends) and the streams they are copied to, once the process runs.
pub type PendingOutputs = Vec<(File, Stream)>;

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
    pub fn prepare(
        registry: &StreamRegistry,
        tokens: Tokens<'_>,
    ) -> Result<(ProcessIo, ChildStdio, PendingOutputs)> {
        let claim = |t: &str| {
            if t.is_empty() {
                Ok(None)
            } else {
                registry.claim(t, STREAM_WAIT).map(Some)
            }
        };
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
            outputs: Vec::new(),
        };
        let child = ChildStdio {
            stdin: child_in.into(),
            stdout: child_out.into(),
            stderr: child_err.into(),
        };
        Ok((io, child, pending))
    }

    /// Starts the copy threads (after the process exists, so its pipe ends are closed here).
    pub fn start(&mut self, outputs: PendingOutputs) {
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
    }

    /// Closes the process's stdin now.
    pub fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Waits until all output has been copied out (blocking).
    pub fn drain(&mut self) {
        for h in self.outputs.drain(..) {
            let _ = h.join();
        }
    }
}

/// Reads one line from a stream (used by tests and the client side).
pub fn read_line(stream: &mut impl Read) -> io::Result<String> {
    let mut r = BufReader::new(stream);
    let mut s = String::new();
    r.read_line(&mut s)?;
    Ok(s)
}
