//! The pod's containers as containerd sees them: creating a task (rootfs, mounts, the VM for
//! the first one), starting its processes, pausing, deleting, and the events. The RPC glue is
//! in `rpc.rs`, the shim's `start`/`delete` actions in `lifecycle.rs`. One shim and one VM per
//! pod; every container of the pod runs in that VM through the agent.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use containerd_shim::api;
use containerd_shim::protos::events::task::{
    TaskDelete, TaskExit, TaskOOM, TaskPaused, TaskResumed,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::ExitSignal;
use protocol::agent::{
    ContainerRequest, CreateContainerRequest, ExecProcessRequest, ProcessRequest, Rootfs,
};

use crate::cgroup::{self, Limits, PodCgroup};
use crate::config::ShimConfig;
use crate::error::{Result, ShimError};
use crate::events::Publisher;
use crate::exporter;
use crate::mounts;
use crate::network;
use crate::phases::Phases;
use crate::pod::{ctx, Pod, PodSpec, SCRATCH_ID};
use crate::rates;
use crate::rootfs;
use crate::stdio::{Pumps, StdioPaths};
use crate::task::{ExitInfo, Proc, Status, Task};

/// CRI annotations that group a pod's containers into one shim (and VM).
pub(crate) const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// `sandbox` for the CRI's pod sandbox (pause) container.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

pub(crate) fn timestamp(unix_ns: i64) -> MessageField<Timestamp> {
    MessageField::some(Timestamp {
        seconds: unix_ns.div_euclid(1_000_000_000),
        nanos: unix_ns.rem_euclid(1_000_000_000) as i32,
        ..Default::default()
    })
}

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The pod's state directory: a short name from a hash of namespace and id, because the
/// vsock sockets inside must fit a Unix socket path (108 bytes) and CRI ids are 64 bytes.
pub(crate) fn state_dir(cfg: &ShimConfig, namespace: &str, id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("{namespace}/{id}").as_bytes());
    let short: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
    cfg.state_dir.join(short)
}

/// The Task service containerd calls.
pub struct TaskService {
    pub(crate) publisher: Arc<Publisher>,
    pub(crate) namespace: String,
    pub(crate) exit: Arc<ExitSignal>,
    /// A bad config file fails each Create with its message rather than the shim's start.
    config: Result<ShimConfig>,
    pub(crate) tasks: Mutex<HashMap<String, Arc<Task>>>,
    /// The pod's VM, from the first Create to the owner's Delete.
    pod: Mutex<Option<Arc<Pod>>>,
    /// Creates run one at a time (slots, the first boot).
    create_lock: Mutex<()>,
}

/// How long an exit's report waits for kill requests in flight (see Proc::signals_answered);
/// longer than an agent call takes unless the agent is stuck.
const SIGNAL_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Records how a process ended and tells containerd (once its output is all delivered, and
/// kill requests for it answered).
fn report_exit(
    publisher: &Publisher,
    ns: &str,
    task: &Task,
    p: &Proc,
    waited: protocol::ttrpc::Result<protocol::agent::WaitResponse>,
    drained: std::time::Duration,
) {
    let exit = match waited {
        Ok(w) => ExitInfo {
            status: w.exit_status as u32,
            at_unix_ns: w.exited_at_unix_ns,
        },
        Err(e) => {
            log::warn!("container {}: wait {}: {e}", task.id, p.exec_id);
            ExitInfo {
                status: 255,
                at_unix_ns: now_ns(),
            }
        }
    };
    p.stdin.request_close(); // nothing reads it any more: end the stdin pump
    if !p.signals_answered(SIGNAL_ANSWER_WAIT) {
        log::warn!(
            "container {}: process {:?}: a kill is still unanswered after {:?}; reporting its exit",
            task.id,
            p.exec_id,
            SIGNAL_ANSWER_WAIT
        );
    }
    log::info!(
        "container {}: process {:?} exited with {}, output drained in {:.1} ms",
        task.id,
        p.exec_id,
        exit.status,
        drained.as_secs_f64() * 1e3
    );
    p.exit(exit);
    let ev = TaskExit {
        container_id: task.id.clone(),
        id: if p.exec_id.is_empty() {
            task.id.clone()
        } else {
            p.exec_id.clone()
        },
        pid: p.pid(),
        exit_status: exit.status,
        exited_at: timestamp(exit.at_unix_ns),
        ..Default::default()
    };
    publish(publisher, ns, topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev));
}

