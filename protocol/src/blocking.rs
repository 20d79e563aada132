//! The host's agent client: blocking calls over ttrpc's async client.
//!
//! ttrpc's sync client waits for answers in poll(2) with a 10 ms timeout (so that it notices
//! its own shutdown), which wakes its process 100 times a second for as long as the
//! connection is open: most of an idle pod's shim CPU. The async client sleeps until a
//! message comes. The shim's code is synchronous, so each call blocks its thread on the async
//! client while one small runtime, shared by the process, runs the connections.

use std::future::Future;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use ttrpc::asynchronous::transport::Socket;

/// A connection to the agent; clones share it, and it closes when the last one goes.
#[derive(Clone)]
pub struct AgentClient {
    client: crate::agent_ttrpc_async::AgentClient,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentClient")
    }
}

impl AgentClient {
    /// Speaks ttrpc on `stream` (already connected to the agent's port).
    pub fn new(stream: UnixStream) -> std::io::Result<AgentClient> {
        Ok(AgentClient {
            client: crate::agent_ttrpc_async::AgentClient::new(client(stream)?),
        })
    }

    /// The same connection's async client, for tasks on [`handle`]'s runtime (long polls
    /// that would otherwise each hold a thread).
    pub fn asynchronous(&self) -> crate::agent_ttrpc_async::AgentClient {
        self.client.clone()
    }
}

/// The runtime that serves the connections, to spawn tasks on.
pub fn handle() -> std::io::Result<tokio::runtime::Handle> {
    runtime().map(|rt| rt.handle().clone())
}

include!(concat!(env!("OUT_DIR"), "/blocking_methods.rs"));

/// An async ttrpc client on `stream`, its connection served by [`runtime`].
pub fn client(stream: UnixStream) -> std::io::Result<ttrpc::asynchronous::Client> {
    stream.set_nonblocking(true)?;
    let rt = runtime()?;
    // The client spawns its reader and writer tasks, which needs the runtime's context.
    let _enter = rt.enter();
    let stream = tokio::net::UnixStream::from_std(stream)?;
    Ok(ttrpc::asynchronous::Client::new(Socket::from(stream)))
}

/// Runs `fut` (a call on a client from [`client`]) to its end on the calling thread.
///
/// Must not be called from a task of the runtime itself (tokio refuses to block there); the
/// shim's threads are plain threads.
pub fn block_on<T>(fut: impl Future<Output = ttrpc::Result<T>>) -> ttrpc::Result<T> {
    match runtime() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => Err(ttrpc::Error::Others(format!("ttrpc runtime: {e}"))),
    }
}

/// The process's runtime for ttrpc connections: one worker thread, `ttrpc-io`, with timers
/// for calls with a deadline. It idles without waking.
fn runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("ttrpc-io")
                .enable_io()
                .enable_time()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| std::io::Error::other(e.clone()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::agent::{ContainerRequest, PingRequest, PingResponse};
    use crate::agent_ttrpc::{create_agent, Agent};
    use ttrpc::context::Context;

    struct Answers;

    impl Agent for Answers {
        fn ping(&self, _: &ttrpc::TtrpcContext, _: PingRequest) -> ttrpc::Result<PingResponse> {
            Ok(PingResponse {
                version: "answered".into(),
                ..Default::default()
            })
        }
    }

    /// Context switches of this process's threads named `name`.
    fn switches(name: &str) -> u64 {
        let mut n = 0;
        for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() != name {
                continue;
            }
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            n += status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        n
    }

    #[test]
    fn calls_are_answered_and_an_idle_connection_sleeps() {
        let path = std::env::temp_dir().join(format!("protocol-blocking-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", path.display()))
            .unwrap()
            .register_service(create_agent(Arc::new(Answers)));
        server.start().unwrap();
        let client = AgentClient::new(UnixStream::connect(&path).unwrap()).unwrap();
        let r = client
            .ping(Context::default(), &PingRequest::new())
            .unwrap();
        assert_eq!(r.version, "answered");
        // A clone shares the connection; the server's refusal comes back as its status.
        let e = client
            .clone()
            .stats_container(Context::default(), &ContainerRequest::new())
            .unwrap_err();
        assert!(
            matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::NOT_FOUND),
            "{e:?}"
        );

        // ttrpc's sync client would wake ~100 times in this second.
        let before = switches("ttrpc-io");
        assert!(before > 0, "no thread ttrpc-io served the calls");
        std::thread::sleep(Duration::from_secs(1));
        let woke = switches("ttrpc-io") - before;
        assert!(
            woke <= 3,
            "the idle connection's thread woke {woke} times in 1 s"
        );

        drop(client);
        server.shutdown();
        let _ = std::fs::remove_file(&path);
    }
}
