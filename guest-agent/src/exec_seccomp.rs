//! An exec'd process runs under its container's seccomp profile.
//!
//! libcontainer 0.7 makes an exec'd process from a copy of the container's spec whose `linux`
//! section it rebuilds from the namespaces, cgroup path, personality and time offsets alone:
//! the seccomp profile is not among them, so every exec'd process ran unfiltered (issue 22,
//! `Seccomp: 0` in each exec under CRI, and a way out of the pod's profile for anything that
//! can exec). The helper therefore loads the profile itself, from an [`Executor`] that runs
//! in the new process after libcontainer has put it in the container's namespaces and
//! cgroup and set its user and capabilities, just before the `execve`. A failure there
//! reaches the helper's caller through libcontainer's exec error pipe, so the exec fails
//! with the reason instead of running unfiltered.
//!
//! Loading a filter takes `no_new_privs` or `CAP_SYS_ADMIN`. A process asking for
//! `noNewPrivileges` has the first (libcontainer sets it before anything else). One without
//! it (Kubernetes' default, `allowPrivilegeEscalation: true`) may have neither by the time
//! the executor runs, so libcontainer is handed its capability sets with `CAP_SYS_ADMIN`
//! and `CAP_SETPCAP` added, and the executor takes them away again: it drops the added ones
//! from the bounding set, loads the filter, then sets the effective, permitted and
//! inheritable sets to those asked for. As with runc for such a process, the filter is
//! already in force for that last `capset` and for the `execve`, so a profile must allow
//! both (one that kills on either ends the exec'd process at once, as under runc). No code
//! of the container runs while the sets are raised, and a container process without those
//! capabilities cannot trace one that has them.
use std::collections::HashSet;

use caps::CapSet;
use libcontainer::capabilities::CapabilityExt;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities, LinuxSeccomp, Process, Spec};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

/// What loading the filter needs in a process without `no_new_privs`: `CAP_SYS_ADMIN` for
/// the filter, `CAP_SETPCAP` to drop from the bounding set afterwards.
const LOADING: [Capability; 2] = [Capability::SysAdmin, Capability::Setpcap];

/// An exec'd process's seccomp profile, and the capability sets to return it to after the
/// filter is loaded when those handed to libcontainer were raised for the loading.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecSeccomp {
    profile: LinuxSeccomp,
    asked: Option<LinuxCapabilities>,
}

/// Prepares the exec of `process` in a container whose spec's profile is `profile`: the
/// profile to load, if there is one, with `process`'s capability sets raised where the
/// loading needs it (see the module comment).
pub fn prepare(
    process: &mut Process,
    profile: Option<&LinuxSeccomp>,
) -> Result<Option<ExecSeccomp>> {
    let Some(profile) = profile else {
        return Ok(None);
    };
    if libcontainer::seccomp::is_notify(profile) {
        return Err(AgentError::InvalidProcess(
            "the container's seccomp profile hands calls to a notify listener \
             (SCMP_ACT_NOTIFY), which exec'd processes do not support"
                .into(),
        ));
    }
    let profile = profile.clone();
    // Without capability sets libcontainer leaves the helper's, all of them, in place.
    let asked = match process.capabilities() {
        Some(caps) if process.no_new_privileges() != Some(true) => caps.clone(),
        _ => {
            return Ok(Some(ExecSeccomp {
                profile,
                asked: None,
            }))
        }
    };
    let raise = |set: &Option<Capabilities>| {
        set.clone().map(|mut s| {
            s.extend(LOADING);
            s
        })
    };
    let mut raised = asked.clone();
    raised
        .set_bounding(Some(
            raise(asked.bounding()).unwrap_or_else(|| LOADING.into()),
        ))
        .set_effective(raise(asked.effective()))
        .set_permitted(raise(asked.permitted()));
    process.set_capabilities(Some(raised));
    Ok(Some(ExecSeccomp {
        profile,
        asked: Some(asked),
    }))
}