pub(crate) fn publish(p: &Publisher, ns: &str, topic: &str, event: Box<dyn MessageDyn>) {
    if let Err(e) = p.publish(ns, topic, &*event) {
        log::warn!("{e}");
    }
}

/// CPUs the host has online (the VM's vCPUs never outnumber them).
fn host_cpus() -> usize {
    fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|l| cgroup::parse_cpus(l.trim()).ok())
        .map_or(1, |s| s.len().max(1))
}

/// VM size. Under a memory limit (the pod's cgroup: its containers' limits plus the
/// RuntimeClass overhead) the guest gets the limit minus the VM's own overhead; a lone
/// container gets its limit plus room for the guest. vCPUs: the default, plus as many as
/// the CPU limit needs (the limit itself is enforced on the host by the cgroup).
fn vm_size(spec: &serde_json::Value, cfg: &ShimConfig, limits: Limits) -> Result<(u64, u8)> {
    let res = &spec["linux"]["resources"];
    let memory = match limits.memory_bytes {
        Some(bytes) => {
            let mib = bytes >> 20;
            mib.checked_sub(cfg.vm_overhead_mib)
                .filter(|guest| *guest >= 64)
                .ok_or_else(|| {
                    ShimError::invalid(
                        "pod memory limit",
                        format!(
                            "{mib} MiB leaves less than 64 MiB for the guest once the VM's \
                             overhead of {} MiB is taken (vm_overhead_mib in {}; the \
                             RuntimeClass's overhead.podFixed.memory adds it to the pod)",
                            cfg.vm_overhead_mib,
                            crate::config::DEFAULT_PATH
                        ),
                    )
                })?
        }
        None => res["memory"]["limit"]
            .as_i64()
            .filter(|l| *l > 0)
            .map(|l| (l as u64 >> 20) + 128)
            .unwrap_or(cfg.default_memory_mib)
            .max(cfg.default_memory_mib),
    };
    let vcpus = match limits.cpus {
        Some(cpus) => cfg.default_vcpus as usize + cpus.ceil() as usize,
        None => cfg.default_vcpus as usize,
    };
    Ok((memory, vcpus.clamp(1, host_cpus().min(255)) as u8))
}

/// The labels of a pod's metrics: the sandbox id and, from the CRI, the pod's name and
/// namespace.
fn metric_labels(id: &str, spec: &serde_json::Value) -> String {
    let mut l = vec![exporter::label("sandbox_id", id)];
    for (name, key) in [
        ("pod", "io.kubernetes.cri.sandbox-name"),
        ("namespace", "io.kubernetes.cri.sandbox-namespace"),
    ] {
        if let Some(v) = spec["annotations"][key].as_str() {
            l.push(exporter::label(name, v));
        }
    }
    l.join(",")
}

/// Moves the shim into the pod's host cgroup before the VM starts (see `cgroup`). A lone
/// container's CPU quota is applied there as runc would; a CRI sandbox's cgroup sits under
/// the pod cgroup kubelet made, which carries the pod's limits.
fn join_cgroup(
    path: &str,
    spec: &serde_json::Value,
    sandbox: bool,
    dir: &Path,
) -> Result<PodCgroup> {
    let cg = PodCgroup::join(path)?;
    // For `delete` after a crash of this shim.
    fs::write(dir.join("cgroup"), &cg.path).map_err(ShimError::io("write the cgroup path"))?;
    let cpu = &spec["linux"]["resources"]["cpu"];
    if !sandbox && (cpu["quota"].is_i64() || cpu["period"].is_u64()) {
        cg.set_cpu(cpu["quota"].as_i64(), cpu["period"].as_u64())?;
    }
    Ok(cg)
}

