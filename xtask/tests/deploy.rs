//! The container files in deploy/ (no container engine runs here, so they are checked, not
//! run): the Kubernetes DaemonSet parses and gives the agent what the systemd unit gives it
//! (the same capabilities, the host's network and bpffs, its state directory), and the
//! Containerfile builds with the versions `cargo xtask setup` installs and runs the agent.

use std::collections::BTreeSet;

use serde_norway::Value;

fn deploy(file: &str) -> String {
    let path = xtask::build::repo_root().join("deploy").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `Key=value` of the systemd unit (the first one).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("wirescope.service has no {key}="))
        .trim()
        .to_owned()
}

/// The port of the agent's default listen address, from the contract's flag table.
fn default_port() -> u16 {
    let contract = std::fs::read_to_string(xtask::build::repo_root().join("docs/CONTRACT.md"))
        .expect("docs/CONTRACT.md");
    let line = contract
        .lines()
        .find(|l| l.starts_with("| `--web.listen-address ADDR` |"))
        .expect("the contract documents --web.listen-address");
    let default = line.split('|').nth(2).expect("a default column").trim();
    let addr = default.trim_matches('`');
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| {
        v.get(*k)
            .unwrap_or_else(|| panic!("no {k} in {}", path.join(".")))
    })
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .expect("a list")
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

#[test]
fn daemonset_gives_the_agent_what_the_unit_does() {
    let ds: Value = serde_norway::from_str(&deploy("kubernetes/wirescope-daemonset.yaml"))
        .expect("the DaemonSet is YAML");
    let unit = deploy("wirescope.service");
    assert_eq!(get(&ds, &["apiVersion"]).as_str(), Some("apps/v1"));
    assert_eq!(get(&ds, &["kind"]).as_str(), Some("DaemonSet"));
    let selector = get(&ds, &["spec", "selector", "matchLabels"]);
    let labels = get(&ds, &["spec", "template", "metadata", "labels"]);
    assert_eq!(selector, labels, "the selector matches the pods' labels");

    let pod = get(&ds, &["spec", "template", "spec"]);
    assert_eq!(
        get(pod, &["hostNetwork"]).as_bool(),
        Some(true),
        "the tunnels are the node's"
    );
    let containers = get(pod, &["containers"]).as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    // The same capabilities as the unit's bounding set, nothing else.
    let caps = get(c, &["securityContext", "capabilities"]);
    let added: BTreeSet<String> = strs(get(caps, &["add"])).into_iter().collect();
    let unit_caps: BTreeSet<String> = unit_value(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(added, unit_caps, "capabilities against the unit's");
    assert_eq!(strs(get(caps, &["drop"])), ["ALL"]);
    assert_eq!(
        get(c, &["securityContext", "privileged"]).as_bool(),
        Some(false)
    );

    // Every mount is a host path at the same place; bpffs and the state directory among them.
    let volumes = get(pod, &["volumes"]).as_sequence().expect("volumes");
    let host_path = |name: &str| -> String {
        let v = volumes
            .iter()
            .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"));
        get(v, &["hostPath", "path"])
            .as_str()
            .expect("a path")
            .to_owned()
    };
    let mut mounted = BTreeSet::new();
    for m in get(c, &["volumeMounts"]).as_sequence().expect("mounts") {
        let name = get(m, &["name"]).as_str().expect("a name");
        let at = get(m, &["mountPath"]).as_str().expect("a path").to_owned();
        assert_eq!(
            host_path(name),
            at,
            "volume {name} is mounted where the host has it"
        );
        mounted.insert(at);
    }
    let state = format!("/var/lib/{}", unit_value(&unit, "StateDirectory"));
    for want in ["/sys/fs/bpf", "/var/run/wireguard", state.as_str()] {
        assert!(mounted.contains(want), "{want} is not mounted: {mounted:?}");
    }

    // One port everywhere: the agent's listen address, the container port and the probes.
    let port = default_port();
    let args = strs(get(c, &["args"]));
    let listen = args
        .iter()
        .find_map(|a| a.strip_prefix("--web.listen-address="))
        .expect("a --web.listen-address argument");
    assert_eq!(listen, format!("$(NODE_IP):{port}"));
    let env = get(c, &["env"]).as_sequence().expect("env");
    assert!(
        env.iter().any(|e| {
            e.get("name").and_then(Value::as_str) == Some("NODE_IP")
                && get(e, &["valueFrom", "fieldRef", "fieldPath"]).as_str() == Some("status.hostIP")
        }),
        "NODE_IP comes from the node's address"
    );
    let ports = get(c, &["ports"]).as_sequence().expect("ports");
    assert_eq!(
        get(&ports[0], &["containerPort"]).as_u64(),
        Some(u64::from(port))
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            get(c, &[probe, "httpGet", "path"]).as_str(),
            Some("/healthz")
        );
        assert_eq!(
            get(c, &[probe, "httpGet", "port"]).as_u64(),
            Some(u64::from(port))
        );
    }
}

/// Instructions of a Containerfile: (keyword, rest), continuation lines joined, comments out.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (k, rest) = cur.split_once(' ').unwrap_or((cur.as_str(), ""));
        out.push((k.to_uppercase(), rest.trim().to_owned()));
        cur.clear();
    }
    out
}

#[test]
fn containerfile_builds_with_the_pinned_tools_and_runs_the_agent() {
    let text = deploy("Containerfile");
    let ins = instructions(&text);
    let all = |k: &str| -> Vec<&str> {
        ins.iter()
            .filter(|(kw, _)| kw == k)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    let froms = all("FROM");
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {froms:?}"
    );
    let rust = xtask::build::repo_root().join("Cargo.toml");
    let manifest = std::fs::read_to_string(rust).expect("Cargo.toml");
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version")
        .trim_matches('"');
    assert_eq!(
        froms[0],
        format!("docker.io/library/rust:{msrv}-bookworm AS build"),
        "the build stage uses the workspace's rust-version"
    );
    let runs = all("RUN").join("\n");
    assert!(
        runs.contains(&format!(
            "cargo install bpf-linker --version {} --locked",
            xtask::setup::BPF_LINKER_VERSION
        )),
        "bpf-linker pinned as `cargo xtask setup` pins it: {runs}"
    );
    assert!(runs.contains("--component rust-src"), "{runs}");
    assert!(
        runs.contains("cargo build --release --locked -p wirescope"),
        "{runs}"
    );
    assert_eq!(
        all("COPY").last().copied(),
        Some("--from=build /out/wirescope /usr/bin/wirescope")
    );
    let entry: Vec<String> =
        serde_json::from_str(all("ENTRYPOINT").last().expect("an ENTRYPOINT")).expect("JSON");
    assert_eq!(entry, ["/usr/bin/wirescope", "run"]);
    assert_eq!(all("EXPOSE"), [default_port().to_string()]);
}
