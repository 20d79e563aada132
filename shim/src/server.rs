//! containerd's Task service on the async shim. Its connections are tasks on the shim's one
//! RPC thread (`main.rs`), not a thread pool per connection as with the sync shim. Each call's
//! body (`rpc.rs`) blocks on the agent, the VM or the disk, so it runs on the runtime's
//! blocking pool, whose threads leave when idle; Wait needs no thread at all.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::protos::ttrpc;
use containerd_shim::{TtrpcContext, TtrpcResult};

use crate::service::{timestamp, TaskService};

/// The Task service as containerd's ttrpc server calls it.
pub struct Server(Arc<TaskService>);

impl Server {
    pub fn new(service: TaskService) -> Server {
        Server(Arc::new(service))
    }

    /// Runs `call` on the blocking pool.
    async fn off_thread<R: Send + 'static>(
        &self,
        call: impl FnOnce(&TaskService) -> TtrpcResult<R> + Send + 'static,
    ) -> TtrpcResult<R> {
        let service = self.0.clone();
        tokio::task::spawn_blocking(move || call(&service))
            .await
            .map_err(|e| ttrpc::Error::Others(format!("the call's thread failed: {e}")))?
    }
}

/// The Task service: each call of the list runs its `TaskService` method of the same name off
/// the RPC thread; the rest are written out. (One macro makes the whole impl, as
/// `async_trait` must see the methods themselves.)
macro_rules! task_service {
    (off_thread { $($name:ident($req:ty) -> $resp:ty;)* } $($rest:tt)*) => {
        #[async_trait]
        impl containerd_shim::Task for Server {
            $(
                async fn $name(&self, _: &TtrpcContext, req: $req) -> TtrpcResult<$resp> {
                    self.off_thread(move |s| s.$name(req)).await
                }
            )*
            $($rest)*
        }
    };
}

task_service! {
    off_thread {
        create(api::CreateTaskRequest) -> api::CreateTaskResponse;
        start(api::StartRequest) -> api::StartResponse;
        state(api::StateRequest) -> api::StateResponse;
        delete(api::DeleteRequest) -> api::DeleteResponse;
        pids(api::PidsRequest) -> api::PidsResponse;
        pause(api::PauseRequest) -> api::Empty;
        resume(api::ResumeRequest) -> api::Empty;
        kill(api::KillRequest) -> api::Empty;
        exec(api::ExecProcessRequest) -> api::Empty;
        resize_pty(api::ResizePtyRequest) -> api::Empty;
        close_io(api::CloseIORequest) -> api::Empty;
        update(api::UpdateTaskRequest) -> api::Empty;
        stats(api::StatsRequest) -> api::StatsResponse;
        connect(api::ConnectRequest) -> api::ConnectResponse;
        shutdown(api::ShutdownRequest) -> api::Empty;
    }

    /// Waits for the process's exit on the RPC thread itself: a pod's Waits last as long as
    /// its containers, and each would otherwise hold a thread.
    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let (_, p) = self.0.process(&req.id, &req.exec_id)?;
        let exit = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: timestamp(exit.at_unix_ns),
            ..Default::default()
        })
    }
}