impl ExecSeccomp {
    /// Loads the filter into this process and returns its capability sets to those asked
    /// for; runs in the exec'd process, last before its `execve`.
    fn load(&self) -> std::result::Result<(), String> {
        let to_caps = |set: &Capabilities| set.iter().map(|c| c.to_cap()).collect::<HashSet<_>>();
        if let Some(asked) = &self.asked {
            let bounding = asked.bounding().as_ref().map(to_caps).unwrap_or_default();
            for cap in LOADING.map(|c| c.to_cap()) {
                if !bounding.contains(&cap) {
                    caps::drop(None, CapSet::Bounding, cap)
                        .map_err(|e| format!("drop {cap} from the bounding set: {e}"))?;
                }
            }
        }
        libcontainer::seccomp::initialize_seccomp(&self.profile)
            .map_err(|e| format!("load the container's seccomp profile: {e}"))?;
        if let Some(asked) = &self.asked {
            // Effective first: the permitted set may not be lowered below it.
            for (set, caps) in [
                (CapSet::Effective, asked.effective()),
                (CapSet::Permitted, asked.permitted()),
                (CapSet::Inheritable, asked.inheritable()),
            ] {
                if let Some(caps) = caps {
                    let asked = to_caps(caps);
                    caps::set(None, set, &asked).map_err(|e| {
                        format!("set the {set:?} capabilities under the seccomp profile: {e}")
                    })?;
                    // A profile answering capset with errno 0 would leave the raised sets.
                    if caps::read(None, set).ok().as_ref() != Some(&asked) {
                        return Err(format!(
                            "the {set:?} capabilities are not those asked for after the \
                             seccomp profile was loaded (does it fake capset?)"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// libcontainer's default executor (an `execvp` of the process's arguments), the profile
/// loaded first.
#[derive(Clone)]
pub struct Confined(pub ExecSeccomp);

impl Executor for Confined {
    fn exec(&self, spec: &Spec) -> std::result::Result<(), ExecutorError> {
        self.0.load().map_err(ExecutorError::Other)?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> std::result::Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCapabilitiesBuilder, LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder,
    };

    fn profile(action: LinuxSeccompAction) -> LinuxSeccomp {
        LinuxSeccompBuilder::default()
            .default_action(action)
            .build()
            .unwrap()
    }

    fn caps(list: &[Capability]) -> Capabilities {
        list.iter().copied().collect()
    }

    fn process(nnp: Option<bool>) -> Process {
        let mut p = Process::default();
        let set = caps(&[Capability::Chown, Capability::Kill]);
        p.set_no_new_privileges(nnp).set_capabilities(Some(
            LinuxCapabilitiesBuilder::default()
                .bounding(set.clone())
                .effective(set.clone())
                .permitted(set.clone())
                .inheritable(caps(&[]))
                .build()
                .unwrap(),
        ));
        p
    }

    #[test]
    fn no_profile_leaves_the_process_alone() {
        let mut p = process(None);
        let before = serde_json::to_string(&p).unwrap();
        assert!(prepare(&mut p, None).unwrap().is_none());
        assert_eq!(serde_json::to_string(&p).unwrap(), before);
    }

    #[test]
    fn with_no_new_privs_nothing_is_raised() {
        let mut p = process(Some(true));
        let before = serde_json::to_string(&p).unwrap();
        let s = prepare(&mut p, Some(&profile(LinuxSeccompAction::ScmpActAllow)))
            .unwrap()
            .unwrap();
        assert!(s.asked.is_none());
        assert_eq!(serde_json::to_string(&p).unwrap(), before);
    }

    #[test]
    fn without_no_new_privs_the_loading_capabilities_are_raised_and_the_asked_kept() {
        for nnp in [None, Some(false)] {
            let mut p = process(nnp);
            let asked = p.capabilities().clone().unwrap();
            let s = prepare(&mut p, Some(&profile(LinuxSeccompAction::ScmpActAllow)))
                .unwrap()
                .unwrap();
            assert_eq!(s.asked.as_ref(), Some(&asked));
            let raised = p.capabilities().clone().unwrap();
            let want = caps(&[
                Capability::Chown,
                Capability::Kill,
                Capability::SysAdmin,
                Capability::Setpcap,
            ]);
            assert_eq!(raised.bounding().as_ref(), Some(&want));
            assert_eq!(raised.effective().as_ref(), Some(&want));
            assert_eq!(raised.permitted().as_ref(), Some(&want));
            assert_eq!(raised.inheritable().as_ref(), Some(&caps(&[])));
        }
    }

    #[test]
    fn a_notify_profile_is_refused_by_name() {
        let mut p = process(None);
        let mut notify = profile(LinuxSeccompAction::ScmpActAllow);
        notify.set_syscalls(Some(vec![LinuxSyscallBuilder::default()
            .names(vec!["mkdir".to_string()])
            .action(LinuxSeccompAction::ScmpActNotify)
            .build()
            .unwrap()]));
        let e = prepare(&mut p, Some(&notify)).unwrap_err().to_string();
        assert!(e.contains("SCMP_ACT_NOTIFY"), "{e}");
    }
}
