//! The Task service's RPCs: decode containerd's request, call [`TaskService`], publish the
//! event, encode the answer.

use containerd_shim::api::{self, Status as ApiStatus};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskExecAdded, TaskExecStarted, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use containerd_shim::TtrpcResult;
use protocol::agent::{ContainerRequest, ResizeTtyRequest, SignalRequest, UpdateContainerRequest};

use crate::error::ShimError;
use crate::metrics;
use crate::pod::ctx;
use crate::service::{publish, timestamp, TaskService};
use crate::stdio::StdioPaths;
use crate::task::{Proc, Status};

fn api_status(s: Status) -> ApiStatus {
    match s {
        Status::Created => ApiStatus::CREATED,
        Status::Running => ApiStatus::RUNNING,
        Status::Paused => ApiStatus::PAUSED,
        Status::Stopped => ApiStatus::STOPPED,
    }
}

/// The calls' bodies, synchronous: `server.rs` runs each off the RPC thread.
impl TaskService {
    pub(crate) fn create(
        &self,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        log::info!("create container {} (bundle {})", req.id, req.bundle);
        let (_task, pid) = self.create_task(&req)?;
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        publish(
            &self.publisher,
            &self.namespace,
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(ev),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    pub(crate) fn start(&self, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let (t, p) = self.process(&req.id, &req.exec_id)?;
        self.start_process(&t, &p)?;
        let pid = p.pid();
        if req.exec_id.is_empty() {
            let ev = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            publish(
                &self.publisher,
                &self.namespace,
                topics::TASK_START_EVENT_TOPIC,
                Box::new(ev),
            );
        } else {
            let ev = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            publish(
                &self.publisher,
                &self.namespace,
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(ev),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    pub(crate) fn state(&self, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let (t, p) = self.process(&req.id, &req.exec_id)?;
        let exit = p.exit_info().unwrap_or_default();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: t.bundle.clone(),
            pid: p.pid(),
            status: api_status(p.status()).into(),
            stdin: p.io.stdin.clone(),
            stdout: p.io.stdout.clone(),
            stderr: p.io.stderr.clone(),
            terminal: p.io.terminal,
            exit_status: exit.status,
            exited_at: timestamp(exit.at_unix_ns),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    pub(crate) fn delete(&self, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.delete_task(&req.id, &req.exec_id)?)
    }

    pub(crate) fn pids(&self, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let t = self.task(&req.id)?;
        let r = t
            .pod
            .agent
            .list_processes(
                ctx(),
                &ContainerRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                },
            )
            .map_err(ShimError::agent("list processes"))?;
        let processes = r
            .pids
            .into_iter()
            .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    pub(crate) fn pause(&self, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.freeze(&req.id, true)?;
        Ok(api::Empty::new())
    }

    pub(crate) fn resume(&self, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.freeze(&req.id, false)?;
        Ok(api::Empty::new())
    }

    pub(crate) fn kill(&self, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (t, p) = self.process(&req.id, &req.exec_id)?;
        // Held until the answer: the process's exit is reported after it.
        let _signalling = p.signalling();
        if p.status() == Status::Stopped {
            return Ok(api::Empty::new());
        }
        let r = SignalRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            signal: req.signal,
            all: req.all,
            ..Default::default()
        };
        t.pod
            .agent
            .signal_process(ctx(), &r)
            .map_err(ShimError::agent("signal"))?;
        Ok(api::Empty::new())
    }

    pub(crate) fn exec(&self, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let t = self.task(&req.id)?;
        let mut execs = t.execs.lock().unwrap_or_else(|e| e.into_inner());
        if execs.contains_key(&req.exec_id) {
            return Err(ShimError::Exists(format!("exec {} in {}", req.exec_id, req.id)).into());
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a: &Any| a.value.clone())
            .unwrap_or_default();
        let io = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let p =
            Proc::new(&req.exec_id, io, spec).map_err(ShimError::io("open the process stdin"))?;
        execs.insert(req.exec_id.clone(), p);
        drop(execs);
        let ev = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        publish(
            &self.publisher,
            &self.namespace,
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(ev),
        );
        Ok(api::Empty::new())
    }

    pub(crate) fn resize_pty(&self, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let t = self.task(&req.id)?;
        let r = ResizeTtyRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            rows: req.height,
            cols: req.width,
            ..Default::default()
        };
        t.pod
            .agent
            .resize_tty(ctx(), &r)
            .map_err(ShimError::agent("resize"))?;
        Ok(api::Empty::new())
    }

    pub(crate) fn close_io(&self, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let (_, p) = self.process(&req.id, &req.exec_id)?;
        if req.stdin && !p.io.stdin.is_empty() {
            // The stdin pump delivers what is queued, then closes (also if not started yet).
            p.stdin.request_close();
        }
        Ok(api::Empty::new())
    }

    pub(crate) fn update(&self, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let t = self.task(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|a: &Any| a.value.clone())
            .unwrap_or_default();
        // The host side: a new CPU set moves the VM (the other limits bound the container
        // inside the guest; the pod's cgroup is kubelet's to resize).
        let parsed: serde_json::Value = serde_json::from_slice(&resources)
            .map_err(|e| ShimError::invalid("resources of the update", e.to_string()))?;
        if let Some(cpus) = parsed["cpu"]["cpus"].as_str().filter(|c| !c.is_empty()) {
            t.pod.set_container_cpus(&req.id, Some(cpus))?;
        }
        let r = UpdateContainerRequest {
            container_id: req.id.clone(),
            resources,
            ..Default::default()
        };
        t.pod
            .agent
            .update_container(ctx(), &r)
            .map_err(ShimError::agent("update"))?;
        Ok(api::Empty::new())
    }

    pub(crate) fn stats(&self, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let t = self.task(&req.id)?;
        let r = ContainerRequest {
            container_id: req.id.clone(),
            ..Default::default()
        };
        let s = t
            .pod
            .agent
            .stats_container(ctx(), &r)
            .map_err(ShimError::agent("stats"))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(
                metrics::to_any(&s).map_err(|e| ShimError::invalid("stats", e))?,
            ),
            ..Default::default()
        })
    }

    pub(crate) fn connect(&self, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.task(&req.id).map(|t| t.pod.vm_pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    pub(crate) fn shutdown(&self, _: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
