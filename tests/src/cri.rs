//! A small blocking CRI client (what kubelet and crictl speak to containerd), for the
//! end-to-end tests and the demo: k8s-cri's generated gRPC client over containerd's socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1;

/// The runtime handler of RuntimeClass `kubevirt`.
pub const HANDLER: &str = "kubevirt";

#[derive(Debug)]
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

pub type Result<T> = std::result::Result<T, tonic::Status>;

impl Cri {
    pub fn connect(socket: &Path) -> std::io::Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let path = socket.to_path_buf();
        let channel = rt.block_on(async move {
            Endpoint::try_from("http://[::]:50051")
                .map_err(std::io::Error::other)?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(std::io::Error::other)
        })?;
        Ok(Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
        })
    }

    pub fn version(&mut self) -> Result<VersionResponse> {
        let c = &mut self.client;
        self.rt.block_on(async {
            c.version(VersionRequest::default())
                .await
                .map(|r| r.into_inner())
        })
    }

    pub fn run_pod(&mut self, config: PodSandboxConfig) -> Result<String> {
        self.run_pod_with(config, HANDLER)
    }

    /// RunPodSandbox with another runtime handler ("" is containerd's default, runc).
    pub fn run_pod_with(&mut self, config: PodSandboxConfig, handler: &str) -> Result<String> {
        let req = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: handler.into(),
        };
        let c = &mut self.client;
        self.rt.block_on(async {
            c.run_pod_sandbox(req)
                .await
                .map(|r| r.into_inner().pod_sandbox_id)
        })
    }

    pub fn create_container(
        &mut self,
        pod: &str,
        config: ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String> {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        let c = &mut self.client;
        self.rt.block_on(async {
            c.create_container(req)
                .await
                .map(|r| r.into_inner().container_id)
        })
    }

    pub fn start_container(&mut self, id: &str) -> Result<()> {
        let req = StartContainerRequest {
            container_id: id.into(),
        };
        let c = &mut self.client;
        self.rt
            .block_on(async { c.start_container(req).await.map(drop) })
    }

    pub fn container_status(&mut self, id: &str) -> Result<ContainerStatus> {
        let req = ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let c = &mut self.client;
        self.rt.block_on(async {
            c.container_status(req)
                .await
                .map(|r| r.into_inner().status.unwrap_or_default())
        })
    }

    pub fn pod_status(&mut self, id: &str) -> Result<PodSandboxStatus> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        let c = &mut self.client;
        self.rt.block_on(async {
            c.pod_sandbox_status(req)
                .await
                .map(|r| r.into_inner().status.unwrap_or_default())
        })
    }

    pub fn exec_sync(&mut self, id: &str, cmd: &[&str]) -> Result<ExecSyncResponse> {
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        let c = &mut self.client;
        self.rt
            .block_on(async { c.exec_sync(req).await.map(|r| r.into_inner()) })
    }

    pub fn container_stats(&mut self, id: &str) -> Result<ContainerStats> {
        let req = ContainerStatsRequest {
            container_id: id.into(),
        };
        let c = &mut self.client;
        self.rt.block_on(async {
            c.container_stats(req)
                .await
                .map(|r| r.into_inner().stats.unwrap_or_default())
        })
    }

    pub fn pod_stats(&mut self, id: &str) -> Result<PodSandboxStats> {
        let req = PodSandboxStatsRequest {
            pod_sandbox_id: id.into(),
        };
        let c = &mut self.client;
        self.rt.block_on(async {
            c.pod_sandbox_stats(req)
                .await
                .map(|r| r.into_inner().stats.unwrap_or_default())
        })
    }

    /// The streaming URL of an exec (kubectl exec); see `stream`.
    pub fn exec(&mut self, req: ExecRequest) -> Result<String> {
        let c = &mut self.client;
        self.rt
            .block_on(async { c.exec(req).await.map(|r| r.into_inner().url) })
    }

    /// The streaming URL of an attach (kubectl attach); see `stream`.
    pub fn attach(&mut self, req: AttachRequest) -> Result<String> {
        let c = &mut self.client;
        self.rt
            .block_on(async { c.attach(req).await.map(|r| r.into_inner().url) })
    }

    /// The streaming URL of a port forward to `port` of `pod` (kubectl port-forward); see
    /// `stream`.
    pub fn port_forward(&mut self, pod: &str, port: u16) -> Result<String> {
        let req = PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![port.into()],
        };
        let c = &mut self.client;
        self.rt
            .block_on(async { c.port_forward(req).await.map(|r| r.into_inner().url) })
    }

    pub fn update_resources(&mut self, id: &str, r: LinuxContainerResources) -> Result<()> {
        let req = UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(r),
            ..Default::default()
        };
        let c = &mut self.client;
        self.rt
            .block_on(async { c.update_container_resources(req).await.map(drop) })
    }

    pub fn stop_pod(&mut self, id: &str) -> Result<()> {
        let req = StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let c = &mut self.client;
        self.rt
            .block_on(async { c.stop_pod_sandbox(req).await.map(drop) })
    }

    pub fn remove_pod(&mut self, id: &str) -> Result<()> {
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let c = &mut self.client;
        self.rt
            .block_on(async { c.remove_pod_sandbox(req).await.map(drop) })
    }
}

/// A pod sandbox config as kubelet would send it for pod `name`.
pub fn pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

/// A container config for `image` running `command`, logging to `<name>.log`.
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    mounts: Vec<Mount>,
) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        mounts,
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// A bind mount of a host path.
pub fn bind(host: &Path, container: &str, readonly: bool) -> Mount {
    Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

/// Where the container's log lands: `<log_directory>/<log_path>`.
pub fn log_file(log_dir: &Path, name: &str) -> PathBuf {
    log_dir.join(format!("{name}.log"))
}
