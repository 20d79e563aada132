//! The ttrpc `Agent` service: decodes requests, calls the part that does the work, maps errors.

use std::sync::Arc;

use protocol::agent::*;
use protocol::agent_ttrpc::Agent;
use protocol::ttrpc::{self, TtrpcContext};

use crate::cgroup::OomWatcher;
use crate::container::{Containers, CreateOptions};
use crate::ports::Ports;
use crate::{init, network, sandbox, storage};

type Reply<T> = ttrpc::Result<T>;

/// State shared by every request.
#[derive(Debug)]
pub struct AgentService {
    pub containers: Arc<Containers>,
    pub oom: Arc<OomWatcher>,
    pub ports: Arc<Ports>,
    pub ready_after_boot_ns: u64,
}

/// Largest stdout/stderr chunk one read returns.
const MAX_READ: usize = 1 << 20;

impl Agent for AgentService {
    fn ping(&self, _: &TtrpcContext, _: PingRequest) -> Reply<PingResponse> {
        Ok(PingResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            kernel_release: init::kernel_release(),
            ready_after_boot_ns: self.ready_after_boot_ns,
            ..Default::default()
        })
    }

    fn setup_sandbox(&self, _: &TtrpcContext, r: SetupSandboxRequest) -> Reply<Empty> {
        if r.host_time_unix_ns != 0 {
            sandbox::set_time(r.host_time_unix_ns)?;
        }
        sandbox::set_hostname(&r.hostname)?;
        sandbox::set_dns(&r.dns_servers, &r.dns_searches, &r.dns_options)?;
        Ok(Empty::new())
    }

    fn configure_network(&self, _: &TtrpcContext, r: ConfigureNetworkRequest) -> Reply<Empty> {
        network::configure(&r)?;
        Ok(Empty::new())
    }

    fn mount_volume(&self, _: &TtrpcContext, r: MountVolumeRequest) -> Reply<Empty> {
        storage::mount_volume(&r.name, &r.device_id, &r.fstype, &r.options, r.read_only)?;
        Ok(Empty::new())
    }

    fn copy_file(&self, _: &TtrpcContext, r: CopyFileRequest) -> Reply<Empty> {
        sandbox::copy_file(&r.path, &r.data, r.mode, r.uid, r.gid)?;
        Ok(Empty::new())
    }

    fn set_time(&self, _: &TtrpcContext, r: SetTimeRequest) -> Reply<Empty> {
        sandbox::set_time(r.unix_ns)?;
        Ok(Empty::new())
    }

    fn create_container(&self, _: &TtrpcContext, r: CreateContainerRequest) -> Reply<Empty> {
        let rootfs = r.rootfs.into_option().unwrap_or_default();
        self.containers.create(&CreateOptions {
            id: &r.container_id,
            spec_json: &r.oci_spec,
            image_serial: &rootfs.image_device_id,
            scratch_serial: &rootfs.scratch_device_id,
            stdin: r.stdin,
            pid_namespace_of: &r.pid_namespace_of,
        })?;
        Ok(Empty::new())
    }

    fn start_container(&self, _: &TtrpcContext, r: ContainerRequest) -> Reply<StartResponse> {
        let pid = self.containers.start(&r.container_id)?;
        self.ports.kick();
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn remove_container(&self, _: &TtrpcContext, r: ContainerRequest) -> Reply<Empty> {
        self.containers.remove(&r.container_id)?;
        Ok(Empty::new())
    }

    fn exec_process(&self, _: &TtrpcContext, r: ExecProcessRequest) -> Reply<StartResponse> {
        let pid = self
            .containers
            .exec(&r.container_id, &r.exec_id, &r.process, r.stdin)?;
        self.ports.kick();
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn signal_process(&self, _: &TtrpcContext, r: SignalRequest) -> Reply<Empty> {
        self.containers
            .signal(&r.container_id, &r.exec_id, r.signal, r.all)?;
        self.ports.kick();
        Ok(Empty::new())
    }

    fn wait_process(&self, _: &TtrpcContext, r: ProcessRequest) -> Reply<WaitResponse> {
        let exit = self.containers.wait(&r.container_id, &r.exec_id)?;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at_unix_ns: exit.at_unix_ns,
            ..Default::default()
        })
    }

    fn list_processes(
        &self,
        _: &TtrpcContext,
        r: ContainerRequest,
    ) -> Reply<ListProcessesResponse> {
        Ok(ListProcessesResponse {
            pids: self.containers.pids(&r.container_id)?,
            ..Default::default()
        })
    }

    fn update_container(&self, _: &TtrpcContext, r: UpdateContainerRequest) -> Reply<Empty> {
        self.containers.update(&r.container_id, &r.resources)?;
        Ok(Empty::new())
    }

    fn pause_container(&self, _: &TtrpcContext, r: ContainerRequest) -> Reply<Empty> {
        self.containers.pause(&r.container_id)?;
        Ok(Empty::new())
    }

    fn resume_container(&self, _: &TtrpcContext, r: ContainerRequest) -> Reply<Empty> {
        self.containers.resume(&r.container_id)?;
        Ok(Empty::new())
    }

    fn stats_container(&self, _: &TtrpcContext, r: ContainerRequest) -> Reply<StatsResponse> {
        let u = self.containers.stats(&r.container_id)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        Ok(StatsResponse {
            cpu_usage_usec: u.cpu_usec,
            cpu_user_usec: u.cpu_user_usec,
            cpu_system_usec: u.cpu_system_usec,
            memory_usage_bytes: u.memory_bytes,
            memory_limit_bytes: u.memory_limit_bytes,
            memory_working_set_bytes: u.working_set_bytes,
            pids_current: u.pids,
            oom_kills: u.oom_kills,
            timestamp_unix_ns: now,
            ..Default::default()
        })
    }

    fn write_stdin(&self, _: &TtrpcContext, r: WriteStreamRequest) -> Reply<WriteStreamResponse> {
        let p = self.containers.process(&r.container_id, &r.exec_id)?;
        let len = p.stdio.write_stdin(&r.data)?;
        Ok(WriteStreamResponse {
            len: len as u32,
            ..Default::default()
        })
    }

    fn close_stdin(&self, _: &TtrpcContext, r: ProcessRequest) -> Reply<Empty> {
        self.containers
            .process(&r.container_id, &r.exec_id)?
            .stdio
            .close_stdin();
        Ok(Empty::new())
    }

    fn read_stdout(&self, _: &TtrpcContext, r: ReadStreamRequest) -> Reply<ReadStreamResponse> {
        let p = self.containers.process(&r.container_id, &r.exec_id)?;
        let data = p.stdio.read_stdout((r.max_len as usize).min(MAX_READ))?;
        Ok(ReadStreamResponse {
            data,
            ..Default::default()
        })
    }

    fn read_stderr(&self, _: &TtrpcContext, r: ReadStreamRequest) -> Reply<ReadStreamResponse> {
        let p = self.containers.process(&r.container_id, &r.exec_id)?;
        let data = p.stdio.read_stderr((r.max_len as usize).min(MAX_READ))?;
        Ok(ReadStreamResponse {
            data,
            ..Default::default()
        })
    }

    fn resize_tty(&self, _: &TtrpcContext, r: ResizeTtyRequest) -> Reply<Empty> {
        let p = self.containers.process(&r.container_id, &r.exec_id)?;
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        p.stdio.resize(clamp(r.rows), clamp(r.cols))?;
        Ok(Empty::new())
    }

    fn get_oom_event(&self, _: &TtrpcContext, _: Empty) -> Reply<OomEvent> {
        Ok(OomEvent {
            container_id: self.oom.next(),
            ..Default::default()
        })
    }

    fn watch_ports(&self, _: &TtrpcContext, r: WatchPortsRequest) -> Reply<PortsResponse> {
        let (generation, ports) = self.ports.wait_change(r.generation)?;
        Ok(PortsResponse {
            generation,
            ports: ports.into_iter().map(u32::from).collect(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _: &TtrpcContext, _: Empty) -> Reply<Empty> {
        log::info!(
            "shutdown requested; containers: {:?}",
            self.containers.ids()
        );
        // Answer first, then power off from another thread.
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            crate::power_off();
        });
        Ok(Empty::new())
    }
}
