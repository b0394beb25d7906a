//! A process's stdio: containerd's fifos on one side, the agent's stdio streams (one hybrid
//! vsock connection per stream) on the other, copied by small blocking threads.
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shoal_agent_api::client::hybrid_vsock_connect;
use shoal_agent_api::STDIO_PORT;

/// Errors wiring stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot open a stdio stream to the agent: {0}")]
    Connect(std::io::Error),
}

/// containerd's side of a process's stdio.
#[derive(Debug, Clone, Default)]
pub struct Fifos {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Running copies for one process.
pub struct ProcessIo {
    stdin: Option<(JoinHandle<()>, UnixStream)>,
    outputs: Vec<JoinHandle<()>>,
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
    Ok((s, token))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(64 * 1024)
        .spawn(f)
        .expect("spawning a stdio thread")
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
        let mut io = ProcessIo {
            stdin: None,
            outputs: Vec::new(),
        };
        if !fifos.stdin.is_empty() {
            let (stream, token) = open_stream(uds)?;
            stdio.stdin = token;
            let fifo = PathBuf::from(&fifos.stdin);
            let mut to_guest = stream.try_clone().map_err(IoError::Connect)?;
            let handle = spawn("shoal-stdin", move || {
                // Blocks until containerd's client opens its end; EOF when it closes it.
                if let Ok(mut f) = OpenOptions::new().read(true).open(&fifo) {
                    let _ = std::io::copy(&mut f, &mut to_guest);
                }
                let _ = to_guest.shutdown(Shutdown::Write);
            });
            io.stdin = Some((handle, stream));
        }
        let outs = [(&fifos.stdout, true), (&fifos.stderr, false)];
        for (path, is_stdout) in outs {
            if path.is_empty() || (!is_stdout && fifos.terminal) {
                continue;
            }
            let (mut stream, token) = open_stream(uds)?;
            if is_stdout {
                stdio.stdout = token;
            } else {
                stdio.stderr = token;
            }
            let fifo = PathBuf::from(path);
            io.outputs.push(spawn("shoal-stdout", move || {
                match OpenOptions::new().write(true).open(&fifo) {
                    Ok(mut f) => {
                        let mut buf = vec![0u8; 32 * 1024];
                        loop {
                            match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if f.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!("cannot open {}: {e}", fifo.display()),
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

    /// Ends every copy now (process gone or container deleted).
    pub fn shut_down(&mut self, fifos: &Fifos) {
        if let Some((handle, stream)) = self.stdin.take() {
            let _ = stream.shutdown(Shutdown::Both);
            if !handle.is_finished() {
                // The copy may still wait for a writer to open the fifo: be that writer.
                let _ = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifos.stdin);
            }
        }
        self.outputs.clear();
    }
}
