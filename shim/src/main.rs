//! `containerd-shim-shoal-v2`: containerd starts it per sandbox (`start`), talks to it over
//! ttrpc, and runs it with `delete` to clean up after one that died.
use std::os::unix::fs::OpenOptionsExt;

use containerd_shim_shoal_v2::config::Config;
use containerd_shim_shoal_v2::service::Service;

/// Logs go to containerd's shim log (the `log` fifo in the bundle directory) when the shim
/// serves; `start` and `delete` write to stderr, which containerd reports on failure.
fn init_logging() {
    let config = Config::load().ok();
    let level = config
        .as_ref()
        .map(|c| c.log_level.clone())
        .unwrap_or_else(|| "info".into());
    // A config that cannot be read fails the sandbox's start later, with its error; until
    // then the VMM's threads are confined as by default.
    if let Some(c) = &config {
        shoal_vmm::confine::set_mode(c.confine_mode());
    }
    let filter = shoal_vmm::ratelimit::log_filter(&level);
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
            // A VMM thread's denied call is written here too (by its SIGSYS handler).
            shoal_vmm::confine::set_log_fd(std::os::fd::AsRawFd::as_raw_fd(&f));
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

/// Marks when this process started (from /proc/self/stat, in CLOCK_BOOTTIME ms).
fn log_process_start() {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Field 22, counted after the parenthesised command name.
    let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return;
    };
    let ticks: Option<f64> = after
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok());
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    if let Some(ticks) = ticks {
        containerd_shim_shoal_v2::sandbox::mark_at("shim_started", ticks * 1e3 / hz);
    }
}

fn main() {
    if std::env::args().any(|a| a == "start") {
        // For the serving shim `start` spawns (glibc reads it when that process starts): a
        // couple of malloc arenas instead of one per thread keeps each sandbox's shim small.
        // Set while this process still has one thread.
        std::env::set_var("MALLOC_ARENA_MAX", "2");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the shim's async runtime");
    runtime.block_on(async {
        init_logging();
        // A panic ends up in containerd's log with the rest, not only on a stderr nobody reads.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            tracing::error!("shim panic: {info}");
            default_hook(info);
        }));
        if !std::env::args().any(|a| a == "start" || a == "delete") {
            let args: Vec<String> = std::env::args().collect();
            if let Some(id) = args
                .windows(2)
                .find(|w| w[0] == "-id")
                .map(|w| w[1].clone())
            {
                let _ = containerd_shim_shoal_v2::sandbox::SHIM_ID.set(id);
            }
            log_process_start();
        }
        containerd_shim::asynchronous::run::<Service>("io.containerd.shoal.v2", None).await;
    });
}
