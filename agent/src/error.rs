//! The agent's error type and its mapping onto ttrpc status codes.

use protocol::ttrpc;

/// Everything a request to the agent can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("container {0:?} not found")]
    NoContainer(String),
    #[error("process {exec_id:?} of container {container:?} not found")]
    NoProcess { container: String, exec_id: String },
    #[error("container {0:?} already exists")]
    ContainerExists(String),
    #[error("process {exec_id:?} already exists in container {container:?}")]
    ProcessExists { container: String, exec_id: String },
    #[error("invalid {what}: {why}")]
    Invalid { what: String, why: String },
    #[error("no block device with serial {0:?} appeared")]
    NoDevice(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("container runtime: {what}: {why}")]
    Runtime { what: String, why: String },
    #[error("network: {0}")]
    Network(String),
}

pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    pub fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        AgentError::Invalid {
            what: what.into(),
            why: why.into(),
        }
    }

    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| AgentError::Io { what, source }
    }

    pub fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> Self {
        let what = what.into();
        move |source| AgentError::Sys { what, source }
    }

    pub fn runtime(
        what: impl Into<String>,
    ) -> impl FnOnce(libcontainer::error::LibcontainerError) -> Self {
        let what = what.into();
        move |e| AgentError::Runtime {
            what,
            why: e.to_string(),
        }
    }

    fn code(&self) -> ttrpc::Code {
        match self {
            AgentError::NoContainer(_) | AgentError::NoProcess { .. } => ttrpc::Code::NOT_FOUND,
            AgentError::ContainerExists(_) | AgentError::ProcessExists { .. } => {
                ttrpc::Code::ALREADY_EXISTS
            }
            AgentError::Invalid { .. } => ttrpc::Code::INVALID_ARGUMENT,
            AgentError::NoDevice(_) => ttrpc::Code::FAILED_PRECONDITION,
            _ => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        log::warn!("request failed: {e}");
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}
