//! The manifests users apply (`runtimeclass.yaml`, `deploy/*.yaml`): Kubernetes' own schema
//! (kubernetes-validate, strict), and the real `kubectl apply --dry-run=client
//! --validate=false` against a stand-in API server on loopback that answers discovery only.
//!
//! Needs kubectl and the kubernetes-validate venv (`make deps`).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests() -> Vec<PathBuf> {
    let mut m = vec![repo().join("runtimeclass.yaml")];
    for e in std::fs::read_dir(repo().join("deploy")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "yaml") {
            m.push(e.path());
        }
    }
    m.sort();
    m
}

fn validator() -> PathBuf {
    let cache = std::env::var("KUBEVIRT_CACHE").unwrap_or("/var/cache/kubevirt-shim".into());
    let v = Path::new(&cache).join("venv-kubernetes-validate-1.37.0/bin/kubernetes-validate");
    assert!(v.exists(), "{} is missing: make deps", v.display());
    v
}

#[test]
fn every_manifest_passes_the_kubernetes_schema() {
    let files = manifests();
    assert!(files.len() >= 3, "{files:?}");
    let out = Command::new(validator())
        .args(["--strict", "-k", "1.30.0"])
        .args(&files)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    for kind in [
        "runtimeclass/kubevirt",
        "daemonset/kubevirt-shim-installer",
        "clusterrole/",
    ] {
        assert!(text.contains(kind), "{kind} not checked: {text}");
    }
    // The check is real: a misspelt field fails it.
    let bad = std::env::temp_dir().join(format!("kv-bad-{}.yaml", std::process::id()));
    let rc = std::fs::read_to_string(repo().join("runtimeclass.yaml")).unwrap();
    std::fs::write(&bad, rc.replace("handler:", "handlr:")).unwrap();
    let out = Command::new(validator())
        .arg("--strict")
        .arg(&bad)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&bad);
    assert!(!out.status.success());
}

#[test]
fn the_runtimeclass_overhead_is_the_shims() {
    let rc = std::fs::read_to_string(repo().join("runtimeclass.yaml")).unwrap();
    let cfg = std::fs::read_to_string(repo().join("shim/src/config.rs")).unwrap();
    let mib: u64 = cfg
        .split("vm_overhead_mib: ")
        .skip(1)
        .find_map(|s| s.split(',').next()?.trim().parse().ok())
        .expect("the shim's default vm_overhead_mib");
    assert!(rc.contains(&format!("memory: {mib}Mi")), "{rc}");
    assert!(rc.contains("handler: kubevirt") && rc.contains("kubevirt.io/shim: ready"));
}

/// A resource in discovery: plural name, kind, namespaced.
type Resource = (&'static str, &'static str, bool);

/// Discovery for the kinds the manifests use; every object is absent (404).
fn api_response(path: &str) -> (u16, String) {
    let groups: [(&str, &[Resource]); 4] = [
        (
            "v1",
            &[
                ("serviceaccounts", "ServiceAccount", true),
                ("namespaces", "Namespace", false),
            ],
        ),
        ("apps/v1", &[("daemonsets", "DaemonSet", true)]),
        (
            "rbac.authorization.k8s.io/v1",
            &[
                ("clusterroles", "ClusterRole", false),
                ("clusterrolebindings", "ClusterRoleBinding", false),
            ],
        ),
        (
            "node.k8s.io/v1",
            &[("runtimeclasses", "RuntimeClass", false)],
        ),
    ];
    let path = path.split('?').next().unwrap_or("");
    let body = match path {
        "/version" => r#"{"major":"1","minor":"30","gitVersion":"v1.30.0"}"#.to_owned(),
        "/api" => r#"{"kind":"APIVersions","versions":["v1"],"serverAddressByClientCIDRs":[]}"#.to_owned(),
        "/apis" => {
            let g: Vec<String> = groups[1..]
                .iter()
                .map(|(gv, _)| {
                    let (name, version) = gv.split_once('/').unwrap();
                    let v = format!(r#"{{"groupVersion":"{gv}","version":"{version}"}}"#);
                    format!(r#"{{"name":"{name}","versions":[{v}],"preferredVersion":{v}}}"#)
                })
                .collect();
            format!(r#"{{"kind":"APIGroupList","apiVersion":"v1","groups":[{}]}}"#, g.join(","))
        }
        p => match groups.iter().find(|(gv, _)| {
            p == format!("/api/{gv}") || p == format!("/apis/{gv}")
        }) {
            Some((gv, kinds)) => {
                let r: Vec<String> = kinds
                    .iter()
                    .map(|(name, kind, ns)| {
                        format!(r#"{{"name":"{name}","singularName":"","namespaced":{ns},"kind":"{kind}","verbs":["create","get","patch"]}}"#)
                    })
                    .collect();
                format!(
                    r#"{{"kind":"APIResourceList","apiVersion":"v1","groupVersion":"{gv}","resources":[{}]}}"#,
                    r.join(",")
                )
            }
            None => {
                return (
                    404,
                    r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"NotFound","code":404}"#.into(),
                )
            }
        },
    };
    (200, body)
}

/// Serves discovery on a loopback port until the test ends; returns the port.
fn stand_in_api_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let mut r = BufReader::new(conn);
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut h = String::new();
            while r.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let (code, body) = api_response(&path);
            let mut conn = r.into_inner();
            let _ = write!(
                conn,
                "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn kubectl_apply_dry_run_accepts_every_manifest() {
    let port = stand_in_api_server();
    let home = std::env::temp_dir().join(format!("kv-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = Command::new("kubectl");
    cmd.env("HOME", &home)
        .env_remove("KUBECONFIG")
        .arg(format!("--server=http://127.0.0.1:{port}"))
        .args(["apply", "--dry-run=client", "--validate=false"]);
    for m in manifests() {
        cmd.arg("-f").arg(m);
    }
    let out = cmd.output().expect("kubectl");
    let _ = std::fs::remove_dir_all(&home);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "runtimeclass.node.k8s.io/kubevirt created (dry run)",
        "daemonset.apps/kubevirt-shim-installer created (dry run)",
        "daemonset.apps/kubevirt-shim-uninstaller created (dry run)",
        "clusterrolebinding.rbac.authorization.k8s.io/kubevirt-shim-installer created (dry run)",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
}
