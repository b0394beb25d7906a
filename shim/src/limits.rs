//! Process-wide limits of the serving shim, set from `[limits]` rather than inherited from
//! containerd.
//!
//! The VMM runs in the shim's process, so the descriptors its virtio-fs server opens for the
//! guest are the shim's: RLIMIT_NOFILE is what bounds how many a guest can make it hold.
//! containerd's own limit (often 1048576 under systemd) is far more than one sandbox needs.

/// Errors setting a process limit.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("cannot set the shim's open file limit (RLIMIT_NOFILE) to {limit}: {cause}")]
    OpenFiles { limit: u64, cause: std::io::Error },
}

/// Sets this process's RLIMIT_NOFILE, soft and hard, to `limit`.
///
/// Process-wide: every thread, the VM's included, and every process started afterwards gets
/// it. Descriptors already open at or above `limit` stay open; only new ones are refused
/// (EMFILE). Lowering the hard limit cannot be undone without CAP_SYS_RESOURCE: a shim not
/// running as root that sets a lower limit keeps it for the rest of its life, and even as
/// root nothing raises it again, so call this once, with the configured value, before the VM
/// starts. Raising the hard limit needs CAP_SYS_RESOURCE, and never goes past
/// `/proc/sys/fs/nr_open` (both fail with EPERM).
pub fn set_open_files(limit: u64) -> Result<(), LimitsError> {
    let value = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: limit as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct it is given, which lives for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &value) } != 0 {
        return Err(LimitsError::OpenFiles {
            limit,
            cause: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's RLIMIT_NOFILE as (soft, hard).
    fn open_files() -> (u64, u64) {
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given, which lives for the call.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) }, 0);
        (now.rlim_cur, now.rlim_max)
    }

    /// Exit codes of the forked child below, each naming what it found wrong.
    const SET_FAILED: i32 = 10;
    const NOT_READ_BACK: i32 = 11;
    const OPENED_PAST_LIMIT: i32 = 12;
    const NOT_REFUSED_WITH_EMFILE: i32 = 13;
    const SOFT_ROSE_PAST_HARD: i32 = 14;

    /// Runs `set_open_files(limit)` in a forked child (the limit is process-wide, and the
    /// test harness's other tests share this process) and checks there that the limit reads
    /// back, that no descriptor at or above it can be opened (EMFILE), and that the soft limit
    /// cannot be raised past the new hard one. Returns the child's exit code.
    fn in_child(limit: u64) -> i32 {
        use std::os::fd::AsRawFd;
        // A descriptor the child can copy until refused (fd 0 may be closed under a harness).
        let null_file = std::fs::File::open("/dev/null").expect("opening /dev/null");
        let null = null_file.as_raw_fd();
        // SAFETY: the test harness has other threads; the child makes only async-signal-safe
        // calls before it exits (see below), which is what a forked copy of such a process
        // may. `set_open_files` is one setrlimit and, on failure, reads errno: no allocation.
        let forked = unsafe { nix::unistd::fork() }.expect("fork");
        match forked {
            // SAFETY: async-signal-safe calls only (setrlimit, getrlimit, dup, _exit), on
            // structs of this process's own stack and a descriptor it holds; the block ends
            // in _exit.
            nix::unistd::ForkResult::Child => unsafe {
                if set_open_files(limit).is_err() {
                    libc::_exit(SET_FAILED);
                }
                let mut now = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) != 0
                    || now.rlim_cur != limit as libc::rlim_t
                    || now.rlim_max != limit as libc::rlim_t
                {
                    libc::_exit(NOT_READ_BACK);
                }
                // Open descriptors until refused: none may reach the limit.
                loop {
                    let fd = libc::dup(null);
                    if fd < 0 {
                        if *libc::__errno_location() != libc::EMFILE {
                            libc::_exit(NOT_REFUSED_WITH_EMFILE);
                        }
                        break;
                    }
                    if fd as u64 >= limit {
                        libc::_exit(OPENED_PAST_LIMIT);
                    }
                }
                let raised = libc::rlimit {
                    rlim_cur: (limit + 1) as libc::rlim_t,
                    rlim_max: limit as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    libc::_exit(SOFT_ROSE_PAST_HARD);
                }
                libc::_exit(0)
            },
            nix::unistd::ForkResult::Parent { child } => {
                match nix::sys::wait::waitpid(child, None).expect("waitpid") {
                    nix::sys::wait::WaitStatus::Exited(_, code) => code,
                    other => panic!("the child ended with {other:?}"),
                }
            }
        }
    }

    #[test]
    fn the_open_file_limit_is_set_soft_and_hard_and_holds() {
        let before = open_files();
        // Below what the test process has, so that it is lowered (needs no privilege).
        let limit = 64.min(before.0);
        assert_eq!(
            in_child(limit),
            0,
            "child codes: {SET_FAILED} set failed, {NOT_READ_BACK} not read back, \
             {OPENED_PAST_LIMIT} opened past the limit, {NOT_REFUSED_WITH_EMFILE} refused \
             otherwise than with EMFILE, {SOFT_ROSE_PAST_HARD} soft rose past hard"
        );
        assert_eq!(
            open_files(),
            before,
            "the child's limit leaked into the test process"
        );
    }

    #[test]
    fn a_limit_the_kernel_refuses_is_an_error_naming_it() {
        // Past fs.nr_open, no process may go, root included: EPERM.
        let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .expect("reading fs.nr_open")
            .trim()
            .parse()
            .expect("fs.nr_open is a number");
        let before = open_files();
        // Refused before anything changes, so this may run in the test process itself.
        let e = set_open_files(nr_open + 1).unwrap_err();
        assert_eq!(
            open_files(),
            before,
            "a refused limit changed the process's"
        );
        let LimitsError::OpenFiles {
            limit,
            cause: source,
        } = &e;
        assert_eq!(*limit, nr_open + 1);
        assert_eq!(source.raw_os_error(), Some(libc::EPERM), "{e}");
        assert!(e.to_string().contains(&(nr_open + 1).to_string()), "{e}");
    }
}
