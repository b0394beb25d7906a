//! The agent protocol shared by the shim (client) and the guest agent (server), generated
//! at build time from `protos/agent.proto`.

/// Messages.
#[allow(
    clippy::all,
    missing_docs,
    unused_imports,
    unused_mut,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// The ttrpc service (server trait and client).
#[allow(
    clippy::all,
    missing_docs,
    unused_imports,
    unused_mut,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// vsock port of the ttrpc service inside the guest.
pub const AGENT_PORT: u32 = 1024;
/// vsock port where the shim opens stdio streams.
pub const STDIO_PORT: u32 = 1025;
/// Where the agent mounts the sandbox's virtio-fs share in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/shoal/shared";

/// Reaching the agent from the host through a VM's hybrid-vsock socket.
pub mod client {
    use std::io::{self, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// Connects to guest vsock `port` through the VM's hybrid-vsock unix socket: writes
    /// `CONNECT <port>\n` and reads the `OK <n>\n` answer, waiting at most 10 s for the
    /// guest to answer. The stream then reaches the guest.
    pub fn hybrid_vsock_connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
        hybrid_vsock_connect_within(uds, port, Duration::from_secs(10))
    }

    /// [`hybrid_vsock_connect`], waiting at most `wait` for the guest's answer (a refusal,
    /// nothing listening, comes back as soon as the guest sends it).
    pub fn hybrid_vsock_connect_within(
        uds: &Path,
        port: u32,
        wait: Duration,
    ) -> io::Result<UnixStream> {
        let mut s = UnixStream::connect(uds)?;
        s.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())?;
        // Byte by byte: anything after the newline belongs to the stream.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.len() < 64 {
            if s.read(&mut b)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("nothing listens on guest vsock port {port}"),
                ));
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        if !line.starts_with(b"OK ") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "unexpected hybrid vsock answer {:?}",
                    String::from_utf8_lossy(&line)
                ),
            ));
        }
        s.set_read_timeout(None)?;
        Ok(s)
    }

    /// Connects a ttrpc client to the agent, retrying until `timeout` while the guest boots.
    pub async fn connect_agent(
        uds: &Path,
        port: u32,
        timeout: Duration,
    ) -> io::Result<super::agent_ttrpc::AgentClient> {
        let deadline = Instant::now() + timeout;
        let mut last: Option<io::Error> = None;
        loop {
            // One request at a time, waiting for the guest's answer as long as the whole
            // wait allows: a request given up on while the guest boots slowly would still
            // be answered later, holding a connection in the guest and on the host.
            let (path, wait) = (
                uds.to_path_buf(),
                deadline.saturating_duration_since(Instant::now()),
            );
            if wait.is_zero() {
                let why = last.map(|e| format!(": {e}")).unwrap_or_default();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("agent did not answer on vsock port {port} within {timeout:?}{why}"),
                ));
            }
            let attempt =
                tokio::task::spawn_blocking(move || hybrid_vsock_connect_within(&path, port, wait))
                    .await
                    .map_err(io::Error::other)?;
            match attempt {
                Ok(s) => {
                    s.set_nonblocking(true)?;
                    let stream = tokio::net::UnixStream::from_std(s)?;
                    let client =
                        ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(stream));
                    return Ok(super::agent_ttrpc::AgentClient::new(client));
                }
                // The read timed out: the whole wait is over.
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "agent did not answer on vsock port {port} within {timeout:?}: the guest answered no connection request"
                        ),
                    ))
                }
                // Refused (nothing listens yet) or the socket is not there yet: again soon,
                // if the wait allows.
                Err(e) => {
                    last = Some(e);
                    let pause = Duration::from_millis(100)
                        .min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await
                }
            }
        }
    }
}
