//! The shim's error type and its mapping onto ttrpc status codes for containerd.

use containerd_shim::protos::ttrpc;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("invalid {what}: {why}")]
    Invalid { what: String, why: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed: {why}")]
    Command { what: String, why: String },
    #[error("starting the VM: {0}")]
    Vm(String),
    #[error("agent: {0}")]
    Agent(String),
    #[error("not supported: {0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, ShimError>;

impl ShimError {
    pub fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        ShimError::Invalid {
            what: what.into(),
            why: why.into(),
        }
    }

    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| ShimError::Io { what, source }
    }

    /// An agent call failed: keep the agent's own message, it names the problem.
    pub fn agent(what: &str) -> impl FnOnce(protocol::ttrpc::Error) -> Self + '_ {
        move |e| match e {
            protocol::ttrpc::Error::RpcStatus(s) => {
                ShimError::Agent(format!("{what}: {}", s.message()))
            }
            other => ShimError::Agent(format!("{what}: {other}")),
        }
    }

    fn code(&self) -> ttrpc::Code {
        match self {
            ShimError::Invalid { .. } => ttrpc::Code::INVALID_ARGUMENT,
            ShimError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            ShimError::Exists(_) => ttrpc::Code::ALREADY_EXISTS,
            ShimError::Unsupported(_) => ttrpc::Code::UNIMPLEMENTED,
            _ => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        log::error!("{e}");
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}
