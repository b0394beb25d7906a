//! The agent's error type and how it maps to ttrpc status codes.
use ttrpc::{Code, Error as TtrpcError};

/// Everything a request can fail with. Messages name the container, process or path.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("container {0} does not exist")]
    NoSuchContainer(String),
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("process {exec_id} does not exist in container {container_id}")]
    NoSuchProcess {
        container_id: String,
        exec_id: String,
    },
    #[error("process {exec_id} already exists in container {container_id}")]
    ProcessExists {
        container_id: String,
        exec_id: String,
    },
    #[error(
        "invalid container id {0:?}: use letters, digits, '-', '_' and '.', at most 128 characters"
    )]
    InvalidId(String),
    #[error("invalid OCI runtime spec: {0}")]
    InvalidSpec(String),
    #[error("invalid OCI process: {0}")]
    InvalidProcess(String),
    #[error("invalid resources: {0}")]
    InvalidResources(String),
    #[error("container {id}: root file system {path} does not exist")]
    MissingRootfs { id: String, path: String },
    #[error("container {id} is {state}; {action} needs it {wanted}")]
    WrongState {
        id: String,
        state: String,
        action: &'static str,
        wanted: &'static str,
    },
    #[error("process {exec_id} of container {container_id} has already exited")]
    ProcessExited {
        container_id: String,
        exec_id: String,
    },
    #[error("process {exec_id} of container {container_id} is still running")]
    ProcessRunning {
        container_id: String,
        exec_id: String,
    },
    #[error("stdio stream {0:?} was not connected in time")]
    StdioTimeout(String),
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("container {id}: {action} failed: {cause}")]
    Runtime {
        id: String,
        action: &'static str,
        cause: Box<libcontainer::error::LibcontainerError>,
    },
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    #[error("{what}: {cause}")]
    Sys { what: String, cause: nix::Error },
    #[error("network set-up: {0}")]
    Network(String),
    /// What the helper that makes container processes reported ([`crate::spawn`]): its
    /// message names the container and the step.
    #[error("{0}")]
    Helper(String),
    #[error("network set-up: {0}")]
    Netlink(shoal_netlink::NetlinkError),
}

// By hand, not `#[from]`: the messages carry the cause, so it is not also a `source()`
// (printed once, not twice, by a walk of the chain).
impl From<shoal_netlink::NetlinkError> for AgentError {
    fn from(e: shoal_netlink::NetlinkError) -> Self {
        AgentError::Netlink(e)
    }
}

impl AgentError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            what: what.into(),
            cause: source,
        }
    }

    pub fn sys(what: impl Into<String>, source: nix::Error) -> Self {
        AgentError::Sys {
            what: what.into(),
            cause: source,
        }
    }

    /// For `map_err`: libcontainer failed at `action` on container `id`.
    pub fn runtime(
        id: &str,
        action: &'static str,
    ) -> impl FnOnce(libcontainer::error::LibcontainerError) -> Self {
        let id = id.to_string();
        move |source| AgentError::Runtime {
            id,
            action,
            cause: Box::new(source),
        }
    }

    /// Container `id` is in `state`, but `action` needs it `wanted`.
    pub fn wrong_state(
        id: &str,
        state: libcontainer::container::ContainerStatus,
        action: &'static str,
        wanted: &'static str,
    ) -> Self {
        let state = format!("{state:?}").to_lowercase();
        AgentError::WrongState {
            id: id.into(),
            state,
            action,
            wanted,
        }
    }

    fn code(&self) -> Code {
        match self {
            // A process that has exited is not found for a signal, as runc's shim answers
            // ("process already finished"): containerd takes NotFound from a kill as done,
            // and CRI's StopPodSandbox/RemovePodSandbox failed on FailedPrecondition when a
            // process ended in the guest a moment before the shim had seen it (issue 22).
            AgentError::NoSuchContainer(_)
            | AgentError::NoSuchProcess { .. }
            | AgentError::ProcessExited { .. } => Code::NOT_FOUND,
            AgentError::ContainerExists(_) | AgentError::ProcessExists { .. } => {
                Code::ALREADY_EXISTS
            }
            AgentError::InvalidId(_)
            | AgentError::InvalidSpec(_)
            | AgentError::InvalidProcess(_)
            | AgentError::InvalidResources(_)
            | AgentError::InvalidRequest(_)
            | AgentError::MissingRootfs { .. }
            | AgentError::Network(_) => Code::INVALID_ARGUMENT,
            AgentError::WrongState { .. } | AgentError::ProcessRunning { .. } => {
                Code::FAILED_PRECONDITION
            }
            AgentError::StdioTimeout(_) => Code::DEADLINE_EXCEEDED,
            AgentError::Unsupported(_) => Code::UNIMPLEMENTED,
            AgentError::Runtime { .. }
            | AgentError::Helper(_)
            | AgentError::Io { .. }
            | AgentError::Sys { .. }
            | AgentError::Netlink(_) => Code::INTERNAL,
        }
    }
}

impl From<AgentError> for TtrpcError {
    fn from(e: AgentError) -> Self {
        TtrpcError::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// Container and exec ids become file names and cgroup names: keep them tame.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        validate_id("abc-1.2_x").unwrap();
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129), "é"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn codes() {
        let e: TtrpcError = AgentError::NoSuchContainer("c1".into()).into();
        match e {
            TtrpcError::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert!(s.message().contains("c1"));
            }
            other => panic!("{other:?}"),
        }
    }
}