impl TaskService {
    pub fn new(publisher: Publisher, namespace: String, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            publisher: Arc::new(publisher),
            namespace,
            exit,
            config: ShimConfig::load(),
            tasks: Mutex::default(),
            pod: Mutex::default(),
            create_lock: Mutex::default(),
        }
    }

    fn config(&self) -> Result<&ShimConfig> {
        self.config
            .as_ref()
            .map_err(|e| ShimError::invalid("shim configuration", e.to_string()))
    }

    pub(crate) fn task(&self, id: &str) -> Result<Arc<Task>> {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("container {id}")))
    }

    /// The running container of pod `owner` (not its sandbox) whose init reported `pid`.
    fn container_with_pid(&self, pid: u32, owner: &str) -> Option<String> {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|t| t.id != owner && t.init.pid() == pid && t.init.status() == Status::Running)
            .map(|t| t.id.clone())
    }

    pub(crate) fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Task>, Arc<Proc>)> {
        let t = self.task(id)?;
        let p = t
            .process(exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("process {exec_id} of container {id}")))?;
        Ok((t, p))
    }

    /// The pod's VM, booted for its first task.
    fn pod_for(
        &self,
        req: &api::CreateTaskRequest,
        spec: &serde_json::Value,
    ) -> Result<(Arc<Pod>, bool)> {
        let cfg = self.config()?;
        let mut pod = self.pod.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pod.as_ref() {
            return Ok((p.clone(), false));
        }
        let sandbox = spec["annotations"][CONTAINER_TYPE] == "sandbox";
        let rates = rates::from_spec(spec)?;
        let mut phases = Phases::default();
        let network = match network::netns_of(spec, sandbox)? {
            Some(ns) => Some(network::discover(&ns)?),
            None => None,
        };
        phases.mark("network discovery");
        let dir = state_dir(cfg, &self.namespace, &req.id);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(ShimError::io(format!("create {}", dir.display())))?;
        let booted = (|| {
            let cgroup = match spec["linux"]["cgroupsPath"].as_str() {
                Some(path) if !path.is_empty() => Some(join_cgroup(path, spec, sandbox, &dir)?),
                _ => None,
            };
            let limits = cgroup.as_ref().map(PodCgroup::limits).unwrap_or_default();
            let (memory_mib, vcpus) = vm_size(spec, cfg, limits)?;
            phases.mark("cgroup");
            Pod::boot(
                cfg,
                PodSpec {
                    id: req.id.clone(),
                    dir: dir.clone(),
                    memory_mib,
                    vcpus,
                    hostname: spec["hostname"].as_str().unwrap_or_default().to_owned(),
                    network,
                    cgroup,
                    labels: metric_labels(&req.id, spec),
                    rates,
                    host_pid: sandbox && crate::pidns::host_pid(spec),
                },
                &mut phases,
            )
        })();
        match booted {
            Ok(p) => {
                log::info!("pod {}: boot phases: {}", req.id, phases.line());
                let p = Arc::new(p);
                if let Err(e) = self.watch_oom(&p) {
                    log::warn!("pod {}: no OOM events: {e}", req.id);
                }
                *pod = Some(p.clone());
                Ok((p, true))
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    pub(crate) fn create_task(&self, req: &api::CreateTaskRequest) -> Result<(Arc<Task>, u32)> {
        let cfg = self.config()?;
        let _one_at_a_time = self.create_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&req.id)
        {
            return Err(ShimError::Exists(format!("container {}", req.id)));
        }
        let bundle = Path::new(&req.bundle);
        let spec_bytes = fs::read(bundle.join("config.json"))
            .map_err(ShimError::io(format!("read {}/config.json", req.bundle)))?;
        let mut spec: serde_json::Value = serde_json::from_slice(&spec_bytes)
            .map_err(|e| ShimError::invalid("OCI spec", e.to_string()))?;
        let layers = rootfs::Layers::from_mounts(&req.rootfs, bundle)?;
        let needs = mounts::rewrite(&mut spec, &req.id)?;
        let (pod, booted) = self.pod_for(req, &spec)?;
        let cpus = spec["linux"]["resources"]["cpu"]["cpus"]
            .as_str()
            .filter(|c| !c.is_empty())
            .map(str::to_owned);
        // A PID namespace path names the sandbox's (the pod's namespace) or, for
        // `kubectl debug --target`, the target container's.
        let pid_namespace_of = crate::pidns::joined_pid(&spec)
            .and_then(|pid| self.container_with_pid(pid, &pod.owner))
            .unwrap_or_default();
        let mut phases = Phases::default();
        let created = (|| {
            pod.set_container_cpus(&req.id, cpus.as_deref())?;
            let own = pod.dir.join(&req.id);
            fs::create_dir_all(&own).map_err(ShimError::io(format!("create {}", own.display())))?;
            let (image, cached) = rootfs::image(&layers, &cfg.image_cache, &own)?;
            phases.mark(if cached {
                "image (cached)"
            } else {
                "image (built)"
            });
            log::info!(
                "container {}: image {} ({})",
                req.id,
                image.display(),
                if cached { "cached" } else { "built" }
            );
            pod.files.add(&req.id, needs.copies)?;
            for (name, bytes) in &needs.tmpfs {
                pod.mount_tmpfs(name, *bytes)?;
            }
            phases.mark("files");
            let mut spec = spec;
            if pod.host_pid {
                crate::pidns::use_the_vms(&mut spec);
            }
            for (index, v) in &needs.volumes {
                let slot = pod.attach_volume(&v.host, v.read_only)?;
                mounts::set_volume_source(&mut spec, *index, &slot);
            }
            let spec_bytes = serde_json::to_vec(&spec)
                .map_err(|e| ShimError::invalid("OCI spec", e.to_string()))?;
            let slot = pod.attach_image(&image)?;
            phases.mark("volumes and image slot");
            let create = CreateContainerRequest {
                container_id: req.id.clone(),
                oci_spec: spec_bytes.clone(),
                rootfs: MessageField::some(Rootfs {
                    image_device_id: slot.clone(),
                    scratch_device_id: SCRATCH_ID.into(),
                    ..Default::default()
                }),
                stdin: !req.stdin.is_empty(),
                pid_namespace_of: pid_namespace_of.clone(),
                ..Default::default()
            };
            if let Err(e) = pod.agent.create_container(ctx(), &create) {
                pod.detach_image(&slot);
                return Err(ShimError::agent("create container")(e));
            }
            phases.mark("agent create");
            Ok(slot)
        })();
        let slot = match created {
            Ok(s) => s,
            Err(e) => {
                pod.files.remove(&req.id);
                let _ = pod.set_container_cpus(&req.id, None);
                let _ = fs::remove_dir_all(pod.dir.join(&req.id));
                if booted {
                    self.end_pod();
                }
                return Err(e);
            }
        };
        log::info!("container {}: create phases: {}", req.id, phases.line());
        let io = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let vm_pid = pod.vm_pid;
        let task = Arc::new(Task {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            pod,
            slot,
            init: Proc::new("", io, Vec::new()).map_err(ShimError::io("open the process stdin"))?,
            execs: Mutex::default(),
        });
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.id.clone(), task.clone());
        Ok((task, vm_pid))
    }

    /// Shuts the pod's VM down and removes its state.
    fn end_pod(&self) {
        if let Some(pod) = self.pod.lock().unwrap_or_else(|e| e.into_inner()).take() {
            pod.shutdown();
            let _ = fs::remove_dir_all(&pod.dir);
        }
    }

    /// Passes the guest's OOM kills on as events, from a task on the agent connection's
    /// runtime that ends with the connection.
    fn watch_oom(&self, pod: &Arc<Pod>) -> Result<()> {
        let agent = pod.agent.asynchronous();
        let publisher = self.publisher.clone();
        let ns = self.namespace.clone();
        let rt = protocol::blocking::handle().map_err(ShimError::io("watch for OOM kills"))?;
        rt.spawn(async move {
            let ctx = protocol::ttrpc::context::Context::default;
            while let Ok(ev) = agent.get_oom_event(ctx(), &Default::default()).await {
                let (publisher, ns) = (publisher.clone(), ns.clone());
                let oom = TaskOOM {
                    container_id: ev.container_id,
                    ..Default::default()
                };
                // Publishing blocks: off the runtime's thread.
                let _ = tokio::task::spawn_blocking(move || {
                    publish(&publisher, &ns, topics::TASK_OOM_EVENT_TOPIC, Box::new(oom))
                })
                .await;
            }
        });
        Ok(())
    }

    pub(crate) fn start_process(&self, t: &Arc<Task>, p: &Arc<Proc>) -> Result<u32> {
        let agent = &t.pod.agent;
        let mut phases = Phases::default();
        let guest_pid = if p.exec_id.is_empty() {
            agent
                .start_container(
                    ctx(),
                    &ContainerRequest {
                        container_id: t.id.clone(),
                        ..Default::default()
                    },
                )
                .map_err(ShimError::agent("start container"))?
                .pid
        } else {
            let req = ExecProcessRequest {
                container_id: t.id.clone(),
                exec_id: p.exec_id.clone(),
                process: p.spec.clone(),
                stdin: !p.io.stdin.is_empty(),
                ..Default::default()
            };
            agent
                .exec_process(ctx(), &req)
                .map_err(ShimError::agent("exec"))?
                .pid
        };
        p.started(guest_pid);
        if p.exec_id.is_empty() {
            phases.mark("agent start");
            log::info!("container {}: start phases: {}", t.id, phases.line());
        }
        let pumps = Pumps::start(agent, &t.id, &p.exec_id, &p.io, &p.stdin)
            .map_err(ShimError::io("start copying the process's output"))?;
        // Exit is reported after the output reached containerd, so nothing is cut off. The
        // wait is a task on the agent connection's runtime (no thread held for the
        // process's life); what follows blocks, so it runs off the runtime's thread.
        let (agent, publisher, ns, task, proc_) = (
            agent.asynchronous(),
            self.publisher.clone(),
            self.namespace.clone(),
            t.clone(),
            p.clone(),
        );
        let rt = protocol::blocking::handle().map_err(ShimError::io("wait for the process"))?;
        rt.spawn(async move {
            let req = ProcessRequest {
                container_id: task.id.clone(),
                exec_id: proc_.exec_id.clone(),
                ..Default::default()
            };
            let waited = agent
                .wait_process(protocol::ttrpc::context::Context::default(), &req)
                .await;
            let ended = std::time::Instant::now();
            pumps.finish().await;
            let drained = ended.elapsed();
            tokio::task::spawn_blocking(move || {
                report_exit(&publisher, &ns, &task, &proc_, waited, drained)
            });
        });
        Ok(guest_pid)
    }

    /// Pause (freeze the container's cgroup in the guest) or resume it.
    pub(crate) fn freeze(&self, id: &str, pause: bool) -> Result<()> {
        let t = self.task(id)?;
        let r = ContainerRequest {
            container_id: id.to_owned(),
            ..Default::default()
        };
        let (topic, event): (&str, Box<dyn MessageDyn>) = if pause {
            t.pod
                .agent
                .pause_container(ctx(), &r)
                .map_err(ShimError::agent("pause"))?;
            let ev = TaskPaused {
                container_id: id.to_owned(),
                ..Default::default()
            };
            (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
        } else {
            t.pod
                .agent
                .resume_container(ctx(), &r)
                .map_err(ShimError::agent("resume"))?;
            let ev = TaskResumed {
                container_id: id.to_owned(),
                ..Default::default()
            };
            (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
        };
        t.init.set_paused(pause);
        publish(&self.publisher, &self.namespace, topic, event);
        Ok(())
    }

    pub(crate) fn delete_task(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        let (t, p) = self.process(id, exec_id)?;
        if !exec_id.is_empty() {
            if p.status() != Status::Stopped && p.status() != Status::Created {
                return Err(ShimError::invalid(
                    "delete",
                    format!("exec {exec_id} is still running"),
                ));
            }
            t.execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(exec_id);
        } else {
            if p.status() == Status::Running || p.status() == Status::Paused {
                return Err(ShimError::invalid(
                    "delete",
                    format!("container {id} is still running"),
                ));
            }
            let req = ContainerRequest {
                container_id: id.to_owned(),
                ..Default::default()
            };
            if let Err(e) = t.pod.agent.remove_container(ctx(), &req) {
                log::warn!("container {id}: remove in the guest: {e}");
            }
            t.pod.files.remove(id);
            t.pod.detach_image(&t.slot);
            if t.pod.owner != id {
                if let Err(e) = t.pod.set_container_cpus(id, None) {
                    log::warn!("container {id}: give back its CPUs: {e}");
                }
            }
            let _ = fs::remove_dir_all(t.pod.dir.join(id));
            self.tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            if t.pod.owner == id {
                self.end_pod();
            }
        }
        let exit = p.exit_info().unwrap_or_default();
        if exec_id.is_empty() {
            let ev = TaskDelete {
                container_id: id.to_owned(),
                pid: p.pid(),
                exit_status: exit.status,
                exited_at: timestamp(exit.at_unix_ns),
                ..Default::default()
            };
            publish(
                &self.publisher,
                &self.namespace,
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(ev),
            );
        }
        Ok(api::DeleteResponse {
            pid: p.pid(),
            exit_status: exit.status,
            exited_at: timestamp(exit.at_unix_ns),
            ..Default::default()
        })
    }
}
