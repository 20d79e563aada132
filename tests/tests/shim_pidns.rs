//! PID namespaces of CRI pods (test ladder rung 5, as shim_cri): shareProcessNamespace's pod
//! namespace with `pause` as PID 1, and `kubectl debug --target`'s ephemeral container in
//! its target's namespace.
//!
//! Needs root, containerd, containernetworking-plugins, qemu-system-x86_64, mkfs.erofs,
//! `make build` and `make guest`.

use std::fs;

use tests::containerd::{tail, Containerd};
use tests::cri::{self, container_config, pod_config};
use tests::crienv::{cri_env, IMAGE};

/// The CRI's namespace options with the PID namespace in `mode`.
fn pid_mode(mode: cri::v1::NamespaceMode) -> Option<cri::v1::NamespaceOption> {
    Some(cri::v1::NamespaceOption {
        pid: mode as i32,
        ..Default::default()
    })
}

/// A pod whose sandbox has the PID namespace in `mode`: (its id, its config).
fn pod_with_pid_mode(
    cri: &mut cri::Cri,
    c: &Containerd,
    name: &str,
    mode: cri::v1::NamespaceMode,
) -> (String, cri::v1::PodSandboxConfig) {
    let logs = c.dir.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let mut cfg = pod_config(name, &logs);
    cfg.linux = Some(cri::v1::LinuxPodSandboxConfig {
        security_context: Some(cri::v1::LinuxSandboxSecurityContext {
            namespace_options: pid_mode(mode),
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = cri
        .run_pod(cfg.clone())
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", tail(&c.log(), 40)));
    (pod, cfg)
}

/// Starts container `name` of `pod` sleeping `seconds`, with namespace options `ns`.
fn start_sleeper(
    cri: &mut cri::Cri,
    c: &Containerd,
    (pod, cfg): (&str, &cri::v1::PodSandboxConfig),
    name: &str,
    seconds: &str,
    ns: Option<cri::v1::NamespaceOption>,
) -> String {
    let mut ctr = container_config(name, IMAGE, &["sleep", seconds], vec![]);
    ctr.linux = Some(cri::v1::LinuxContainerConfig {
        security_context: Some(cri::v1::LinuxContainerSecurityContext {
            namespace_options: ns,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = cri
        .create_container(pod, ctr, cfg)
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", tail(&c.log(), 40)));
    cri.start_container(&id).unwrap();
    id
}

/// "PID command line" of every process container `id` sees.
fn processes_seen_by(cri: &mut cri::Cri, id: &str) -> String {
    let list =
        "for p in /proc/[0-9]*; do echo \"${p#/proc/} $(cat $p/cmdline | tr '\\0' ' ')\"; done";
    let r = cri.exec_sync(id, &["sh", "-c", list]).unwrap();
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stdout).into_owned()
}

#[test]
fn share_process_namespace_shows_pause_as_pid_1_and_hides_the_agent() {
    let (_ns, c, mut cri) = cri_env("kvcripid");
    let (pod, cfg) = pod_with_pid_mode(&mut cri, &c, "sharedpid", cri::v1::NamespaceMode::Pod);
    let mut ids = Vec::new();
    for (name, seconds) in [("first", "1001"), ("second", "1002")] {
        let mode = pid_mode(cri::v1::NamespaceMode::Pod);
        ids.push(start_sleeper(
            &mut cri,
            &c,
            (&pod, &cfg),
            name,
            seconds,
            mode,
        ));
    }
    // Every process of the namespace: PID 1 is `pause`, both containers' sleeps are there,
    // and the agent (the VM's init) is not.
    let out = processes_seen_by(&mut cri, &ids[1]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"1 pause "), "{out}");
    assert!(lines.iter().any(|l| l.ends_with(" sleep 1001 ")), "{out}");
    assert!(lines.iter().any(|l| l.ends_with(" sleep 1002 ")), "{out}");
    assert!(!out.contains("init"), "the agent is visible: {out}");
    // PID 1 of the namespace takes no signal from inside it: the pod's namespace stays.
    let r = cri
        .exec_sync(
            &ids[0],
            &["sh", "-c", "kill -9 1; sleep 1; cat /proc/1/cmdline"],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "pause\0");
    cri.stop_pod(&pod).unwrap();
    cri.remove_pod(&pod).unwrap();
}

/// `kubectl debug --target=app`: kubelet creates the debug container with the TARGET PID
/// mode and containerd gives it the path of the namespace of the PID `app` reported. It
/// sees `app`'s processes, `app`'s init as its PID 1, and neither `pause` nor the agent.
#[test]
fn a_debug_container_with_a_target_shares_the_targets_pid_namespace() {
    let (_ns, c, mut cri) = cri_env("kvcritgt");
    let own = cri::v1::NamespaceMode::Container;
    let (pod, cfg) = pod_with_pid_mode(&mut cri, &c, "debugtarget", own);
    let app = start_sleeper(&mut cri, &c, (&pod, &cfg), "app", "1005", pid_mode(own));
    let target = Some(cri::v1::NamespaceOption {
        pid: cri::v1::NamespaceMode::Target as i32,
        target_id: app.clone(),
        ..Default::default()
    });
    let debug = start_sleeper(&mut cri, &c, (&pod, &cfg), "debug", "1006", target);
    for (who, id) in [("debug", &debug), ("app", &app)] {
        let out = processes_seen_by(&mut cri, id);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.contains(&"1 sleep 1005 "), "{who} sees: {out}");
        assert!(
            lines.iter().any(|l| l.ends_with(" sleep 1006 ")),
            "{who} sees: {out}"
        );
        assert!(
            !out.contains("pause") && !out.contains("init"),
            "{who} sees: {out}"
        );
    }
    cri.stop_pod(&pod).unwrap();
    cri.remove_pod(&pod).unwrap();
}
