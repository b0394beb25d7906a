//! `containerd-shim-shoal-v2`: containerd starts it per sandbox (`start`), talks to it over
//! ttrpc, and runs it with `delete` to clean up after one that died.
use std::os::unix::fs::OpenOptionsExt;

use containerd_shim_shoal_v2::config::Config;
use containerd_shim_shoal_v2::service::Service;

/// Logs go to containerd's shim log (the `log` fifo in the bundle directory) when the shim
/// serves; `start` and `delete` write to stderr, which containerd reports on failure.
fn init_logging() {
    let level = Config::load()
        .map(|c| c.log_level)
        .unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let serving = !std::env::args().any(|a| a == "start" || a == "delete");
    let fifo = serving
        .then(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("log")
                .ok()
        })
        .flatten();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    match fifo {
        Some(f) => {
            // Writes block again (no lost lines); the non-blocking open only avoided hanging
            // when nobody reads the log.
            let _ = nix::fcntl::fcntl(
                &f,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
            );
            builder.with_writer(std::sync::Mutex::new(f)).init()
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    init_logging();
    containerd_shim::asynchronous::run::<Service>("io.containerd.shoal.v2", None).await;
}
