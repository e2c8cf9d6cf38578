//! The Kubernetes manifests, checked offline against the real binaries.
//!
//! Every overlay under k8s/overlays is rendered with `kubectl kustomize`
//! (kubectl must be installed) and cross-checked:
//!
//! * every Service selects the pods of some workload, and each of its target
//!   ports (by name or number) is a container port of those pods; every
//!   StatefulSet's serviceName is a headless Service; every workload's
//!   selector matches its own pod template; every PodDisruptionBudget
//!   selects some workload;
//! * every `--flag` of our containers is a long option of the real binary
//!   (`ringleader serve --help`, `ringleader-worker --help`; etcd's flags
//!   against `etcd --help`), every `$(VAR)` is defined in the container's
//!   environment, every `RINGLEADER_*` key of a referenced ConfigMap is an
//!   `[env: …]` of the binary, and the binary accepts the whole command line
//!   with that environment (clap exits 2 on a bad flag or value);
//! * every container port of ours is served by the listener of that name
//!   (`LISTENERS`: `grpc` by `--listen`, `dashboard` by
//!   `--dashboard-listen`, `metrics` by `--metrics-listen`, each flag with
//!   its `[env: …]` as the binary's help gives it), set explicitly by flag
//!   or ConfigMap to every interface and that port, and every listener of
//!   the binary that is not `off` has its container port;
//! * our pods carry the `prometheus.io/{scrape,port,path,scheme}`
//!   annotations for their `metrics` port, `/metrics`, plain http, and any
//!   pod Prometheus is told to scrape is reachable by the monitoring pods;
//! * probes point at a container port, and none of ours is a gRPC probe
//!   (the kubelet's speaks no TLS);
//! * our images are tagged with the workspace version, no image is untagged
//!   or `latest`;
//! * every container has CPU and memory requests and limits;
//! * `nvidia.com/gpu` appears only in the gpu overlay (where each worker
//!   requests and limits one GPU), and workers get `--device=cpu` or
//!   `--device=cuda` to match.
//!
//! The example specs and the checkpoint volume (`spec_problems`):
//!
//! * every entry of the `ringleader-specs` ConfigMap is accepted by the real
//!   binary (`ringleader sweep submit --dry-run` for files with a `[sweep]`
//!   table, `ringleader job submit --dry-run` for the others), and every
//!   dataset path a spec reads lies in a directory the worker image copies;
//! * the ConfigMap is mounted read-only in the coordinator pods at
//!   `/etc/ringleader/specs`, and every `/etc/ringleader/specs/FILE` that
//!   docs/KUBERNETES.md and the README mention is one of its entries;
//! * the coordinators' `RINGLEADER_CHECKPOINT_DIR` is where every worker
//!   container mounts the `ringleader-checkpoints` claim, which is rendered
//!   and ReadWriteMany (a spec that names `checkpoint.dir` must point into
//!   that volume too).
//!
//! * workers read data only under RINGLEADER_DATA_ROOTS (where the specs'
//!   data sets lie) and checkpoint only under RINGLEADER_CHECKPOINT_ROOT
//!   (where RINGLEADER_CHECKPOINT_DIR lies).
//!
//! Secure by default (`security_problems`):
//!
//! * TLS: no `--insecure` nor RINGLEADER_INSECURE; each TLS directory, the
//!   admin token file and the client directory of `kubectl exec` sessions
//!   is where the right Secret is mounted; the ring stays encrypted; the
//!   coordinators dial etcd over https at exactly the members' URLs;
//! * etcd: https client and peer URLs, client certificates required on
//!   both, every certificate file from its Secret;
//! * pods: non-root uid 10001, no privilege escalation, capabilities
//!   dropped, RuntimeDefault seccomp, read-only root (a writable $HOME), no
//!   service account token, no host namespaces or paths; the namespace
//!   enforces the restricted Pod Security Standard;
//! * Secrets: only referenced (no Secret object, PEM or literal token),
//!   known names, required, read-only, mode without world bits;
//! * NetworkPolicies, evaluated as the API defines them for our pods and for
//!   strangers: a default deny, etcd's client port only from coordinators,
//!   its peer port only from etcd, the ring only from workers, the API and
//!   the dashboard from workers, coordinators and labelled clients, the
//!   coordinators' and workers' metrics ports only from the monitoring pods
//!   (Prometheus in the namespace `monitoring`), and every container port
//!   of our pods has such an expectation.
//!
//! The certificates (`cert_manager_problems`, `certs_init_…`): every TLS
//! Secret the pods mount is made by a Certificate of k8s/cert-manager and
//! by the `ringleader certs init` command of docs/KUBERNETES.md (run for
//! real, read with `openssl x509`) with its role name and usages, etcd's
//! covering every host the manifests dial it by, the coordinator's naming
//! localhost and 127.0.0.1 (the port-forwarded dashboard); the guide's `kubectl
//! create secret` lines make every Secret.
//!
//! `checks_catch_broken_manifests`, `spec_checks_catch_broken_specs_and_mounts`
//! and `cert_manager_checks_catch_broken_certificates` break a rendering in
//! many ways and make sure each break is reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringleader_tests::{bin_dir, command};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

/// The workspace version (the tests crate inherits it).
const VERSION: &str = env!("CARGO_PKG_VERSION");
const OUR_IMAGES: &[(&str, &str)] = &[
    ("ghcr.io/ringleader/ringleader-coordinator", "ringleader"),
    ("ghcr.io/ringleader/ringleader-worker", "ringleader-worker"),
];
/// The spec ConfigMap (generated: its rendered name has a hash suffix) and
/// where the coordinator pods mount it.
const SPECS_CONFIG_MAP: &str = "ringleader-specs";
const SPECS_DIR: &str = "/etc/ringleader/specs";
/// The shared checkpoint claim every worker pod mounts.
const CHECKPOINT_CLAIM: &str = "ringleader-checkpoints";
/// `ringleader-worker --data-root`'s default, when RINGLEADER_DATA_ROOTS is
/// not set.
const WORKER_DEFAULT_DATA_ROOTS: &str = "/usr/share/datasets,/var/tmp/ringleader";
/// Documents that tell users to run `/etc/ringleader/specs/FILE`.
const DOCS: &[&str] = &["docs/KUBERNETES.md", "README.md"];
/// What serves each container port of ours: (program, container port
/// name, the flag that sets its address, the flag's variable). Each is set
/// explicitly (a flag or a ConfigMap key) to every interface and the
/// container port's number; a container port of ours that is none of these
/// is served by nothing.
const LISTENERS: &[(&str, &str, &str, &str)] = &[
    ("ringleader serve", "grpc", "--listen", "RINGLEADER_LISTEN"),
    (
        "ringleader serve",
        "dashboard",
        "--dashboard-listen",
        "RINGLEADER_DASHBOARD_LISTEN",
    ),
    (
        "ringleader serve",
        "metrics",
        "--metrics-listen",
        "RINGLEADER_METRICS_LISTEN",
    ),
    ("ringleader-worker", "grpc", "--listen", "RINGLEADER_LISTEN"),
    (
        "ringleader-worker",
        "metrics",
        "--metrics-listen",
        "RINGLEADER_METRICS_LISTEN",
    ),
];
/// Addresses a listener may take: every interface, or the pod's own IP.
const POD_WIDE_HOSTS: &[&str] = &["0.0.0.0", "[::]", "$(POD_IP)"];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository root")
        .to_path_buf()
}

fn overlays() -> Vec<String> {
    let dir = repo_root().join("k8s/overlays");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().join("kustomization.yaml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `kubectl kustomize k8s/overlays/<overlay>` as YAML documents.
fn render(overlay: &str) -> Vec<Value> {
    let dir = repo_root().join("k8s/overlays").join(overlay);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `kubectl kustomize` ({e}): these checks need kubectl \
                 (it embeds kustomize) on PATH; install it and rerun"
            )
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    parse(&String::from_utf8(output.stdout).expect("kustomize prints UTF-8"))
}

fn parse(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("kustomize prints valid YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

fn seq(value: &Value) -> &[Value] {
    value.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                    };
                    (str_of(k).to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn id(doc: &Value) -> String {
    format!(
        "{}/{}",
        str_of(&doc["kind"]),
        str_of(&doc["metadata"]["name"])
    )
}

fn is_subset(wanted: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A workload's pod template.
fn pod_template(doc: &Value) -> Option<&Value> {
    match str_of(&doc["kind"]) {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&doc["spec"]["template"])
        }
        "CronJob" => Some(&doc["spec"]["jobTemplate"]["spec"]["template"]),
        "Pod" => Some(doc),
        _ => None,
    }
}

fn containers(pod_spec: &Value) -> impl Iterator<Item = &Value> {
    seq(&pod_spec["initContainers"])
        .iter()
        .chain(seq(&pod_spec["containers"]))
}

/// The (name, number) of every container port of a pod spec.
fn container_ports(pod_spec: &Value) -> Vec<(String, u64)> {
    containers(pod_spec)
        .flat_map(|c| seq(&c["ports"]))
        .map(|p| {
            (
                str_of(&p["name"]).to_string(),
                p["containerPort"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Which binary of ours an image holds, if any; "" for foreign images.
fn our_binary(image: &str) -> Option<&'static str> {
    let repository = image.split(':').next().unwrap_or(image);
    OUR_IMAGES
        .iter()
        .find(|(repo, _)| *repo == repository)
        .map(|(_, binary)| *binary)
}

/// Long options (`--name`) mentioned in a help text.
fn long_options(help: &str) -> BTreeSet<String> {
    help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("--") && word.len() > 2)
        .map(|word| word.trim_end_matches('-').to_string())
        .collect()
}

/// The variable of the long option `flag` in a clap help text: None when
/// the help has no such option, Some(None) when it names no `[env: …]`.
fn option_env(help: &str, flag: &str) -> Option<Option<String>> {
    let lines: Vec<&str> = help.lines().collect();
    let start = lines.iter().position(|line| {
        line.trim()
            .split(", ")
            .any(|part| part.split_whitespace().next() == Some(flag))
    })?;
    // The option's paragraph: up to the next option.
    let paragraph: String = lines[start..]
        .iter()
        .enumerate()
        .take_while(|(i, line)| *i == 0 || !line.trim_start().starts_with('-'))
        .map(|(_, line)| *line)
        .collect::<Vec<_>>()
        .join(" ");
    Some(
        paragraph
            .split_once("[env: ")
            .and_then(|(_, rest)| rest.split_once('='))
            .map(|(var, _)| var.to_string()),
    )
}

/// `$(VAR)` references in an argument.
fn var_refs(arg: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) => {
                refs.push(after[..end].to_string());
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    refs
}

struct Checker {
    /// Also start every container's command line of ours (with its
    /// environment) and fail on a usage error.
    run_binaries: bool,
    help: HashMap<Vec<String>, String>,
}

impl Checker {
    fn new(run_binaries: bool) -> Self {
        Self {
            run_binaries,
            help: HashMap::new(),
        }
    }

    /// `binary [subcommand] --help`; `binary` is ours (from bin_dir()) or
    /// `etcd` from PATH.
    fn help(&mut self, binary: &str, subcommand: Option<&str>) -> &str {
        let key: Vec<String> = std::iter::once(binary)
            .chain(subcommand)
            .map(String::from)
            .collect();
        self.help.entry(key).or_insert_with(|| {
            let mut cmd = if binary == "etcd" {
                Command::new("etcd")
            } else {
                command(binary)
            };
            cmd.args(subcommand).arg("--help");
            let output = cmd.output().unwrap_or_else(|e| {
                panic!(
                    "cannot run `{binary} --help` ({e}); our binaries come from {} \
                     (RINGLEADER_BIN_DIR), etcd from PATH (scripts/setup.sh installs etcd-server)",
                    bin_dir().display()
                )
            });
            // etcd 3.4 prints its help on stderr.
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            assert!(
                text.contains("--"),
                "`{binary} --help` printed no options:\n{text}"
            );
            text
        })
    }

    /// Every problem found in one overlay's rendering.
    fn problems(&mut self, overlay: &str, docs: &[Value]) -> Vec<String> {
        let mut problems = Vec::new();
        let workloads: Vec<(&Value, &Value)> = docs
            .iter()
            .filter_map(|d| pod_template(d).map(|t| (d, t)))
            .collect();
        let config_maps: BTreeMap<&str, &Value> = docs
            .iter()
            .filter(|d| str_of(&d["kind"]) == "ConfigMap")
            .map(|d| (str_of(&d["metadata"]["name"]), d))
            .collect();
        if workloads.is_empty() {
            problems.push(format!("overlay {overlay} renders no workloads"));
        }

        // Workloads select their own pods; StatefulSets name a headless Service.
        for (doc, template) in &workloads {
            let labels = string_map(&template["metadata"]["labels"]);
            let selector = string_map(&doc["spec"]["selector"]["matchLabels"]);
            if str_of(&doc["kind"]) != "Pod" && !is_subset(&selector, &labels) {
                problems.push(format!(
                    "{}: selector {selector:?} does not match its pod labels {labels:?}",
                    id(doc)
                ));
            }
            if str_of(&doc["kind"]) == "StatefulSet" {
                let service = str_of(&doc["spec"]["serviceName"]);
                let headless = docs.iter().any(|d| {
                    str_of(&d["kind"]) == "Service"
                        && str_of(&d["metadata"]["name"]) == service
                        && str_of(&d["spec"]["clusterIP"]) == "None"
                });
                if !headless {
                    problems.push(format!(
                        "{}: serviceName {service:?} is not a headless Service of this overlay",
                        id(doc)
                    ));
                }
            }
        }

        // Services and PodDisruptionBudgets select pods; target ports exist.
        for doc in docs {
            let kind = str_of(&doc["kind"]);
            let selector = match kind {
                "Service" => string_map(&doc["spec"]["selector"]),
                "PodDisruptionBudget" => string_map(&doc["spec"]["selector"]["matchLabels"]),
                _ => continue,
            };
            let selected: Vec<&Value> = workloads
                .iter()
                .filter(|(_, t)| is_subset(&selector, &string_map(&t["metadata"]["labels"])))
                .map(|(_, t)| &t["spec"])
                .collect();
            if selector.is_empty() || selected.is_empty() {
                problems.push(format!(
                    "{}: selector {selector:?} matches no workload's pods",
                    id(doc)
                ));
                continue;
            }
            if kind != "Service" {
                continue;
            }
            for port in seq(&doc["spec"]["ports"]) {
                let target = match &port["targetPort"] {
                    Value::Null => &port["port"],
                    other => other,
                };
                for pod in &selected {
                    let ports = container_ports(pod);
                    let found = match target {
                        Value::String(name) => ports.iter().any(|(n, _)| n == name),
                        number => ports.iter().any(|(_, p)| Some(*p) == number.as_u64()),
                    };
                    if !found {
                        problems.push(format!(
                            "{}: targetPort {} of port {} is no container port of the selected pods {ports:?}",
                            id(doc),
                            serde_yaml::to_string(target).unwrap().trim(),
                            serde_yaml::to_string(&port["port"]).unwrap().trim(),
                        ));
                    }
                }
            }
        }

        // Containers.
        for (doc, template) in &workloads {
            let pod_spec = &template["spec"];
            let ports = container_ports(pod_spec);
            for c in containers(pod_spec) {
                let name = format!("{} container {}", id(doc), str_of(&c["name"]));
                self.check_image(&name, str_of(&c["image"]), &mut problems);
                check_resources(&name, &c["resources"], &mut problems);
                for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                    for (kind, what) in
                        [("grpc", "gRPC"), ("tcpSocket", "TCP"), ("httpGet", "HTTP")]
                    {
                        let port = &c[probe][kind]["port"];
                        let found = match port {
                            Value::Null => continue,
                            Value::String(name) => ports.iter().any(|(n, _)| n == name),
                            number => ports.iter().any(|(_, p)| Some(*p) == number.as_u64()),
                        };
                        if !found {
                            problems.push(format!(
                                "{name}: {probe} {what} port {} is no container port {ports:?}",
                                serde_yaml::to_string(port).unwrap().trim()
                            ));
                        }
                    }
                    // Our ports take mutual TLS only; the kubelet's gRPC
                    // probe speaks plaintext and presents no certificate.
                    if our_binary(str_of(&c["image"])).is_some() && !c[probe]["grpc"].is_null() {
                        problems.push(format!(
                            "{name}: {probe} is a gRPC probe, but the kubelet's gRPC probe speaks no \
                             TLS and our ports take mutual TLS only (use tcpSocket)"
                        ));
                    }
                }
                self.check_command_line(&name, c, &config_maps, &mut problems);
                self.check_listeners(&name, c, &config_maps, &mut problems);
                if our_binary(str_of(&c["image"])) == Some("ringleader-worker") {
                    check_worker_device(overlay, &name, c, &mut problems);
                }
            }
        }

        // GPUs only in the gpu overlay.
        let text: String = docs
            .iter()
            .map(|d| serde_yaml::to_string(d).unwrap())
            .collect();
        if overlay != "gpu" && text.contains("nvidia.com/gpu") {
            problems.push(format!(
                "overlay {overlay} mentions nvidia.com/gpu; only the gpu overlay may"
            ));
        }

        // Prometheus finds and may reach the metrics ports.
        problems.extend(scrape_problems(docs));

        // Secure by default: TLS everywhere, Secrets only by reference, pods
        // unprivileged, NetworkPolicies that fence etcd and the ring.
        problems.extend(security_problems(docs));
        problems
    }

    fn check_image(&self, name: &str, image: &str, problems: &mut Vec<String>) {
        let last = image.rsplit('/').next().unwrap_or(image);
        let tag = last.split_once(':').map(|(_, t)| t);
        match tag {
            None => problems.push(format!("{name}: image {image} has no tag")),
            Some("latest") => problems.push(format!("{name}: image {image} uses `latest`")),
            Some(tag) => {
                if our_binary(image).is_some() && tag != VERSION {
                    problems.push(format!(
                        "{name}: image {image} is not tagged with the workspace version {VERSION}"
                    ));
                }
            }
        }
        if image.starts_with("ghcr.io/ringleader/") && our_binary(image).is_none() {
            problems.push(format!("{name}: unknown Ringleader image {image}"));
        }
    }

    fn check_command_line(
        &mut self,
        name: &str,
        c: &Value,
        config_maps: &BTreeMap<&str, &Value>,
        problems: &mut Vec<String>,
    ) {
        let command: Vec<String> = seq(&c["command"])
            .iter()
            .map(|v| str_of(v).to_string())
            .collect();
        let args: Vec<String> = seq(&c["args"])
            .iter()
            .map(|v| str_of(v).to_string())
            .collect();
        let image = str_of(&c["image"]);

        let ContainerEnv {
            vars: env,
            from_config_maps,
            missing_config_maps,
        } = container_env(c, config_maps);
        for map in missing_config_maps {
            problems.push(format!("{name}: envFrom ConfigMap {map} is not rendered"));
        }

        // Which binary runs, and with which argv.
        let (binary, argv): (&str, Vec<String>) = match our_binary(image) {
            Some(binary) => {
                if let Some(first) = command.first() {
                    let base = first.rsplit('/').next().unwrap_or(first);
                    if base != binary {
                        problems.push(format!(
                            "{name}: command {first} is not {binary}, the image's binary"
                        ));
                    }
                }
                let argv = command.iter().skip(1).chain(&args).cloned().collect();
                (binary, argv)
            }
            None if image.contains("/etcd:") => {
                let argv = command.iter().skip(1).chain(&args).cloned().collect();
                ("etcd", argv)
            }
            None => return,
        };

        // `ringleader` takes a subcommand first.
        let (subcommand, flags) = if binary == "ringleader" {
            match argv.first() {
                Some(sub) if !sub.starts_with('-') => (Some(sub.as_str()), &argv[1..]),
                _ => {
                    problems.push(format!("{name}: `ringleader` needs a subcommand first"));
                    (None, &argv[..])
                }
            }
        } else {
            (None, &argv[..])
        };
        let help = self.help(binary, subcommand).to_string();
        let options = long_options(&help);
        let mut expects_value = false;
        for arg in flags {
            for var in var_refs(arg) {
                if !env.contains_key(&var) {
                    problems.push(format!(
                        "{name}: {arg} refers to $({var}), which the container does not define"
                    ));
                }
            }
            if let Some(flag) = arg.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap_or(flag);
                if !options.contains(&format!("--{flag}")) {
                    problems.push(format!(
                        "{name}: `{binary}{}` has no option --{flag}",
                        subcommand.map(|s| format!(" {s}")).unwrap_or_default()
                    ));
                }
                expects_value = !arg.contains('=');
            } else if expects_value {
                expects_value = false;
            } else {
                problems.push(format!("{name}: stray argument {arg:?}"));
            }
        }
        if binary == "etcd" {
            return;
        }
        for key in from_config_maps
            .iter()
            .filter(|k| k.starts_with("RINGLEADER_"))
        {
            if !help.contains(&format!("[env: {key}=")) {
                problems.push(format!(
                    "{name}: ConfigMap key {key} is no environment variable of `{binary}`"
                ));
            }
        }
        // Variables set in the pod spec itself are for the binary, or (in
        // the coordinator image) for the client commands of `kubectl exec`
        // sessions.
        for var in seq(&c["env"]) {
            let key = str_of(&var["name"]);
            if !key.starts_with("RINGLEADER_") || help.contains(&format!("[env: {key}=")) {
                continue;
            }
            let client = binary == "ringleader"
                && self
                    .help("ringleader", Some("status"))
                    .contains(&format!("[env: {key}="));
            if !client {
                problems.push(format!(
                    "{name}: {key} is no environment variable of `{binary}`{}",
                    if binary == "ringleader" {
                        " nor of its client commands (`ringleader status`)"
                    } else {
                        ""
                    }
                ));
            }
        }
        if self.run_binaries {
            let expanded: Vec<String> = argv
                .iter()
                .map(|arg| {
                    let mut arg = arg.clone();
                    for var in var_refs(&arg) {
                        if let Some(value) = env.get(&var) {
                            arg = arg.replace(&format!("$({var})"), value);
                        }
                    }
                    arg
                })
                .collect();
            if let Some(problem) = usage_error(binary, &expanded, &env) {
                problems.push(format!("{name}: {problem}"));
            }
        }
    }
}

impl Checker {
    /// Every container port of ours is served by its listener
    /// (`LISTENERS`), which the binary's help documents with that variable,
    /// set explicitly to every interface and that port; every listener that
    /// is not `off` has its container port.
    fn check_listeners(
        &mut self,
        name: &str,
        c: &Value,
        config_maps: &BTreeMap<&str, &Value>,
        problems: &mut Vec<String>,
    ) {
        let Some(binary) = our_binary(str_of(&c["image"])) else {
            return;
        };
        let argv = argv_of(c);
        let env = container_env(c, config_maps).vars;
        let subcommand = match binary {
            "ringleader" => argv
                .first()
                .map(String::as_str)
                .filter(|s| !s.starts_with('-')),
            _ => None,
        };
        let program = match subcommand {
            Some(sub) => format!("{binary} {sub}"),
            None => binary.to_string(),
        };
        let ports: Vec<(String, u64)> = seq(&c["ports"])
            .iter()
            .map(|p| {
                (
                    str_of(&p["name"]).to_string(),
                    p["containerPort"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let listeners: Vec<_> = LISTENERS.iter().filter(|l| l.0 == program).collect();
        for (port_name, number) in &ports {
            if !listeners.iter().any(|l| l.1 == port_name) {
                problems.push(format!(
                    "{name}: container port {port_name:?} ({number}) is served by no listener \
                     of `{program}` (LISTENERS: {:?})",
                    listeners.iter().map(|l| l.1).collect::<Vec<_>>()
                ));
            }
        }
        let help = self.help(binary, subcommand).to_string();
        for &&(_, port_name, flag, var) in &listeners {
            match option_env(&help, flag) {
                None => {
                    problems.push(format!(
                        "{name}: `{program}` has no option {flag}, which LISTENERS says \
                         serves port {port_name}"
                    ));
                    continue;
                }
                Some(documented) if documented.as_deref() != Some(var) => {
                    problems.push(format!(
                        "{name}: `{program}` {flag} reads {documented:?}, not {var}"
                    ));
                    continue;
                }
                Some(_) => {}
            }
            let declared = ports.iter().find(|(n, _)| n == port_name).map(|p| p.1);
            let Some(value) = setting(&argv, &env, flag, var) else {
                problems.push(format!(
                    "{name}: {flag} ({var}) is not set; set the address of port {port_name} \
                     explicitly, not by the binary's default"
                ));
                continue;
            };
            if value == "off" {
                if let Some(number) = declared {
                    problems.push(format!(
                        "{name}: declares container port {port_name} ({number}), but {flag} is \
                         off"
                    ));
                }
                continue;
            }
            let Some(number) = declared else {
                problems.push(format!(
                    "{name}: serves {flag}={value} but has no container port named {port_name}"
                ));
                continue;
            };
            let Some((host, port)) = value.rsplit_once(':') else {
                problems.push(format!("{name}: {flag}={value} is no host:port"));
                continue;
            };
            if !POD_WIDE_HOSTS.contains(&host) {
                problems.push(format!(
                    "{name}: {flag}={value} listens on {host} only; port {port_name} must be \
                     served on one of {POD_WIDE_HOSTS:?}"
                ));
            }
            if expand(port, &env).parse::<u64>().ok() != Some(number) {
                problems.push(format!(
                    "{name}: container port {port_name} is {number}, but {flag} listens on \
                     {value}"
                ));
            }
        }
    }
}

/// Starts `binary argv` with exactly `env` (plus PATH) and reports a usage
/// error: clap exits with status 2 at once. Anything else — running, or
/// failing later because etcd or the coordinator cannot be reached here —
/// means the command line was accepted.
fn usage_error(binary: &str, argv: &[String], env: &BTreeMap<String, String>) -> Option<String> {
    let mut child = command(binary)
        .args(argv)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(status) = child.try_wait().expect("wait for the binary") {
            if status.code() == Some(2) {
                let mut stderr = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
                return Some(format!(
                    "`{binary} {}` is rejected: {}",
                    argv.join(" "),
                    stderr.trim()
                ));
            }
            return None;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_resources(name: &str, resources: &Value, problems: &mut Vec<String>) {
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            if resources[kind][resource].is_null() {
                problems.push(format!("{name}: no {resource} {kind}"));
            }
        }
    }
}

fn check_worker_device(overlay: &str, name: &str, c: &Value, problems: &mut Vec<String>) {
    let args: Vec<&str> = seq(&c["args"]).iter().map(str_of).collect();
    let (want, gpus) = match overlay {
        "gpu" => ("--device=cuda", Some(1)),
        _ => ("--device=cpu", None),
    };
    if !args.contains(&want) {
        problems.push(format!(
            "{name}: overlay {overlay} should pass {want}, args are {args:?}"
        ));
    }
    for kind in ["requests", "limits"] {
        let count = c["resources"][kind]["nvidia.com/gpu"].as_u64();
        if count != gpus {
            problems.push(format!(
                "{name}: nvidia.com/gpu {kind} is {count:?}, overlay {overlay} wants {gpus:?}"
            ));
        }
    }
}

fn assert_clean(overlay: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "k8s/overlays/{overlay} has {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn every_overlay_renders_and_is_consistent_with_the_binaries() {
    let names = overlays();
    assert_eq!(
        names,
        ["cpu", "gpu"],
        "expected overlays cpu and gpu under k8s/overlays"
    );
    let mut checker = Checker::new(true);
    for overlay in &names {
        let docs = render(overlay);
        let problems = checker.problems(overlay, &docs);
        assert_clean(overlay, &problems);
    }
}

#[test]
fn the_rendering_holds_what_the_guide_promises() {
    for overlay in overlays() {
        let docs = render(&overlay);
        let find = |kind: &str, name: &str| {
            docs.iter()
                .find(|d| str_of(&d["kind"]) == kind && str_of(&d["metadata"]["name"]) == name)
                .unwrap_or_else(|| panic!("overlay {overlay} renders no {kind}/{name}"))
        };
        let etcd = find("StatefulSet", "etcd");
        assert_eq!(etcd["spec"]["replicas"].as_u64(), Some(3));
        assert!(!seq(&etcd["spec"]["volumeClaimTemplates"]).is_empty());
        let coordinator = find("Deployment", "ringleader-coordinator");
        assert_eq!(coordinator["spec"]["replicas"].as_u64(), Some(3));
        let worker = find("StatefulSet", "ringleader-worker");
        assert_eq!(
            worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64(),
            Some(120)
        );
        find("PodDisruptionBudget", "ringleader-worker");
        let service = find("Service", "ringleader-coordinator");
        assert!(seq(&service["spec"]["ports"])
            .iter()
            .any(|p| str_of(&p["name"]) == "grpc" && p["port"].as_u64() == Some(7400)));
        // `kubectl port-forward svc/ringleader-coordinator 7480` (the guide).
        assert!(
            seq(&service["spec"]["ports"]).iter().any(|p| {
                str_of(&p["name"]) == "dashboard"
                    && p["port"].as_u64() == Some(7480)
                    && str_of(&p["targetPort"]) == "dashboard"
            }),
            "overlay {overlay}: the coordinator Service has no port dashboard 7480 → dashboard"
        );
        let tolerations =
            serde_yaml::to_string(&worker["spec"]["template"]["spec"]["tolerations"]).unwrap();
        assert_eq!(
            tolerations.contains("nvidia.com/gpu"),
            overlay == "gpu",
            "overlay {overlay}: worker tolerations {tolerations}"
        );
    }
}

/// Applies `edit` to the first document of `kind` whose name starts with
/// `name` (generated ConfigMaps carry a hash suffix) in the cpu rendering and returns the problems the checker then finds.
fn problems_after(kind: &str, name: &str, edit: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut docs = render("cpu");
    let doc = docs
        .iter_mut()
        .find(|d| str_of(&d["kind"]) == kind && str_of(&d["metadata"]["name"]).starts_with(name))
        .unwrap_or_else(|| panic!("cpu overlay renders no {kind}/{name}"));
    edit(doc);
    Checker::new(false).problems("cpu", &docs)
}

fn container_mut<'a>(doc: &'a mut Value, path: &[&str]) -> &'a mut Mapping {
    let mut v = doc;
    for key in path {
        v = v.get_mut(*key).expect("path exists");
    }
    v.get_mut("spec")
        .and_then(|s| s.get_mut("containers"))
        .and_then(|c| c.get_mut(0))
        .and_then(Value::as_mapping_mut)
        .expect("a first container")
}

fn assert_reported(what: &str, problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "{what}: expected a problem mentioning {needle:?}, got {problems:#?}"
    );
}

#[test]
fn checks_catch_broken_manifests() {
    // The untouched rendering is clean (without starting binaries).
    assert_clean("cpu", &Checker::new(false).problems("cpu", &render("cpu")));

    let problems = problems_after("Service", "ringleader-coordinator", |doc| {
        doc["spec"]["ports"][0]["targetPort"] = Value::from(7401);
    });
    assert_reported(
        "a Service port no pod listens on",
        &problems,
        "targetPort 7401",
    );

    let problems = problems_after("Service", "ringleader-worker", |doc| {
        doc["spec"]["ports"][0]["targetPort"] = Value::from("peer");
    });
    assert_reported("a misnamed target port", &problems, "targetPort peer");

    let problems = problems_after("Service", "etcd", |doc| {
        doc["spec"]["selector"]["app.kubernetes.io/name"] = Value::from("etcd-typo");
    });
    assert_reported(
        "a selector that matches nothing",
        &problems,
        "matches no workload",
    );

    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["args"]
            .as_sequence_mut()
            .unwrap()
            .push(Value::from("--devise=cpu"));
    });
    assert_reported("an unknown worker flag", &problems, "no option --devise");

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["args"]
            .as_sequence_mut()
            .unwrap()
            .push(Value::from("--coordinator=$(POD_IP):7400"));
    });
    assert_reported(
        "a `ringleader status` flag given to `serve`",
        &problems,
        "no option --coordinator",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["args"][1] = Value::from("--advertise=$(MY_IP):7400");
    });
    assert_reported("an undefined $(VAR)", &problems, "$(MY_IP)");

    let problems = problems_after("StatefulSet", "etcd", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["command"]
            .as_sequence_mut()
            .unwrap()
            .push(Value::from("--inital-cluster-state=new"));
    });
    assert_reported(
        "an etcd typo",
        &problems,
        "no option --inital-cluster-state",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["image"] = Value::from("ghcr.io/ringleader/ringleader-coordinator:latest");
    });
    assert_reported("a latest tag", &problems, "uses `latest`");

    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["image"] = Value::from("ghcr.io/ringleader/ringleader-worker:0.0.9");
    });
    assert_reported("a stale version tag", &problems, "workspace version");

    let problems = problems_after("StatefulSet", "etcd", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["resources"].as_mapping_mut().unwrap().remove("limits");
    });
    assert_reported("missing limits", &problems, "no cpu limits");

    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["resources"]["limits"]["nvidia.com/gpu"] = Value::from(1);
    });
    assert_reported(
        "a GPU in the cpu overlay",
        &problems,
        "mentions nvidia.com/gpu",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["readinessProbe"]["tcpSocket"]["port"] = Value::from(7500);
    });
    assert_reported("a probe on the wrong port", &problems, "TCP port 7500");

    let problems = problems_after("ConfigMap", "ringleader-coordinator", |doc| {
        let data = doc["data"].as_mapping_mut().unwrap();
        let ttl = data.remove("RINGLEADER_LEASE_TTL").unwrap();
        data.insert(Value::from("RINGLEADER_LEASE_TIME"), ttl);
    });
    assert_reported(
        "a ConfigMap key no binary reads",
        &problems,
        "RINGLEADER_LEASE_TIME is no environment variable",
    );

    // Listeners and their container ports. The help is read option by
    // option: --listen is not --dashboard-listen, nor a prefix an option.
    let mut checker = Checker::new(false);
    let serve = checker.help("ringleader", Some("serve")).to_string();
    assert_eq!(
        option_env(&serve, "--listen"),
        Some(Some("RINGLEADER_LISTEN".into()))
    );
    assert_eq!(
        option_env(&serve, "--dashboard-listen"),
        Some(Some("RINGLEADER_DASHBOARD_LISTEN".into()))
    );
    assert_eq!(option_env(&serve, "--metrics"), None);
    assert_eq!(option_env(&serve, "--help"), Some(None));
    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        arg_replace(
            doc,
            "--metrics-listen=",
            Some("--metrics-listen=0.0.0.0:7591"),
        );
    });
    assert_reported(
        "a metrics port the worker does not listen on",
        &problems,
        "container port metrics is 7590, but --metrics-listen listens on 0.0.0.0:7591",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        arg_replace(doc, "--dashboard-listen=", Some("--dashboard-listen=off"));
    });
    assert_reported(
        "a dashboard port that is switched off",
        &problems,
        "declares container port dashboard (7480), but --dashboard-listen is off",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        arg_replace(
            doc,
            "--metrics-listen=",
            Some("--metrics-listen=127.0.0.1:7490"),
        );
    });
    assert_reported(
        "metrics on the loopback only",
        &problems,
        "--metrics-listen=127.0.0.1:7490 listens on 127.0.0.1 only",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        arg_replace(doc, "--metrics-listen=", None);
    });
    assert_reported(
        "a metrics address left to the default",
        &problems,
        "--metrics-listen (RINGLEADER_METRICS_LISTEN) is not set",
    );

    // The same address from the ConfigMap is as good as the flag; a
    // variable of another listener is not.
    let moved = |var: &str| {
        problems_after_docs(|docs| {
            let coordinator = doc_mut(docs, "Deployment", "ringleader-coordinator");
            arg_replace(coordinator, "--metrics-listen=", None);
            let settings = doc_mut(docs, "ConfigMap", "ringleader-coordinator");
            settings["data"][var] = Value::from("0.0.0.0:7490");
        })
    };
    assert_clean("cpu", &moved("RINGLEADER_METRICS_LISTEN"));
    assert_reported(
        "the metrics address under the dashboard's variable",
        &moved("RINGLEADER_DASHBOARD_LISTEN"),
        "--metrics-listen (RINGLEADER_METRICS_LISTEN) is not set",
    );

    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        let ports = c["ports"].as_sequence_mut().unwrap();
        ports.retain(|p| str_of(&p["name"]) != "metrics");
    });
    assert_reported(
        "a listener without its container port",
        &problems,
        "serves --metrics-listen=0.0.0.0:7590 but has no container port named metrics",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["ports"][1]["name"] = Value::from("https");
    });
    assert_reported(
        "a container port no listener serves",
        &problems,
        "container port \"https\" (7480) is served by no listener of `ringleader serve`",
    );

    // Prometheus's annotations.
    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] =
            Value::from("7500");
    });
    assert_reported(
        "a scrape on the ring port",
        &problems,
        "prometheus.io/port is Some(\"7500\"), not \"7590\"",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        doc["spec"]["template"]["metadata"]
            .as_mapping_mut()
            .unwrap()
            .remove("annotations");
    });
    assert_reported(
        "coordinators Prometheus does not find",
        &problems,
        "prometheus.io/scrape is None, not \"true\"",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] =
            Value::from("https");
    });
    assert_reported(
        "metrics scraped over https",
        &problems,
        "prometheus.io/scheme is \"https\"",
    );

    let problems = problems_after("StatefulSet", "etcd", |doc| {
        let mut annotations = Mapping::new();
        annotations.insert("prometheus.io/scrape".into(), "true".into());
        annotations.insert("prometheus.io/port".into(), "2381".into());
        doc["spec"]["template"]["metadata"]["annotations"] = Value::Mapping(annotations);
    });
    assert_reported(
        "a scrape the NetworkPolicies refuse",
        &problems,
        "StatefulSet/etcd: Prometheus is told to scrape port 2381, but the NetworkPolicies keep",
    );

    // Secure by default: each check of security_problems fails on a
    // manifest that breaks its promise.
    security_checks_catch_broken_manifests();
}

/// Applies `edit` to the whole cpu rendering and returns the problems the
/// checker then finds.
fn problems_after_docs(edit: impl FnOnce(&mut Vec<Value>)) -> Vec<String> {
    let mut docs = render("cpu");
    edit(&mut docs);
    Checker::new(false).problems("cpu", &docs)
}

fn arg_push(doc: &mut Value, arg: &str) {
    let c = container_mut(doc, &["spec", "template"]);
    let key = if c.contains_key("args") {
        "args"
    } else {
        "command"
    };
    c[key].as_sequence_mut().unwrap().push(Value::from(arg));
}

/// Replaces the argument that starts with `prefix` (a `--flag=`) of the
/// first container, or removes it when `with` is None.
fn arg_replace(doc: &mut Value, prefix: &str, with: Option<&str>) {
    let c = container_mut(doc, &["spec", "template"]);
    let key = if c.contains_key("args") {
        "args"
    } else {
        "command"
    };
    let argv = c[key].as_sequence_mut().unwrap();
    let at = argv
        .iter()
        .position(|a| str_of(a).starts_with(prefix))
        .unwrap_or_else(|| panic!("no argument {prefix}…"));
    match with {
        Some(arg) => argv[at] = Value::from(arg),
        None => {
            argv.remove(at);
        }
    }
}

fn env_set(doc: &mut Value, name: &str, value: &str) {
    let c = container_mut(doc, &["spec", "template"]);
    let env = c["env"].as_sequence_mut().unwrap();
    env.retain(|v| str_of(&v["name"]) != name);
    let mut var = Mapping::new();
    var.insert("name".into(), name.into());
    var.insert("value".into(), value.into());
    env.push(Value::Mapping(var));
}

fn security_checks_catch_broken_manifests() {
    // --- TLS ---
    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        arg_push(doc, "--insecure");
    });
    assert_reported(
        "a worker with --insecure",
        &problems,
        "runs with --insecure",
    );

    let problems = problems_after("ConfigMap", "ringleader-coordinator", |doc| {
        doc["data"]["RINGLEADER_INSECURE"] = Value::from("true");
    });
    assert_reported(
        "RINGLEADER_INSECURE in a ConfigMap",
        &problems,
        "sets RINGLEADER_INSECURE=true",
    );

    let problems = problems_after("ConfigMap", "ringleader-worker", |doc| {
        doc["data"]["RINGLEADER_RING_ENCRYPTION"] = Value::from("off");
    });
    assert_reported("a plaintext ring", &problems, "ring encryption is \"off\"");

    let problems = problems_after("ConfigMap", "ringleader-worker", |doc| {
        doc["data"]
            .as_mapping_mut()
            .unwrap()
            .remove("RINGLEADER_TLS_DIR");
    });
    assert_reported(
        "a worker without a TLS dir",
        &problems,
        "the worker's TLS dir (--tls-dir) is not set",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        arg_replace(
            doc,
            "--tls-dir=",
            Some("--tls-dir=/etc/ringleader/client-tls"),
        );
    });
    assert_reported(
        "a coordinator serving with the client certificate",
        &problems,
        "is the Secret ringleader-client-tls, not ringleader-coordinator-tls",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        arg_replace(doc, "--etcd-tls-dir=", Some("--etcd-tls-dir=/etc/etcd"));
    });
    assert_reported(
        "an etcd TLS dir where nothing is mounted",
        &problems,
        "/etc/etcd is not where a Secret is mounted (it must be ringleader-etcd-client-tls)",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        arg_replace(doc, "--admin-token-file=", None);
    });
    assert_reported(
        "a coordinator without the admin token",
        &problems,
        "--admin-token-file is not set",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["env"]
            .as_sequence_mut()
            .unwrap()
            .retain(|v| str_of(&v["name"]) != "RINGLEADER_TLS_DIR");
    });
    assert_reported(
        "exec sessions without the client certificate",
        &problems,
        "the client TLS dir of exec sessions (env RINGLEADER_TLS_DIR) is not set",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        let etcd = str_of(&c["args"][3]).replace("https://", "http://");
        c["args"][3] = Value::from(etcd);
    });
    assert_reported("plaintext etcd endpoints", &problems, "is not https://");

    // --- etcd ---
    let problems = problems_after("StatefulSet", "etcd", |doc| {
        arg_replace(doc, "--client-cert-auth=", None);
    });
    assert_reported(
        "etcd without client certificates",
        &problems,
        "--client-cert-auth is not true",
    );

    let problems = problems_after("StatefulSet", "etcd", |doc| {
        arg_replace(
            doc,
            "--peer-client-cert-auth=",
            Some("--peer-client-cert-auth=false"),
        );
    });
    assert_reported(
        "etcd peers without certificates",
        &problems,
        "--peer-client-cert-auth is not true",
    );

    let problems = problems_after("StatefulSet", "etcd", |doc| {
        arg_replace(
            doc,
            "--listen-client-urls=",
            Some("--listen-client-urls=http://0.0.0.0:2379"),
        );
    });
    assert_reported(
        "etcd serving plaintext clients",
        &problems,
        "--listen-client-urls has http://0.0.0.0:2379, not https://",
    );

    let problems = problems_after("StatefulSet", "etcd", |doc| {
        arg_replace(
            doc,
            "--peer-key-file=",
            Some("--peer-key-file=/var/lib/etcd/peer.key"),
        );
    });
    assert_reported(
        "an etcd key off the Secret",
        &problems,
        "--peer-key-file=/var/lib/etcd/peer.key is not the tls.key of a mounted Secret",
    );

    let problems = problems_after("StatefulSet", "etcd", |doc| {
        arg_push(doc, "--auto-tls=true");
    });
    assert_reported("etcd with self-signed TLS", &problems, "--auto-tls makes");

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        let etcd = str_of(&c["args"][3]).replace(".svc.cluster.local", "");
        c["args"][3] = Value::from(etcd);
    });
    assert_reported(
        "coordinators dialing names etcd does not advertise",
        &problems,
        "but the members advertise",
    );

    // --- pods ---
    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = Value::from(0);
    });
    assert_reported("a worker as root", &problems, "runAsUser is 0, not 10001");

    let problems = problems_after("StatefulSet", "etcd", |doc| {
        let pod = &mut doc["spec"]["template"]["spec"]["securityContext"];
        pod.as_mapping_mut().unwrap().remove("runAsNonRoot");
    });
    assert_reported("etcd maybe as root", &problems, "runAsNonRoot is not true");

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["securityContext"]["runAsNonRoot"] = Value::from(false);
    });
    assert_reported(
        "a container overriding the pod's runAsNonRoot",
        &problems,
        "container coordinator: runAsNonRoot is not true",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["securityContext"]["allowPrivilegeEscalation"] = Value::from(true);
    });
    assert_reported(
        "privilege escalation",
        &problems,
        "allowPrivilegeEscalation is not false",
    );

    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["securityContext"]["readOnlyRootFilesystem"] = Value::from(false);
    });
    assert_reported(
        "a writable root filesystem",
        &problems,
        "readOnlyRootFilesystem is not true",
    );

    let problems = problems_after("StatefulSet", "etcd", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["securityContext"]
            .as_mapping_mut()
            .unwrap()
            .remove("capabilities");
    });
    assert_reported(
        "capabilities kept",
        &problems,
        "capabilities do not drop ALL",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let pod = &mut doc["spec"]["template"]["spec"]["securityContext"];
        pod.as_mapping_mut().unwrap().remove("seccompProfile");
    });
    assert_reported(
        "no seccomp profile",
        &problems,
        "seccompProfile is not RuntimeDefault",
    );

    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        let pod = doc["spec"]["template"]["spec"].as_mapping_mut().unwrap();
        pod.remove("automountServiceAccountToken");
    });
    assert_reported(
        "a service account token",
        &problems,
        "automountServiceAccountToken is not false",
    );

    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        c["volumeMounts"]
            .as_sequence_mut()
            .unwrap()
            .retain(|m| str_of(&m["name"]) != "tmp");
    });
    assert_reported(
        "HOME on the read-only root",
        &problems,
        "HOME=/tmp is on the read-only root filesystem",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        let probe = c
            .get_mut("livenessProbe")
            .unwrap()
            .as_mapping_mut()
            .unwrap();
        probe.remove("tcpSocket");
        let mut grpc = Mapping::new();
        grpc.insert("port".into(), 7400.into());
        probe.insert("grpc".into(), Value::Mapping(grpc));
    });
    assert_reported(
        "a gRPC probe on a TLS port",
        &problems,
        "livenessProbe is a gRPC probe, but the kubelet's gRPC probe speaks no TLS",
    );

    let problems = problems_after("Namespace", "ringleader", |doc| {
        doc["metadata"]["labels"]
            .as_mapping_mut()
            .unwrap()
            .remove("pod-security.kubernetes.io/enforce");
    });
    assert_reported(
        "a namespace without Pod Security admission",
        &problems,
        "does not enforce the restricted Pod Security Standard",
    );

    // --- Secrets ---
    let problems = problems_after_docs(|docs| {
        docs.push(
            parse(
                "apiVersion: v1\nkind: Secret\nmetadata:\n  name: ringleader-admin-token\n  \
             namespace: ringleader\nstringData:\n  token: rlt_x_y\n",
            )
            .remove(0),
        );
    });
    assert_reported(
        "an embedded Secret",
        &problems,
        "the manifests embed Secret/ringleader-admin-token",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        env_set(doc, "RINGLEADER_TOKEN", "rlt_abc_def");
    });
    assert_reported(
        "a literal token in the pod spec",
        &problems,
        "env RINGLEADER_TOKEN holds a literal value",
    );

    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        let volumes = &mut doc["spec"]["template"]["spec"]["volumes"];
        for v in volumes.as_sequence_mut().unwrap() {
            if !v["secret"].is_null() {
                v["secret"]["optional"] = Value::from(true);
            }
        }
    });
    assert_reported(
        "an optional Secret",
        &problems,
        "the Secret ringleader-worker-tls is optional",
    );

    let problems = problems_after("StatefulSet", "etcd", |doc| {
        let volumes = &mut doc["spec"]["template"]["spec"]["volumes"];
        for v in volumes.as_sequence_mut().unwrap() {
            if !v["secret"].is_null() {
                v["secret"].as_mapping_mut().unwrap().remove("defaultMode");
            }
        }
    });
    assert_reported(
        "a Secret readable by everyone",
        &problems,
        "mounted with mode 0o644, readable by others",
    );

    let problems = problems_after("Deployment", "ringleader-coordinator", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        for m in c["volumeMounts"].as_sequence_mut().unwrap() {
            if str_of(&m["name"]) == "tls" {
                m.as_mapping_mut().unwrap().remove("readOnly");
            }
        }
    });
    assert_reported(
        "a writable Secret mount",
        &problems,
        "the Secret ringleader-coordinator-tls is mounted writable",
    );

    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        let volumes = &mut doc["spec"]["template"]["spec"]["volumes"];
        for v in volumes.as_sequence_mut().unwrap() {
            if !v["secret"].is_null() {
                v["secret"]["secretName"] = Value::from("ringleader-wroker-tls");
            }
        }
    });
    assert_reported(
        "a misspelt Secret",
        &problems,
        "mounts the Secret \"ringleader-wroker-tls\", which is none of",
    );

    // --- NetworkPolicies ---
    let problems = problems_after_docs(|docs| {
        docs.retain(|d| str_of(&d["kind"]) != "NetworkPolicy");
    });
    assert_reported("no policies", &problems, "no default-deny NetworkPolicy");
    assert_reported(
        "no policies",
        &problems,
        "NetworkPolicies let an unlabelled pod of the namespace reach etcd port 2379",
    );

    let problems = problems_after("NetworkPolicy", "etcd", |doc| {
        let from = doc["spec"]["ingress"][0]["from"].as_sequence_mut().unwrap();
        let worker =
            parse("podSelector:\n  matchLabels:\n    app.kubernetes.io/component: worker\n")
                .remove(0);
        from.push(worker);
    });
    assert_reported(
        "workers admitted to etcd",
        &problems,
        "NetworkPolicies let worker pods reach etcd port 2379",
    );

    let problems = problems_after("NetworkPolicy", "etcd", |doc| {
        let rule = doc["spec"]["ingress"][1].as_mapping_mut().unwrap();
        rule.remove("ports");
    });
    assert_reported(
        "etcd peers admitted to every port",
        &problems,
        "NetworkPolicies let etcd pods reach etcd port 2379",
    );

    let problems = problems_after("NetworkPolicy", "etcd", |doc| {
        let from = doc["spec"]["ingress"][0]["from"].as_sequence_mut().unwrap();
        from.push(parse("ipBlock:\n  cidr: 0.0.0.0/0\n").remove(0));
    });
    assert_reported(
        "etcd open to an address block",
        &problems,
        "NetworkPolicies let a client pod of another namespace reach etcd port 2379",
    );

    let problems = problems_after("NetworkPolicy", "ringleader-worker", |doc| {
        doc["spec"]["ingress"][0]
            .as_mapping_mut()
            .unwrap()
            .remove("from");
    });
    assert_reported(
        "a ring port open to all",
        &problems,
        "NetworkPolicies let coordinator pods reach ringleader-worker port 7500",
    );

    let problems = problems_after("NetworkPolicy", "ringleader-coordinator", |doc| {
        let from = doc["spec"]["ingress"][0]["from"].as_sequence_mut().unwrap();
        from.remove(0);
    });
    assert_reported(
        "workers kept from the coordinators",
        &problems,
        "NetworkPolicies keep worker pods from ringleader-coordinator port 7400",
    );

    let problems = problems_after("NetworkPolicy", "ringleader-coordinator", |doc| {
        let from = doc["spec"]["ingress"][0]["from"].as_sequence_mut().unwrap();
        from[3].as_mapping_mut().unwrap().remove("podSelector");
    });
    assert_reported(
        "every pod of a client namespace admitted",
        &problems,
        "NetworkPolicies let an unlabelled pod of a client namespace reach ringleader-coordinator port 7400",
    );

    let problems = problems_after("NetworkPolicy", "ringleader-coordinator", |doc| {
        doc["spec"]["ingress"][0]["ports"][0]["port"] = Value::from(7500);
    });
    assert_reported(
        "the API policy on the wrong port",
        &problems,
        "NetworkPolicies keep worker pods from ringleader-coordinator port 7400",
    );

    let problems = problems_after("NetworkPolicy", "ringleader-coordinator", |doc| {
        let ports = doc["spec"]["ingress"][0]["ports"]
            .as_sequence_mut()
            .unwrap();
        ports.retain(|p| p["port"].as_u64() != Some(7480));
    });
    assert_reported(
        "a dashboard closed to the API's callers",
        &problems,
        "NetworkPolicies keep a client pod of the namespace from ringleader-coordinator port 7480",
    );

    let problems = problems_after("NetworkPolicy", "ringleader-coordinator", |doc| {
        let ports = doc["spec"]["ingress"][0]["ports"]
            .as_sequence_mut()
            .unwrap();
        ports.push(parse("protocol: TCP\nport: metrics\n").remove(0));
    });
    assert_reported(
        "the coordinators' metrics open to the API's callers",
        &problems,
        "NetworkPolicies let worker pods reach ringleader-coordinator port 7490",
    );

    let problems = problems_after("NetworkPolicy", "ringleader-metrics", |doc| {
        let peer = doc["spec"]["ingress"][0]["from"][0]
            .as_mapping_mut()
            .unwrap();
        peer.remove("namespaceSelector");
    });
    assert_reported(
        "metrics open to Prometheus pods of this namespace only",
        &problems,
        "NetworkPolicies let a Prometheus pod of the namespace reach ringleader-worker port 7590",
    );
    assert_reported(
        "metrics open to Prometheus pods of this namespace only",
        &problems,
        "NetworkPolicies keep a monitoring pod from ringleader-coordinator port 7490",
    );

    let problems = problems_after("NetworkPolicy", "ringleader-metrics", |doc| {
        let peer = doc["spec"]["ingress"][0]["from"][0]
            .as_mapping_mut()
            .unwrap();
        peer.remove("podSelector");
    });
    assert_reported(
        "metrics open to the whole monitoring namespace",
        &problems,
        "NetworkPolicies let an unlabelled pod of the monitoring namespace reach \
         ringleader-coordinator port 7490",
    );

    let problems = problems_after("NetworkPolicy", "ringleader-metrics", |doc| {
        doc["spec"]["ingress"][0]
            .as_mapping_mut()
            .unwrap()
            .remove("ports");
    });
    assert_reported(
        "Prometheus admitted to every port",
        &problems,
        "NetworkPolicies let a monitoring pod reach ringleader-worker port 7500",
    );

    let problems = problems_after("NetworkPolicy", "ringleader-metrics", |doc| {
        doc["spec"]["podSelector"] = parse("{}").remove(0);
    });
    assert_reported(
        "Prometheus admitted to etcd's metrics",
        &problems,
        "NetworkPolicies let a monitoring pod reach etcd port 2381",
    );

    let problems = problems_after_docs(|docs| {
        docs.retain(|d| !(str_of(&d["kind"]) == "NetworkPolicy" && id(d).ends_with("-metrics")));
    });
    assert_reported(
        "no metrics policy",
        &problems,
        "NetworkPolicies keep a monitoring pod from ringleader-worker port 7590",
    );

    let problems = problems_after("StatefulSet", "ringleader-worker", |doc| {
        let c = container_mut(doc, &["spec", "template"]);
        let ports = c["ports"].as_sequence_mut().unwrap();
        ports.push(parse("name: debug\ncontainerPort: 7599\n").remove(0));
    });
    assert_reported(
        "a port the policy checks know nothing of",
        &problems,
        "ringleader-worker pods have container port 7599 (\"debug\"), for which",
    );
}

#[test]
fn usage_errors_of_the_binaries_are_detected() {
    // The run check itself: a bad value is a usage error, a good command
    // line is not (it fails later, on the unreachable etcd).
    let env = BTreeMap::from([("RINGLEADER_LEASE_TTL".to_string(), "soon".to_string())]);
    let argv = ["serve".to_string(), "--etcd=http://127.0.0.1:1".to_string()];
    assert!(usage_error("ringleader", &argv, &env).is_some());
    assert!(usage_error("ringleader", &argv, &BTreeMap::new()).is_none());
}

/// A generated ConfigMap's base name: `ringleader-specs-g4gt7kktf7` →
/// `ringleader-specs` (kustomize appends a 10-character content hash).
fn generated_base(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((base, hash))
            if hash.len() == 10 && hash.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            base
        }
        _ => name,
    }
}

fn find_doc<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| str_of(&d["kind"]) == kind && str_of(&d["metadata"]["name"]) == name)
}

/// The first container of a workload's pod template and the pod spec.
fn first_container(doc: &Value) -> (&Value, &Value) {
    let pod_spec = &pod_template(doc).expect("a workload")["spec"];
    (&pod_spec["containers"][0], pod_spec)
}

/// (mountPath, readOnly, volume) of each volume mount of `container`.
fn mounts<'a>(container: &'a Value, pod_spec: &'a Value) -> Vec<(&'a str, bool, &'a Value)> {
    seq(&container["volumeMounts"])
        .iter()
        .filter_map(|m| {
            let volume = seq(&pod_spec["volumes"])
                .iter()
                .find(|v| str_of(&v["name"]) == str_of(&m["name"]))?;
            Some((
                str_of(&m["mountPath"]),
                m["readOnly"].as_bool() == Some(true),
                volume,
            ))
        })
        .collect()
}

/// Whether a spec file is a sweep: it has a `[sweep]` table (sweep options
/// may also come as `[sweep.params]` etc., but a sweep always has both).
fn is_sweep(text: &str) -> bool {
    text.lines().any(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        line == "[sweep]" || line.starts_with("[sweep.")
    })
}

/// Quoted absolute paths in a spec (`"/usr/share/…"`) under `prefix`.
fn quoted_paths<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.split('"')
        .skip(1)
        .step_by(2)
        .filter(|p| p.starts_with(prefix))
        .collect()
}

/// `ringleader {sweep|job} submit --dry-run FILE`: None if accepted, else
/// what it printed. No cluster is needed (nor reachable: the coordinator
/// address points nowhere).
fn dry_run(kind: &str, file: &Path) -> Option<String> {
    let output = command("ringleader")
        .args([kind, "submit", "--dry-run"])
        .arg(file)
        .env("RINGLEADER_COORDINATOR", "127.0.0.1:1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ringleader {kind} submit --dry-run`: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && stdout.starts_with("valid: ") {
        return None;
    }
    Some(format!(
        "exit {:?}: {}{}",
        output.status.code(),
        stdout.trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// Directories the worker image copies from its dataset stage
/// (`COPY --from=dataset SRC DST` with SRC = DST).
fn worker_image_datasets() -> Vec<String> {
    let path = repo_root().join("deploy/worker.Dockerfile");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["COPY", "--from=dataset", src, dst]
                    if src == dst && dst.starts_with("/usr/share/datasets/") =>
                {
                    Some(dst.trim_end_matches('/').to_string())
                }
                _ => None,
            }
        })
        .collect()
}

/// `/etc/ringleader/specs/FILE` names in the user documentation.
fn documented_specs() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for doc in DOCS {
        let path = repo_root().join(doc);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let prefix = format!("{SPECS_DIR}/");
        for (at, _) in text.match_indices(&prefix) {
            let name: String = text[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                .collect();
            if !name.is_empty() {
                names.insert(name.trim_end_matches('.').to_string());
            }
        }
    }
    names
}

/// Every problem with the example specs, their mount and the checkpoint
/// volume in one overlay's rendering. `documented` are the spec files the
/// docs tell users to submit.
fn spec_problems(docs: &[Value], documented: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let config_map = |base: &str| {
        docs.iter().find(|d| {
            str_of(&d["kind"]) == "ConfigMap"
                && generated_base(str_of(&d["metadata"]["name"])) == base
        })
    };

    // The specs: each entry is a valid sweep or job, reading only data the
    // worker image carries.
    let specs = match config_map(SPECS_CONFIG_MAP) {
        Some(doc) => string_map(&doc["data"]),
        None => {
            problems.push(format!("no ConfigMap {SPECS_CONFIG_MAP} is rendered"));
            BTreeMap::new()
        }
    };
    if config_map(SPECS_CONFIG_MAP).is_some() && specs.is_empty() {
        problems.push(format!("ConfigMap {SPECS_CONFIG_MAP} holds no specs"));
    }
    let datasets = worker_image_datasets();
    let dir = tempfile::tempdir().expect("a temp dir");
    for (key, text) in &specs {
        let file = dir.path().join(key);
        std::fs::write(&file, text).expect("write a spec to the temp dir");
        let kind = if is_sweep(text) { "sweep" } else { "job" };
        if let Some(error) = dry_run(kind, &file) {
            problems.push(format!(
                "{SPECS_CONFIG_MAP} entry {key}: `ringleader {kind} submit --dry-run` rejects it: {error}"
            ));
        }
        for path in quoted_paths(text, "/usr/share/datasets/") {
            if !datasets.iter().any(|d| path.starts_with(&format!("{d}/"))) {
                problems.push(format!(
                    "{SPECS_CONFIG_MAP} entry {key} reads {path}, which deploy/worker.Dockerfile \
                     does not copy into the worker image (it copies {datasets:?})"
                ));
            }
        }
    }
    for name in documented {
        if !specs.contains_key(name) {
            problems.push(format!(
                "the docs submit {SPECS_DIR}/{name}, but {SPECS_CONFIG_MAP} has no entry {name} \
                 (it has {:?})",
                specs.keys().collect::<Vec<_>>()
            ));
        }
    }

    // Mounted read-only where the docs say, in the coordinator pods.
    match find_doc(docs, "Deployment", "ringleader-coordinator") {
        Some(doc) => {
            let (c, pod_spec) = first_container(doc);
            let mounted = mounts(c, pod_spec).into_iter().find(|(_, _, v)| {
                generated_base(str_of(&v["configMap"]["name"])) == SPECS_CONFIG_MAP
            });
            match mounted {
                Some((path, read_only, _)) => {
                    if path != SPECS_DIR {
                        problems.push(format!(
                            "coordinators mount {SPECS_CONFIG_MAP} at {path}; the docs say {SPECS_DIR}"
                        ));
                    }
                    if !read_only {
                        problems.push(format!("coordinators mount {SPECS_CONFIG_MAP} writable"));
                    }
                }
                None => problems.push(format!(
                    "the coordinator container does not mount ConfigMap {SPECS_CONFIG_MAP}"
                )),
            }
        }
        None => problems.push("no Deployment/ringleader-coordinator is rendered".into()),
    }

    // RINGLEADER_CHECKPOINT_DIR is the shared volume in every worker.
    let checkpoint_dir = config_map("ringleader-coordinator")
        .map(|doc| string_map(&doc["data"]))
        .and_then(|data| data.get("RINGLEADER_CHECKPOINT_DIR").cloned());
    let Some(checkpoint_dir) = checkpoint_dir else {
        problems.push("ConfigMap ringleader-coordinator sets no RINGLEADER_CHECKPOINT_DIR".into());
        return problems;
    };
    match find_doc(docs, "StatefulSet", "ringleader-worker") {
        Some(doc) => {
            let (c, pod_spec) = first_container(doc);
            let mounted = mounts(c, pod_spec).into_iter().find(|(_, _, v)| {
                str_of(&v["persistentVolumeClaim"]["claimName"]) == CHECKPOINT_CLAIM
            });
            match mounted {
                Some((path, read_only, _)) => {
                    if path.trim_end_matches('/') != checkpoint_dir.trim_end_matches('/') {
                        problems.push(format!(
                            "workers mount {CHECKPOINT_CLAIM} at {path}, but \
                             RINGLEADER_CHECKPOINT_DIR is {checkpoint_dir}"
                        ));
                    }
                    if read_only {
                        problems.push(format!("workers mount {CHECKPOINT_CLAIM} read-only"));
                    }
                }
                None => problems.push(format!(
                    "the worker container does not mount the claim {CHECKPOINT_CLAIM} \
                     (RINGLEADER_CHECKPOINT_DIR is {checkpoint_dir})"
                )),
            }
        }
        None => problems.push("no StatefulSet/ringleader-worker is rendered".into()),
    }
    match find_doc(docs, "PersistentVolumeClaim", CHECKPOINT_CLAIM) {
        Some(claim) => {
            let modes: Vec<&str> = seq(&claim["spec"]["accessModes"])
                .iter()
                .map(str_of)
                .collect();
            if !modes.contains(&"ReadWriteMany") {
                problems.push(format!(
                    "PersistentVolumeClaim/{CHECKPOINT_CLAIM} has access modes {modes:?}; \
                     workers on different nodes share it, so it needs ReadWriteMany"
                ));
            }
        }
        None => problems.push(format!(
            "no PersistentVolumeClaim/{CHECKPOINT_CLAIM} is rendered"
        )),
    }
    // Workers confine trials: data only under RINGLEADER_DATA_ROOTS,
    // checkpoints only under RINGLEADER_CHECKPOINT_ROOT. The specs and the
    // coordinators' RINGLEADER_CHECKPOINT_DIR must lie inside them.
    let worker_env = config_map("ringleader-worker")
        .map(|doc| string_map(&doc["data"]))
        .unwrap_or_default();
    let data_roots: Vec<String> = worker_env
        .get("RINGLEADER_DATA_ROOTS")
        .cloned()
        .unwrap_or_else(|| WORKER_DEFAULT_DATA_ROOTS.to_string())
        .split(',')
        .map(|r| r.trim().trim_end_matches('/').to_string())
        .filter(|r| !r.is_empty())
        .collect();
    for (key, text) in &specs {
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.starts_with("dir") {
                continue;
            }
            for path in quoted_paths(line, "/") {
                if !data_roots
                    .iter()
                    .any(|root| Path::new(path).starts_with(root))
                {
                    problems.push(format!(
                        "{SPECS_CONFIG_MAP} entry {key} reads {path}, outside the workers' \
                         RINGLEADER_DATA_ROOTS {data_roots:?}"
                    ));
                }
            }
        }
    }
    match worker_env.get("RINGLEADER_CHECKPOINT_ROOT") {
        Some(root) if Path::new(&checkpoint_dir).starts_with(root) => {}
        Some(root) => problems.push(format!(
            "RINGLEADER_CHECKPOINT_DIR {checkpoint_dir} lies outside the workers' \
             RINGLEADER_CHECKPOINT_ROOT {root}: trials could not checkpoint there"
        )),
        None => problems.push(
            "ConfigMap ringleader-worker sets no RINGLEADER_CHECKPOINT_ROOT: workers should \
             write checkpoints only on the shared volume"
                .into(),
        ),
    }

    // A spec that names its own checkpoint dir must stay on the volume.
    for (key, text) in &specs {
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let Some(value) = line.strip_prefix("dir").map(str::trim_start) else {
                continue;
            };
            let Some(value) = value.strip_prefix('=') else {
                continue;
            };
            let dir = value.trim().trim_matches('"');
            if !Path::new(dir).starts_with(&checkpoint_dir) {
                problems.push(format!(
                    "{SPECS_CONFIG_MAP} entry {key} checkpoints to {dir}, outside the shared \
                     volume at {checkpoint_dir}"
                ));
            }
        }
    }
    problems
}

#[test]
fn specs_mounts_and_checkpoints_are_consistent() {
    let documented = documented_specs();
    assert!(
        !documented.is_empty(),
        "{DOCS:?} mention no {SPECS_DIR}/FILE; the walkthrough submits the example specs"
    );
    for overlay in overlays() {
        let problems = spec_problems(&render(&overlay), &documented);
        assert_clean(&overlay, &problems);
    }
}

/// Applies `edit` to the cpu rendering and returns the spec problems.
fn spec_problems_after(edit: impl FnOnce(&mut Vec<Value>)) -> Vec<String> {
    let mut docs = render("cpu");
    edit(&mut docs);
    spec_problems(&docs, &documented_specs())
}

fn doc_mut<'a>(docs: &'a mut [Value], kind: &str, base: &str) -> &'a mut Value {
    docs.iter_mut()
        .find(|d| {
            str_of(&d["kind"]) == kind && generated_base(str_of(&d["metadata"]["name"])) == base
        })
        .unwrap_or_else(|| panic!("cpu overlay renders no {kind}/{base}"))
}

fn spec_entry_mut<'a>(docs: &'a mut [Value], needle: &str) -> (String, &'a mut Value) {
    let data = doc_mut(docs, "ConfigMap", SPECS_CONFIG_MAP)["data"]
        .as_mapping_mut()
        .expect("spec data");
    let (key, value) = data
        .iter_mut()
        .find(|(_, v)| str_of(v).contains(needle))
        .unwrap_or_else(|| panic!("no spec contains {needle:?}"));
    (str_of(key).to_string(), value)
}

#[test]
fn spec_checks_catch_broken_specs_and_mounts() {
    assert_clean("cpu", &spec_problems(&render("cpu"), &documented_specs()));

    // A sweep the binary rejects (eta must be at least 2).
    let problems = spec_problems_after(|docs| {
        let (_, text) = spec_entry_mut(docs, "searcher = \"asha\"");
        *text = Value::from(str_of(text).replace("eta = 3", "eta = 1"));
    });
    assert_reported(
        "an invalid sweep",
        &problems,
        "sweep submit --dry-run` rejects it",
    );

    // A job the binary rejects.
    let problems = spec_problems_after(|docs| {
        let (_, text) = spec_entry_mut(docs, "workers = 2");
        *text = Value::from(str_of(text).replace("device = \"auto\"", "device = \"gpu\""));
    });
    assert_reported(
        "an invalid job",
        &problems,
        "job submit --dry-run` rejects it",
    );

    // Data the worker image does not carry.
    let problems = spec_problems_after(|docs| {
        let (_, text) = spec_entry_mut(docs, "fashion-mnist/t10k");
        *text = Value::from(str_of(text).replace("fashion-mnist/t10k", "mnist/t10k"));
    });
    assert_reported(
        "data outside the image",
        &problems,
        "does not copy into the worker image",
    );

    // A spec the docs submit that the ConfigMap lacks.
    let problems = spec_problems_after(|docs| {
        let (key, _) = spec_entry_mut(docs, "hartmann6");
        let data = doc_mut(docs, "ConfigMap", SPECS_CONFIG_MAP)["data"]
            .as_mapping_mut()
            .unwrap();
        data.remove(key.as_str());
    });
    assert_reported("a documented spec missing", &problems, "has no entry");

    // The specs mounted elsewhere.
    let problems = spec_problems_after(|docs| {
        let doc = doc_mut(docs, "Deployment", "ringleader-coordinator");
        let c = container_mut(doc, &["spec", "template"]);
        c["volumeMounts"][0]["mountPath"] = Value::from("/specs");
    });
    assert_reported("specs mounted elsewhere", &problems, "at /specs");

    // The checkpoint volume away from RINGLEADER_CHECKPOINT_DIR.
    let problems = spec_problems_after(|docs| {
        let doc = doc_mut(docs, "StatefulSet", "ringleader-worker");
        let c = container_mut(doc, &["spec", "template"]);
        for m in c["volumeMounts"].as_sequence_mut().unwrap() {
            if str_of(&m["name"]) == "checkpoints" {
                m["mountPath"] = Value::from("/checkpoints");
            }
        }
    });
    assert_reported(
        "checkpoints mounted elsewhere",
        &problems,
        "RINGLEADER_CHECKPOINT_DIR is",
    );

    // A claim one node at a time.
    let problems = spec_problems_after(|docs| {
        let claim = doc_mut(docs, "PersistentVolumeClaim", CHECKPOINT_CLAIM);
        claim["spec"]["accessModes"] = Value::from(vec![Value::from("ReadWriteOnce")]);
    });
    assert_reported("a ReadWriteOnce claim", &problems, "needs ReadWriteMany");

    // No claim at all.
    let problems = spec_problems_after(|docs| {
        docs.retain(|d| str_of(&d["kind"]) != "PersistentVolumeClaim");
    });
    assert_reported(
        "a missing claim",
        &problems,
        "no PersistentVolumeClaim/ringleader-checkpoints",
    );

    // Data outside the workers' data roots.
    let problems = spec_problems_after(|docs| {
        let env = doc_mut(docs, "ConfigMap", "ringleader-worker");
        env["data"]["RINGLEADER_DATA_ROOTS"] = Value::from("/srv/data");
    });
    assert_reported(
        "data outside the data roots",
        &problems,
        "outside the workers' RINGLEADER_DATA_ROOTS",
    );

    // RINGLEADER_CHECKPOINT_DIR outside the workers' checkpoint root.
    let problems = spec_problems_after(|docs| {
        let env = doc_mut(docs, "ConfigMap", "ringleader-worker");
        env["data"]["RINGLEADER_CHECKPOINT_ROOT"] = Value::from("/var/lib/ringleader/other");
    });
    assert_reported(
        "a checkpoint dir outside the root",
        &problems,
        "lies outside the workers' RINGLEADER_CHECKPOINT_ROOT",
    );

    // A spec that checkpoints off the shared volume.
    let problems = spec_problems_after(|docs| {
        let (_, text) = spec_entry_mut(docs, "workers = 2");
        *text = Value::from(format!(
            "{}\n[checkpoint]\ndir = \"/tmp/ckpt\"\n",
            str_of(text)
        ));
    });
    assert_reported(
        "a checkpoint dir off the volume",
        &problems,
        "outside the shared volume",
    );
}

// ---------------------------------------------------------------------------
// Secure by default (issue 13): TLS everywhere, Secrets only by reference,
// unprivileged pods, NetworkPolicies.

/// The uid (and gid) of our images; every pod runs as it.
const POD_UID: u64 = 10001;
/// The label that lets a pod (and, for other namespaces, a namespace) use the
/// coordinators' API.
const CLIENT_LABEL: &str = "ringleader.io/client";
/// Who may scrape the metrics ports (the policy ringleader-metrics, the
/// knob docs/KUBERNETES.md tells users to change): pods with this label in
/// this namespace.
const MONITORING_NAMESPACE: &str = "monitoring";
const MONITORING_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "prometheus");
/// The container port (name) of our metrics, and its path.
const METRICS_PORT: &str = "metrics";
const METRICS_PATH: &str = "/metrics";
/// Every Secret the manifests may mount. None is ever rendered: they are
/// made with `ringleader certs init` + `kubectl create secret`, or by
/// cert-manager (k8s/cert-manager).
const SECRETS: &[&str] = &[
    "ringleader-coordinator-tls",
    "ringleader-worker-tls",
    "ringleader-client-tls",
    "ringleader-etcd-server-tls",
    "ringleader-etcd-peer-tls",
    "ringleader-etcd-client-tls",
    "ringleader-admin-token",
];
/// The Secret holding the bootstrap admin token, and its key.
const ADMIN_TOKEN_SECRET: &str = "ringleader-admin-token";
const ADMIN_TOKEN_KEY: &str = "token";
/// What a `--tls-dir` reads: the layout of a `kubernetes.io/tls` Secret
/// with `ca.crt`.
const TLS_FILES: [&str; 3] = ["ca.crt", "tls.crt", "tls.key"];

/// A container's environment as the kubelet sets it.
struct ContainerEnv {
    /// `env` (values; fieldRefs get stand-ins) over the ConfigMaps of
    /// `envFrom`.
    vars: BTreeMap<String, String>,
    /// Keys that came from ConfigMaps.
    from_config_maps: Vec<String>,
    /// ConfigMaps of `envFrom` that are not rendered.
    missing_config_maps: Vec<String>,
}

fn container_env(c: &Value, config_maps: &BTreeMap<&str, &Value>) -> ContainerEnv {
    let mut vars = BTreeMap::new();
    for var in seq(&c["env"]) {
        let key = str_of(&var["name"]).to_string();
        let value = match (
            &var["value"],
            str_of(&var["valueFrom"]["fieldRef"]["fieldPath"]),
        ) {
            (Value::String(v), _) => v.clone(),
            (_, "status.podIP") => "127.0.0.1".to_string(),
            (_, "metadata.name") => "pod-0".to_string(),
            (_, "metadata.namespace") => "ringleader".to_string(),
            _ => "x".to_string(),
        };
        vars.insert(key, value);
    }
    let mut from_config_maps = Vec::new();
    let mut missing_config_maps = Vec::new();
    for source in seq(&c["envFrom"]) {
        let map = str_of(&source["configMapRef"]["name"]);
        if map.is_empty() {
            continue;
        }
        match config_maps.get(map) {
            Some(doc) => {
                for (k, v) in string_map(&doc["data"]) {
                    from_config_maps.push(k.clone());
                    // `env` wins over `envFrom`.
                    vars.entry(k).or_insert(v);
                }
            }
            None => missing_config_maps.push(map.to_string()),
        }
    }
    ContainerEnv {
        vars,
        from_config_maps,
        missing_config_maps,
    }
}

/// A container's argv after the binary: the rest of `command`, then `args`.
fn argv_of(c: &Value) -> Vec<String> {
    seq(&c["command"])
        .iter()
        .skip(1)
        .chain(seq(&c["args"]))
        .map(|v| str_of(v).to_string())
        .collect()
}

/// The value of `--flag=value` or `--flag value` in `argv` (the last one
/// wins, as with clap); `Some("")` for a bare `--flag` at the end or before
/// another flag.
fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    let mut found = None;
    let mut args = argv.iter().peekable();
    while let Some(arg) = args.next() {
        if let Some(value) = arg.strip_prefix(&format!("{flag}=")) {
            found = Some(value.to_string());
        } else if arg == flag {
            found = Some(match args.peek() {
                Some(next) if !next.starts_with("--") => args.next().unwrap().clone(),
                _ => String::new(),
            });
        }
    }
    found
}

/// A setting as the binary sees it: the flag, else the environment.
fn setting(
    argv: &[String],
    env: &BTreeMap<String, String>,
    flag: &str,
    var: &str,
) -> Option<String> {
    flag_value(argv, flag).or_else(|| env.get(var).cloned())
}

/// `$(VAR)` references replaced by `vars` (the rest left as they are).
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for var in var_refs(text) {
        if let Some(value) = vars.get(&var) {
            out = out.replace(&format!("$({var})"), value);
        }
    }
    out
}

/// The Secret volume mounted at exactly `dir` in `c`, if any: (Secret
/// name, the volume).
fn secret_at<'a>(c: &'a Value, pod_spec: &'a Value, dir: &str) -> Option<(&'a str, &'a Value)> {
    mounts(c, pod_spec)
        .into_iter()
        .find(|(path, _, _)| path.trim_end_matches('/') == dir.trim_end_matches('/'))
        .and_then(|(_, _, v)| {
            let name = str_of(&v["secret"]["secretName"]);
            (!name.is_empty()).then_some((name, v))
        })
}

/// The file names a Secret volume shows: its items' paths (key → path), or
/// None when it shows every key.
fn secret_items(volume: &Value) -> Option<BTreeMap<String, String>> {
    let items = volume["secret"]["items"].as_sequence()?;
    Some(
        items
            .iter()
            .map(|i| {
                (
                    str_of(&i["path"]).to_string(),
                    str_of(&i["key"]).to_string(),
                )
            })
            .collect(),
    )
}

/// Checks that the directory setting `what` = `dir` of container `name` is
/// where the Secret `secret` is mounted, with all of ca.crt, tls.crt and
/// tls.key.
fn check_tls_dir(
    name: &str,
    what: &str,
    dir: Option<&str>,
    secret: &str,
    (c, pod_spec): (&Value, &Value),
    problems: &mut Vec<String>,
) {
    let Some(dir) = dir.filter(|d| !d.is_empty()) else {
        problems.push(format!(
            "{name}: {what} is not set; it must be where the Secret {secret} is mounted"
        ));
        return;
    };
    match secret_at(c, pod_spec, dir) {
        Some((mounted, volume)) if mounted == secret => {
            if let Some(items) = secret_items(volume) {
                for file in TLS_FILES {
                    if items.get(file).map(String::as_str) != Some(file) {
                        problems.push(format!(
                            "{name}: {what} {dir} holds only {:?} of Secret {secret}; \
                             it needs {TLS_FILES:?}",
                            items.keys().collect::<Vec<_>>()
                        ));
                        break;
                    }
                }
            }
        }
        Some((mounted, _)) => problems.push(format!(
            "{name}: {what} {dir} is the Secret {mounted}, not {secret}"
        )),
        None => problems.push(format!(
            "{name}: {what} {dir} is not where a Secret is mounted (it must be {secret})"
        )),
    }
}

/// Checks that the file setting `what` = `file` is the admin token of the
/// Secret ringleader-admin-token.
fn check_token_file(
    name: &str,
    what: &str,
    file: Option<&str>,
    (c, pod_spec): (&Value, &Value),
    problems: &mut Vec<String>,
) {
    let Some(file) = file.filter(|f| !f.is_empty()) else {
        problems.push(format!(
            "{name}: {what} is not set; it must be the key {ADMIN_TOKEN_KEY} of the Secret \
             {ADMIN_TOKEN_SECRET}"
        ));
        return;
    };
    let path = Path::new(file);
    let (Some(dir), Some(base)) = (path.parent(), path.file_name()) else {
        problems.push(format!("{name}: {what} {file} is no file path"));
        return;
    };
    let base = base.to_string_lossy();
    let key = match secret_at(c, pod_spec, &dir.to_string_lossy()) {
        Some((ADMIN_TOKEN_SECRET, volume)) => match secret_items(volume) {
            Some(items) => items.get(base.as_ref()).cloned(),
            None => Some(base.to_string()),
        },
        Some((other, _)) => {
            problems.push(format!(
                "{name}: {what} {file} lies in the Secret {other}, not {ADMIN_TOKEN_SECRET}"
            ));
            return;
        }
        None => None,
    };
    if key.as_deref() != Some(ADMIN_TOKEN_KEY) {
        problems.push(format!(
            "{name}: {what} {file} is not the key {ADMIN_TOKEN_KEY} of a mounted Secret \
             {ADMIN_TOKEN_SECRET}"
        ));
    }
}

/// Every security problem of one rendering.
fn security_problems(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let config_maps: BTreeMap<&str, &Value> = docs
        .iter()
        .filter(|d| str_of(&d["kind"]) == "ConfigMap")
        .map(|d| (str_of(&d["metadata"]["name"]), d))
        .collect();
    for doc in docs {
        let Some(template) = pod_template(doc) else {
            continue;
        };
        let pod_spec = &template["spec"];
        pod_security_problems(&id(doc), pod_spec, &mut problems);
        secret_volume_problems(&id(doc), pod_spec, &mut problems);
        for c in containers(pod_spec) {
            let name = format!("{} container {}", id(doc), str_of(&c["name"]));
            let env = container_env(c, &config_maps).vars;
            tls_problems(&name, c, pod_spec, &env, &mut problems);
        }
    }
    embedded_secret_problems(docs, &config_maps, &mut problems);
    etcd_problems(docs, &mut problems);
    // The API server holds every pod of the namespace to what
    // pod_security_problems checks of ours.
    for doc in docs.iter().filter(|d| str_of(&d["kind"]) == "Namespace") {
        let labels = string_map(&doc["metadata"]["labels"]);
        if labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str)
            != Some("restricted")
        {
            problems.push(format!(
                "{} does not enforce the restricted Pod Security Standard \
                 (pod-security.kubernetes.io/enforce: restricted)",
                id(doc)
            ));
        }
    }
    problems.extend(network_policy_problems(docs));
    problems
}

/// Non-root, no privilege escalation, no capabilities, a read-only root
/// filesystem, the runtime's seccomp profile, no service account token, no
/// host namespaces or paths.
fn pod_security_problems(workload: &str, pod_spec: &Value, problems: &mut Vec<String>) {
    let pod = &pod_spec["securityContext"];
    if pod_spec["automountServiceAccountToken"].as_bool() != Some(false) {
        problems.push(format!(
            "{workload}: automountServiceAccountToken is not false (no pod of ours uses the \
             Kubernetes API)"
        ));
    }
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod_spec[host].as_bool() == Some(true) {
            problems.push(format!("{workload}: {host} is true"));
        }
    }
    for v in seq(&pod_spec["volumes"]) {
        if !v["hostPath"].is_null() {
            problems.push(format!(
                "{workload}: volume {} is a hostPath",
                str_of(&v["name"])
            ));
        }
    }
    let mounts_secrets = seq(&pod_spec["volumes"])
        .iter()
        .any(|v| !v["secret"].is_null());
    if mounts_secrets && pod["fsGroup"].as_u64() != Some(POD_UID) {
        problems.push(format!(
            "{workload}: fsGroup is {}, not {POD_UID}: the Secrets' files (mode 0440) must \
             belong to the group of uid {POD_UID}",
            serde_yaml::to_string(&pod["fsGroup"]).unwrap().trim()
        ));
    }
    for c in containers(pod_spec) {
        let name = format!("{workload} container {}", str_of(&c["name"]));
        let own = &c["securityContext"];
        // The container's setting wins over the pod's.
        let effective = |key: &str| -> &Value {
            if own[key].is_null() {
                &pod[key]
            } else {
                &own[key]
            }
        };
        if effective("runAsNonRoot").as_bool() != Some(true) {
            problems.push(format!("{name}: runAsNonRoot is not true"));
        }
        if effective("runAsUser").as_u64() != Some(POD_UID) {
            problems.push(format!(
                "{name}: runAsUser is {}, not {POD_UID} (our images' user)",
                serde_yaml::to_string(effective("runAsUser"))
                    .unwrap()
                    .trim()
            ));
        }
        if str_of(&effective("seccompProfile")["type"]) != "RuntimeDefault" {
            problems.push(format!("{name}: seccompProfile is not RuntimeDefault"));
        }
        if own["allowPrivilegeEscalation"].as_bool() != Some(false) {
            problems.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        if own["privileged"].as_bool() == Some(true) {
            problems.push(format!("{name}: privileged"));
        }
        let drops: Vec<&str> = seq(&own["capabilities"]["drop"])
            .iter()
            .map(str_of)
            .collect();
        if !drops.contains(&"ALL") {
            problems.push(format!("{name}: capabilities do not drop ALL ({drops:?})"));
        }
        if !seq(&own["capabilities"]["add"]).is_empty() {
            problems.push(format!("{name}: adds capabilities"));
        }
        if own["readOnlyRootFilesystem"].as_bool() != Some(true) {
            problems.push(format!("{name}: readOnlyRootFilesystem is not true"));
        }
        // With a read-only root, $HOME (libtorch's caches) must be a
        // writable volume.
        let home = seq(&c["env"])
            .iter()
            .find(|v| str_of(&v["name"]) == "HOME")
            .map(|v| str_of(&v["value"]));
        if let Some(home) = home {
            let writable = mounts(c, pod_spec)
                .iter()
                .any(|(path, read_only, _)| !read_only && Path::new(home).starts_with(path));
            if !writable {
                problems.push(format!(
                    "{name}: HOME={home} is on the read-only root filesystem"
                ));
            }
        }
    }
}

/// Secret volumes: known names, required (never `optional`), mounted
/// read-only, and no file readable by others.
fn secret_volume_problems(workload: &str, pod_spec: &Value, problems: &mut Vec<String>) {
    for v in seq(&pod_spec["volumes"]) {
        let secret = &v["secret"];
        if secret.is_null() {
            continue;
        }
        let name = str_of(&secret["secretName"]);
        let volume = str_of(&v["name"]);
        if !SECRETS.contains(&name) {
            problems.push(format!(
                "{workload}: volume {volume} mounts the Secret {name:?}, which is none of {SECRETS:?}"
            ));
        }
        if secret["optional"].as_bool() == Some(true) {
            problems.push(format!(
                "{workload}: the Secret {name} is optional; a pod must not start without it"
            ));
        }
        // Kubernetes' default mode is 0644.
        let mut modes = vec![secret["defaultMode"].as_u64().unwrap_or(0o644)];
        modes.extend(
            seq(&secret["items"])
                .iter()
                .filter_map(|i| i["mode"].as_u64()),
        );
        for mode in modes {
            if mode & 0o007 != 0 {
                problems.push(format!(
                    "{workload}: the Secret {name} is mounted with mode {mode:#o}, readable by \
                     others (use defaultMode 0440 with fsGroup)"
                ));
            }
        }
        for c in containers(pod_spec) {
            for m in seq(&c["volumeMounts"]) {
                if str_of(&m["name"]) == volume && m["readOnly"].as_bool() != Some(true) {
                    problems.push(format!(
                        "{workload} container {}: the Secret {name} is mounted writable",
                        str_of(&c["name"])
                    ));
                }
            }
        }
    }
}

/// Our containers: TLS on, its material from the right Secrets, no
/// `--insecure`, the ring encrypted, etcd over https.
fn tls_problems(
    name: &str,
    c: &Value,
    pod_spec: &Value,
    env: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    let Some(binary) = our_binary(str_of(&c["image"])) else {
        return;
    };
    let argv = argv_of(c);
    let pod = (c, pod_spec);
    if argv
        .iter()
        .any(|a| a == "--insecure" || a.starts_with("--insecure="))
    {
        problems.push(format!("{name}: runs with --insecure"));
    }
    if let Some(value) = env.get("RINGLEADER_INSECURE") {
        problems.push(format!(
            "{name}: sets RINGLEADER_INSECURE={value}; no container of ours runs without TLS"
        ));
    }
    match binary {
        "ringleader" => {
            let serve = |flag, var| setting(&argv, env, flag, var);
            check_tls_dir(
                name,
                "the coordinator's TLS dir (--tls-dir)",
                serve("--tls-dir", "RINGLEADER_TLS_DIR").as_deref(),
                "ringleader-coordinator-tls",
                pod,
                problems,
            );
            check_tls_dir(
                name,
                "the etcd client TLS dir (--etcd-tls-dir)",
                serve("--etcd-tls-dir", "RINGLEADER_ETCD_TLS_DIR").as_deref(),
                "ringleader-etcd-client-tls",
                pod,
                problems,
            );
            check_token_file(
                name,
                "--admin-token-file",
                serve("--admin-token-file", "RINGLEADER_ADMIN_TOKEN_FILE").as_deref(),
                pod,
                problems,
            );
            let endpoints = serve("--etcd", "RINGLEADER_ETCD").unwrap_or_default();
            for endpoint in endpoints.split(',').filter(|e| !e.is_empty()) {
                if !endpoint.starts_with("https://") {
                    problems.push(format!(
                        "{name}: etcd endpoint {endpoint} is not https:// (etcd takes TLS only)"
                    ));
                }
            }
            // `kubectl exec … -- ringleader status` runs a client with the
            // container's environment (flags of `serve` do not reach it).
            check_tls_dir(
                name,
                "the client TLS dir of exec sessions (env RINGLEADER_TLS_DIR)",
                env.get("RINGLEADER_TLS_DIR").map(String::as_str),
                "ringleader-client-tls",
                pod,
                problems,
            );
            check_token_file(
                name,
                "the token of exec sessions (env RINGLEADER_TOKEN_FILE)",
                env.get("RINGLEADER_TOKEN_FILE").map(String::as_str),
                pod,
                problems,
            );
        }
        "ringleader-worker" => {
            check_tls_dir(
                name,
                "the worker's TLS dir (--tls-dir)",
                setting(&argv, env, "--tls-dir", "RINGLEADER_TLS_DIR").as_deref(),
                "ringleader-worker-tls",
                pod,
                problems,
            );
            let ring = setting(
                &argv,
                env,
                "--ring-encryption",
                "RINGLEADER_RING_ENCRYPTION",
            );
            if let Some(ring) = ring.filter(|r| r != "on") {
                problems.push(format!(
                    "{name}: ring encryption is {ring:?}; the ring must stay encrypted (on)"
                ));
            }
        }
        _ => {}
    }
}

/// No Secret, key or token is part of the manifests: Secrets are only
/// referenced.
fn embedded_secret_problems(
    docs: &[Value],
    config_maps: &BTreeMap<&str, &Value>,
    problems: &mut Vec<String>,
) {
    for doc in docs {
        if str_of(&doc["kind"]) == "Secret" {
            problems.push(format!(
                "the manifests embed {}: Secrets are made outside them (docs/KUBERNETES.md, \
                 \"Certificates and Secrets\") and only referenced",
                id(doc)
            ));
        }
        let text = serde_yaml::to_string(doc).unwrap();
        if text.contains("-----BEGIN") {
            problems.push(format!("{} embeds PEM material", id(doc)));
        }
    }
    // Values that look like credentials, in pod specs or ConfigMaps.
    let secret_like = |key: &str| {
        let key = key.to_ascii_uppercase();
        ["TOKEN", "PASSWORD", "SECRET", "KEY"]
            .iter()
            .any(|w| key.contains(w))
    };
    // A path to a mounted file is how secrets get in; anything else is the
    // secret itself.
    let literal = |value: &str| !value.is_empty() && !value.starts_with('/');
    for doc in docs {
        let Some(template) = pod_template(doc) else {
            continue;
        };
        for c in containers(&template["spec"]) {
            let name = format!("{} container {}", id(doc), str_of(&c["name"]));
            for var in seq(&c["env"]) {
                let key = str_of(&var["name"]);
                if secret_like(key) && literal(str_of(&var["value"])) {
                    problems.push(format!(
                        "{name}: env {key} holds a literal value; give a file from a Secret"
                    ));
                }
                let from = str_of(&var["valueFrom"]["secretKeyRef"]["name"]);
                if !from.is_empty() && !SECRETS.contains(&from) {
                    problems.push(format!("{name}: env {key} reads the unknown Secret {from}"));
                }
            }
            for arg in argv_of(c) {
                if arg == "--token" || arg.starts_with("--token=") {
                    problems.push(format!(
                        "{name}: a token on the command line ({arg}); use a token file"
                    ));
                }
            }
        }
    }
    for (map, doc) in config_maps {
        for (key, value) in string_map(&doc["data"]) {
            if key.starts_with("RINGLEADER_") && secret_like(&key) && literal(&value) {
                problems.push(format!(
                    "ConfigMap {map}: {key} holds a literal value; give a file from a Secret"
                ));
            }
        }
    }
}

/// etcd serves clients and peers over TLS only, with client certificates
/// required on both ports, from its own Secret; the coordinators dial
/// exactly the members' https client URLs.
fn etcd_problems(docs: &[Value], problems: &mut Vec<String>) {
    let Some(etcd) = find_doc(docs, "StatefulSet", "etcd") else {
        problems.push("no StatefulSet/etcd is rendered".into());
        return;
    };
    let (c, pod_spec) = first_container(etcd);
    let name = format!("{} container {}", id(etcd), str_of(&c["name"]));
    let argv = argv_of(c);
    let flag = |f: &str| flag_value(&argv, &format!("--{f}"));
    for f in ["client-cert-auth", "peer-client-cert-auth"] {
        if flag(f).as_deref() != Some("true") {
            problems.push(format!(
                "{name}: --{f} is not true: etcd must require certificates of the etcd CA"
            ));
        }
    }
    for f in ["auto-tls", "peer-auto-tls"] {
        if flag(f).is_some_and(|v| v != "false") {
            problems.push(format!(
                "{name}: --{f} makes self-signed certificates nobody verifies"
            ));
        }
    }
    for f in [
        "listen-client-urls",
        "advertise-client-urls",
        "listen-peer-urls",
        "initial-advertise-peer-urls",
        "initial-cluster",
    ] {
        let Some(value) = flag(f) else {
            problems.push(format!("{name}: no --{f}"));
            continue;
        };
        for url in value.split(',') {
            let url = if f == "initial-cluster" {
                url.split_once('=').map(|(_, u)| u).unwrap_or(url)
            } else {
                url
            };
            if !url.starts_with("https://") {
                problems.push(format!("{name}: --{f} has {url}, not https://"));
            }
        }
    }
    let secrets = ["ringleader-etcd-server-tls", "ringleader-etcd-peer-tls"];
    for (f, file) in [
        ("trusted-ca-file", "ca.crt"),
        ("cert-file", "tls.crt"),
        ("key-file", "tls.key"),
        ("peer-trusted-ca-file", "ca.crt"),
        ("peer-cert-file", "tls.crt"),
        ("peer-key-file", "tls.key"),
    ] {
        let Some(path) = flag(f) else {
            problems.push(format!("{name}: no --{f}"));
            continue;
        };
        let dir = Path::new(&path).parent().unwrap_or(Path::new("/"));
        let ok = Path::new(&path).file_name().is_some_and(|n| n == file)
            && secret_at(c, pod_spec, &dir.to_string_lossy())
                .is_some_and(|(secret, _)| secrets.contains(&secret));
        if !ok {
            problems.push(format!(
                "{name}: --{f}={path} is not the {file} of a mounted Secret {secrets:?}"
            ));
        }
    }

    // The coordinators dial every member by the name it advertises.
    let namespace = str_of(&etcd["metadata"]["namespace"]).to_string();
    let replicas = etcd["spec"]["replicas"].as_u64().unwrap_or(1);
    let advertised: BTreeSet<String> = (0..replicas)
        .filter_map(|i| {
            let vars = BTreeMap::from([
                ("POD_NAME".to_string(), format!("etcd-{i}")),
                ("POD_NAMESPACE".to_string(), namespace.clone()),
            ]);
            flag("advertise-client-urls").map(|u| expand(&u, &vars))
        })
        .flat_map(|urls| urls.split(',').map(String::from).collect::<Vec<_>>())
        .collect();
    if let Some(coordinator) = find_doc(docs, "Deployment", "ringleader-coordinator") {
        let (c, _) = first_container(coordinator);
        let vars = BTreeMap::from([("POD_NAMESPACE".to_string(), namespace.clone())]);
        let dialed: BTreeSet<String> = flag_value(&argv_of(c), "--etcd")
            .map(|e| expand(&e, &vars))
            .unwrap_or_default()
            .split(',')
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect();
        if dialed != advertised {
            problems.push(format!(
                "the coordinators dial etcd at {dialed:?}, but the members advertise {advertised:?}"
            ));
        }
    }
}

/// The hosts a rendering dials etcd by: the coordinators' endpoints and the
/// members' peer URLs, with `$(POD_NAME)` and `$(POD_NAMESPACE)` filled in.
fn etcd_hosts(docs: &[Value]) -> BTreeSet<String> {
    let Some(etcd) = find_doc(docs, "StatefulSet", "etcd") else {
        return BTreeSet::new();
    };
    let namespace = str_of(&etcd["metadata"]["namespace"]).to_string();
    let (c, _) = first_container(etcd);
    let argv = argv_of(c);
    let mut urls = Vec::new();
    for i in 0..etcd["spec"]["replicas"].as_u64().unwrap_or(1) {
        let vars = BTreeMap::from([
            ("POD_NAME".to_string(), format!("etcd-{i}")),
            ("POD_NAMESPACE".to_string(), namespace.clone()),
        ]);
        for f in [
            "--advertise-client-urls",
            "--initial-advertise-peer-urls",
            "--initial-cluster",
        ] {
            if let Some(value) = flag_value(&argv, f) {
                urls.extend(
                    expand(&value, &vars)
                        .split(',')
                        .map(|u| u.split_once('=').map(|(_, u)| u).unwrap_or(u).to_string()),
                );
            }
        }
    }
    if let Some(coordinator) = find_doc(docs, "Deployment", "ringleader-coordinator") {
        let (c, _) = first_container(coordinator);
        let vars = BTreeMap::from([("POD_NAMESPACE".to_string(), namespace.clone())]);
        if let Some(value) = flag_value(&argv_of(c), "--etcd") {
            urls.extend(expand(&value, &vars).split(',').map(String::from));
        }
    }
    urls.iter()
        .filter_map(|u| {
            let rest = u.split_once("://").map(|(_, r)| r)?;
            let host = rest.split(['/', ':']).next()?;
            (!host.is_empty()).then(|| host.to_ascii_lowercase())
        })
        .collect()
}

/// Whether a certificate's DNS name (possibly a `*.` wildcard, which stands
/// for exactly one label) covers `host`.
fn dns_name_covers(name: &str, host: &str) -> bool {
    let name = name.to_ascii_lowercase();
    match name.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => name == host,
    }
}

// --- NetworkPolicies --------------------------------------------------------

/// A pod that might connect: its labels, its namespace and the namespace's
/// labels.
struct Source {
    what: String,
    labels: BTreeMap<String, String>,
    namespace: String,
    namespace_labels: BTreeMap<String, String>,
}

/// Whether a label selector (matchLabels and matchExpressions) selects
/// `labels`; `{}` selects everything.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    if !is_subset(&string_map(&selector["matchLabels"]), labels) {
        return false;
    }
    seq(&selector["matchExpressions"]).iter().all(|e| {
        let key = str_of(&e["key"]);
        let values: Vec<&str> = seq(&e["values"]).iter().map(str_of).collect();
        let value = labels.get(key).map(String::as_str);
        match str_of(&e["operator"]) {
            "In" => value.is_some_and(|v| values.contains(&v)),
            "NotIn" => !value.is_some_and(|v| values.contains(&v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    })
}

fn policy_types(policy: &Value) -> Vec<String> {
    match policy["spec"]["policyTypes"].as_sequence() {
        Some(types) => types.iter().map(|t| str_of(t).to_string()).collect(),
        None => {
            let mut types = vec!["Ingress".to_string()];
            if !policy["spec"]["egress"].is_null() {
                types.push("Egress".into());
            }
            types
        }
    }
}

/// Whether the NetworkPolicies let `source` connect to TCP `port` of a pod
/// with `labels` and container `ports` in `namespace`, as the API defines
/// it: a pod no policy selects for Ingress takes everything; otherwise some
/// rule of a selecting policy must admit both the port and the source. An
/// ipBlock admits every source (it may hold pod addresses).
fn admits(
    policies: &[&Value],
    namespace: &str,
    labels: &BTreeMap<String, String>,
    ports: &[(String, u64)],
    port: u64,
    source: &Source,
) -> bool {
    let selecting: Vec<&&Value> = policies
        .iter()
        .filter(|p| {
            str_of(&p["metadata"]["namespace"]) == namespace
                && selects(&p["spec"]["podSelector"], labels)
                && policy_types(p).iter().any(|t| t == "Ingress")
        })
        .collect();
    if selecting.is_empty() {
        return true;
    }
    let port_matches = |p: &Value| {
        if !matches!(str_of(&p["protocol"]), "" | "TCP") {
            return false;
        }
        match &p["port"] {
            Value::Null => true,
            Value::String(name) => ports.iter().any(|(n, number)| n == name && *number == port),
            number => {
                let first = number.as_u64().unwrap_or(0);
                let last = p["endPort"].as_u64().unwrap_or(first);
                (first..=last).contains(&port)
            }
        }
    };
    let peer_matches = |peer: &Value| {
        if !peer["ipBlock"].is_null() {
            return true;
        }
        let pods = &peer["podSelector"];
        let namespaces = &peer["namespaceSelector"];
        match (namespaces.is_null(), pods.is_null()) {
            (true, true) => false,
            (true, false) => source.namespace == namespace && selects(pods, &source.labels),
            (false, true) => selects(namespaces, &source.namespace_labels),
            (false, false) => {
                selects(namespaces, &source.namespace_labels) && selects(pods, &source.labels)
            }
        }
    };
    selecting.iter().any(|policy| {
        seq(&policy["spec"]["ingress"]).iter().any(|rule| {
            let ports_ok =
                seq(&rule["ports"]).is_empty() || seq(&rule["ports"]).iter().any(port_matches);
            let from_ok =
                seq(&rule["from"]).is_empty() || seq(&rule["from"]).iter().any(peer_matches);
            ports_ok && from_ok
        })
    })
}

/// The labels of the namespace `name` as the API server sets them, over
/// those it is rendered with.
fn namespace_labels(docs: &[Value], name: &str) -> BTreeMap<String, String> {
    let mut labels = docs
        .iter()
        .find(|d| str_of(&d["kind"]) == "Namespace" && str_of(&d["metadata"]["name"]) == name)
        .map(|d| string_map(&d["metadata"]["labels"]))
        .unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".into(), name.to_string());
    labels
}

fn monitoring_pod_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(
        MONITORING_POD_LABEL.0.to_string(),
        MONITORING_POD_LABEL.1.to_string(),
    )])
}

fn monitoring_namespace_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "kubernetes.io/metadata.name".to_string(),
        MONITORING_NAMESPACE.to_string(),
    )])
}

/// The Prometheus annotations: our pods ask to be scraped on their
/// `metrics` port at /metrics over plain http, and every pod that asks is
/// reachable there by the monitoring pods.
fn scrape_problems(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| str_of(&d["kind"]) == "NetworkPolicy")
        .collect();
    let monitoring = Source {
        what: "the monitoring pods".into(),
        labels: monitoring_pod_labels(),
        namespace: MONITORING_NAMESPACE.into(),
        namespace_labels: monitoring_namespace_labels(),
    };
    for doc in docs {
        let Some(template) = pod_template(doc) else {
            continue;
        };
        let pod_spec = &template["spec"];
        let annotations = string_map(&template["metadata"]["annotations"]);
        let annotation = |key: &str| annotations.get(&format!("prometheus.io/{key}"));
        let ports = container_ports(pod_spec);
        let ours = containers(pod_spec).any(|c| our_binary(str_of(&c["image"])).is_some());
        if ours {
            let metrics = containers(pod_spec)
                .filter(|c| our_binary(str_of(&c["image"])).is_some())
                .flat_map(|c| seq(&c["ports"]))
                .find(|p| str_of(&p["name"]) == METRICS_PORT)
                .and_then(|p| p["containerPort"].as_u64());
            let Some(metrics) = metrics else {
                problems.push(format!(
                    "{}: our pods have no container port {METRICS_PORT:?} (ports {ports:?})",
                    id(doc)
                ));
                continue;
            };
            let wanted = [
                ("scrape", "true".to_string()),
                ("port", metrics.to_string()),
                ("path", METRICS_PATH.to_string()),
            ];
            for (key, value) in wanted {
                if annotation(key) != Some(&value) {
                    problems.push(format!(
                        "{}: pod annotation prometheus.io/{key} is {:?}, not {value:?}",
                        id(doc),
                        annotation(key)
                    ));
                }
            }
        }
        // /metrics is plain HTTP on every port of ours and etcd's.
        if let Some(scheme) = annotation("scheme").filter(|s| s.as_str() != "http") {
            problems.push(format!(
                "{}: pod annotation prometheus.io/scheme is {scheme:?}; metrics are plain http",
                id(doc)
            ));
        }
        if annotation("scrape").map(String::as_str) != Some("true") {
            continue;
        }
        let port = annotation("port").and_then(|p| p.parse::<u64>().ok());
        let Some(port) = port.filter(|p| ports.iter().any(|(_, n)| n == p)) else {
            problems.push(format!(
                "{}: prometheus.io/port {:?} is no container port {ports:?}",
                id(doc),
                annotation("port")
            ));
            continue;
        };
        let labels = string_map(&template["metadata"]["labels"]);
        let namespace = str_of(&doc["metadata"]["namespace"]);
        if !admits(&policies, namespace, &labels, &ports, port, &monitoring) {
            problems.push(format!(
                "{}: Prometheus is told to scrape port {port}, but the NetworkPolicies keep {} \
                 ({}={} in the namespace {MONITORING_NAMESPACE}) from it",
                id(doc),
                monitoring.what,
                MONITORING_POD_LABEL.0,
                MONITORING_POD_LABEL.1
            ));
        }
    }
    problems
}

/// The NetworkPolicies: a default deny, and for each port of ours exactly
/// the sources that need it (checked against our pods and against strangers
/// in and outside the namespace, labelled as clients or not).
fn network_policy_problems(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| str_of(&d["kind"]) == "NetworkPolicy")
        .collect();
    let default_deny = policies.iter().any(|p| {
        p["spec"]["podSelector"]
            .as_mapping()
            .is_some_and(|m| m.is_empty() || selects(&p["spec"]["podSelector"], &BTreeMap::new()))
            && policy_types(p).iter().any(|t| t == "Ingress")
            && seq(&p["spec"]["ingress"]).is_empty()
    });
    if !default_deny {
        problems.push(
            "no default-deny NetworkPolicy (podSelector {}, policyTypes [Ingress], no ingress \
             rules): a pod without a policy of its own would take any connection"
                .into(),
        );
    }

    let workload = |kind: &str, name: &str| {
        find_doc(docs, kind, name).map(|d| {
            let template = pod_template(d).expect("a workload");
            (
                string_map(&template["metadata"]["labels"]),
                container_ports(&template["spec"]),
                str_of(&d["metadata"]["namespace"]).to_string(),
            )
        })
    };
    let (Some(etcd), Some(coordinator), Some(worker)) = (
        workload("StatefulSet", "etcd"),
        workload("Deployment", "ringleader-coordinator"),
        workload("StatefulSet", "ringleader-worker"),
    ) else {
        problems.push("etcd, the coordinators or the workers are not rendered".into());
        return problems;
    };
    let namespace = coordinator.2.clone();
    let namespace_labels = namespace_labels(docs, &namespace);
    let client = BTreeMap::from([(CLIENT_LABEL.to_string(), "true".to_string())]);
    let prometheus = monitoring_pod_labels();
    let elsewhere = |labelled: bool| {
        let mut labels = BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            "elsewhere".to_string(),
        )]);
        if labelled {
            labels.insert(CLIENT_LABEL.into(), "true".into());
        }
        labels
    };
    let source = |what: &str, labels: &BTreeMap<String, String>, ns: &str, ns_labels| Source {
        what: what.to_string(),
        labels: labels.clone(),
        namespace: ns.to_string(),
        namespace_labels: ns_labels,
    };
    let sources = [
        source("etcd pods", &etcd.0, &namespace, namespace_labels.clone()),
        source(
            "coordinator pods",
            &coordinator.0,
            &namespace,
            namespace_labels.clone(),
        ),
        source(
            "worker pods",
            &worker.0,
            &namespace,
            namespace_labels.clone(),
        ),
        source(
            "a client pod of the namespace",
            &client,
            &namespace,
            namespace_labels.clone(),
        ),
        source(
            "an unlabelled pod of the namespace",
            &BTreeMap::new(),
            &namespace,
            namespace_labels.clone(),
        ),
        source(
            "a client pod of a client namespace",
            &client,
            "elsewhere",
            elsewhere(true),
        ),
        source(
            "an unlabelled pod of a client namespace",
            &BTreeMap::new(),
            "elsewhere",
            elsewhere(true),
        ),
        source(
            "a client pod of another namespace",
            &client,
            "elsewhere",
            elsewhere(false),
        ),
        source(
            "a monitoring pod",
            &prometheus,
            MONITORING_NAMESPACE,
            monitoring_namespace_labels(),
        ),
        source(
            "an unlabelled pod of the monitoring namespace",
            &BTreeMap::new(),
            MONITORING_NAMESPACE,
            monitoring_namespace_labels(),
        ),
        source(
            "a Prometheus pod of the namespace",
            &prometheus,
            &namespace,
            namespace_labels.clone(),
        ),
        source(
            "a Prometheus pod of another namespace",
            &prometheus,
            "elsewhere",
            elsewhere(false),
        ),
    ];
    // The API and the dashboard (which relays to the API with the
    // caller's token) take the same callers.
    let api_callers: &[&str] = &[
        "worker pods",
        "coordinator pods",
        "a client pod of the namespace",
        "a client pod of a client namespace",
    ];
    // (pods, their labels/ports, port, the sources that may connect).
    let expectations: [(&str, &_, u64, &[&str]); 8] = [
        ("etcd", &etcd, 2379, &["coordinator pods"]),
        ("etcd", &etcd, 2380, &["etcd pods"]),
        ("etcd", &etcd, 2381, &[]),
        ("ringleader-coordinator", &coordinator, 7400, api_callers),
        ("ringleader-coordinator", &coordinator, 7480, api_callers),
        (
            "ringleader-coordinator",
            &coordinator,
            7490,
            &["a monitoring pod"],
        ),
        ("ringleader-worker", &worker, 7500, &["worker pods"]),
        ("ringleader-worker", &worker, 7590, &["a monitoring pod"]),
    ];
    // Every port of our pods is fenced as expected: a new one needs its
    // line above.
    for (pods, (_, ports, _)) in [
        ("etcd", &etcd),
        ("ringleader-coordinator", &coordinator),
        ("ringleader-worker", &worker),
    ] {
        for (port_name, port) in ports {
            if !expectations
                .iter()
                .any(|(p, _, number, _)| *p == pods && number == port)
            {
                problems.push(format!(
                    "{pods} pods have container port {port} ({port_name:?}), for which \
                     tests/tests/k8s.rs expects no sources: add it to the expectations of \
                     network_policy_problems"
                ));
            }
        }
    }
    for (pods, (labels, ports, ns), port, allowed) in expectations {
        if !ports.iter().any(|(_, p)| *p == port) {
            problems.push(format!(
                "{pods} pods have no container port {port} (ports {ports:?}); the NetworkPolicy \
                 checks expect it"
            ));
        }
        for s in &sources {
            let admitted = admits(&policies, ns, labels, ports, port, s);
            let wanted = allowed.contains(&s.what.as_str());
            if admitted && !wanted {
                problems.push(format!(
                    "NetworkPolicies let {} reach {pods} port {port}; only {allowed:?} may",
                    s.what
                ));
            } else if !admitted && wanted {
                problems.push(format!(
                    "NetworkPolicies keep {} from {pods} port {port}, which they need",
                    s.what
                ));
            }
        }
    }
    problems
}

// --- Certificates: cert-manager's and `ringleader certs init`'s -------------

/// What each TLS Secret's certificate must be: the directory `ringleader
/// certs init` writes it to, the role name it carries (callers verify our
/// components by it), the extended key usages it needs, and whether it is
/// etcd's (its own CA).
struct CertNeeds {
    secret: &'static str,
    certs_init_dir: &'static str,
    role: Option<&'static str>,
    server_auth: bool,
    client_auth: bool,
    etcd: bool,
    /// Names it must carry besides its role: the coordinator's dashboard
    /// is reached at https://localhost:7480 through `kubectl port-forward`.
    local_names: &'static [&'static str],
}

const CERTS: &[CertNeeds] = &[
    CertNeeds {
        secret: "ringleader-coordinator-tls",
        certs_init_dir: "coordinator",
        role: Some("coordinator.ringleader.internal"),
        server_auth: true,
        client_auth: false,
        etcd: false,
        local_names: &["localhost", "127.0.0.1"],
    },
    // A worker serves the ring port and dials coordinators and peers.
    CertNeeds {
        secret: "ringleader-worker-tls",
        certs_init_dir: "worker",
        role: Some("worker.ringleader.internal"),
        server_auth: true,
        client_auth: true,
        etcd: false,
        local_names: &[],
    },
    CertNeeds {
        secret: "ringleader-client-tls",
        certs_init_dir: "client",
        role: Some("client.ringleader.internal"),
        server_auth: false,
        client_auth: true,
        etcd: false,
        local_names: &[],
    },
    // Serves etcd's client and peer ports, and peers (and etcd's own gRPC
    // gateway) dial with it: both usages, and every name etcd is dialed by.
    CertNeeds {
        secret: "ringleader-etcd-server-tls",
        certs_init_dir: "etcd-server",
        role: None,
        server_auth: true,
        client_auth: true,
        etcd: true,
        local_names: &[],
    },
    CertNeeds {
        secret: "ringleader-etcd-client-tls",
        certs_init_dir: "etcd-client",
        role: None,
        server_auth: false,
        client_auth: true,
        etcd: true,
        local_names: &[],
    },
];
const ROLE_NAMES: [&str; 3] = [
    "coordinator.ringleader.internal",
    "worker.ringleader.internal",
    "client.ringleader.internal",
];

/// `kubectl kustomize DIR` (relative to the repository root).
fn render_dir(dir: &str) -> Vec<Value> {
    let path = repo_root().join(dir);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `kubectl kustomize` ({e})"));
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed:\n{}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    parse(&String::from_utf8(output.stdout).expect("kustomize prints UTF-8"))
}

/// Every Secret the pods of a rendering mount.
fn mounted_secrets(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .filter_map(pod_template)
        .flat_map(|t| seq(&t["spec"]["volumes"]))
        .map(|v| str_of(&v["secret"]["secretName"]).to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A certificate as far as these checks care: its DNS names and IP
/// addresses, and whether it may serve and authenticate as a client.
struct CertFacts {
    dns_names: Vec<String>,
    server_auth: bool,
    client_auth: bool,
}

/// Checks one certificate (`what`) against its needs and the etcd names
/// the manifests dial.
fn cert_needs_problems(
    what: &str,
    needs: &CertNeeds,
    facts: &CertFacts,
    etcd_hosts: &BTreeSet<String>,
    problems: &mut Vec<String>,
) {
    if let Some(role) = needs.role {
        if !facts.dns_names.iter().any(|n| n.eq_ignore_ascii_case(role)) {
            problems.push(format!(
                "{what} does not name {role}, which callers verify it by (names: {:?})",
                facts.dns_names
            ));
        }
    }
    // A certificate of the components' CA with two roles would let, say, a
    // worker call client APIs. (Our components never trust etcd's CA, so
    // names in etcd's certificates grant nothing.)
    if !needs.etcd {
        for other in ROLE_NAMES.iter().filter(|r| Some(**r) != needs.role) {
            if facts
                .dns_names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(other))
            {
                problems.push(format!(
                    "{what} also names {other}: one role per certificate"
                ));
            }
        }
    }
    for name in needs.local_names {
        if !facts.dns_names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            problems.push(format!(
                "{what} does not name {name}, which the dashboard is reached by through \
                 `kubectl port-forward` (names: {:?})",
                facts.dns_names
            ));
        }
    }
    if needs.server_auth && !facts.server_auth {
        problems.push(format!("{what} lacks the server auth usage"));
    }
    if needs.client_auth && !facts.client_auth {
        problems.push(format!("{what} lacks the client auth usage"));
    }
    if needs.secret == "ringleader-etcd-server-tls" {
        for host in etcd_hosts {
            if !facts.dns_names.iter().any(|n| dns_name_covers(n, host)) {
                problems.push(format!(
                    "{what} does not cover {host}, which the manifests dial etcd by \
                     (names: {:?})",
                    facts.dns_names
                ));
            }
        }
    }
}

/// cert-manager's Certificate fields (cert-manager.io/v1) and usages, for a
/// strict check: kubernetes-validate has no schema for them.
const CERTIFICATE_FIELDS: &[&str] = &[
    "additionalOutputFormats",
    "commonName",
    "dnsNames",
    "duration",
    "emailAddresses",
    "encodeUsagesInRequest",
    "ipAddresses",
    "isCA",
    "issuerRef",
    "keystores",
    "literalSubject",
    "nameConstraints",
    "otherNames",
    "privateKey",
    "renewBefore",
    "renewBeforePercentage",
    "revisionHistoryLimit",
    "secretName",
    "secretTemplate",
    "signatureAlgorithm",
    "subject",
    "uris",
    "usages",
];
const CERTIFICATE_USAGES: &[&str] = &[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];
const ISSUER_FIELDS: &[&str] = &["acme", "ca", "selfSigned", "vault", "venafi"];

/// Every problem of the cert-manager example (`cm`) against the Secrets the
/// overlays (`overlays`) mount.
fn cert_manager_problems(cm: &[Value], overlays: &[Vec<Value>]) -> Vec<String> {
    let mut problems = Vec::new();
    let certificates: Vec<&Value> = cm
        .iter()
        .filter(|d| str_of(&d["kind"]) == "Certificate")
        .collect();
    let issuers: BTreeMap<&str, &Value> = cm
        .iter()
        .filter(|d| str_of(&d["kind"]) == "Issuer")
        .map(|d| (str_of(&d["metadata"]["name"]), d))
        .collect();
    for doc in cm {
        match str_of(&doc["kind"]) {
            "Secret" => problems.push(format!("k8s/cert-manager embeds {}", id(doc))),
            // Applying one after the other must not change the namespace
            // (kubectl apply drops labels the last apply had).
            "Namespace" => {
                for overlay in overlays {
                    let ours = overlay.iter().find(|d| id(d) == id(doc));
                    if ours != Some(doc) {
                        problems.push(format!(
                            "k8s/cert-manager's {} differs from the overlays' ({})",
                            id(doc),
                            serde_yaml::to_string(&ours).unwrap().trim()
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    // Strict shapes.
    for cert in &certificates {
        let spec = &cert["spec"];
        for key in spec
            .as_mapping()
            .into_iter()
            .flatten()
            .map(|(k, _)| str_of(k))
        {
            if !CERTIFICATE_FIELDS.contains(&key) {
                problems.push(format!("{}: unknown field spec.{key}", id(cert)));
            }
        }
        for usage in seq(&spec["usages"]).iter().map(str_of) {
            if !CERTIFICATE_USAGES.contains(&usage) {
                problems.push(format!("{}: unknown usage {usage:?}", id(cert)));
            }
        }
        if str_of(&spec["secretName"]).is_empty() {
            problems.push(format!("{}: no spec.secretName", id(cert)));
        }
        let issuer = str_of(&spec["issuerRef"]["name"]);
        let kind = str_of(&spec["issuerRef"]["kind"]);
        if !matches!(kind, "" | "Issuer") || !issuers.contains_key(issuer) {
            problems.push(format!(
                "{}: its issuer {kind} {issuer:?} is not an Issuer of k8s/cert-manager",
                id(cert)
            ));
        }
    }
    for (name, issuer) in &issuers {
        for key in issuer["spec"]
            .as_mapping()
            .into_iter()
            .flatten()
            .map(|(k, _)| str_of(k))
        {
            if !ISSUER_FIELDS.contains(&key) {
                problems.push(format!("Issuer/{name}: unknown field spec.{key}"));
            }
        }
        // A CA issuer signs with a CA certificate made here.
        let ca_secret = str_of(&issuer["spec"]["ca"]["secretName"]);
        if !ca_secret.is_empty()
            && !certificates.iter().any(|c| {
                str_of(&c["spec"]["secretName"]) == ca_secret
                    && c["spec"]["isCA"].as_bool() == Some(true)
            })
        {
            problems.push(format!(
                "Issuer/{name} signs with the Secret {ca_secret}, which no CA Certificate makes"
            ));
        }
    }

    // Every TLS Secret the overlays mount, as each needs it.
    let mounted: BTreeSet<String> = overlays.iter().flat_map(|d| mounted_secrets(d)).collect();
    let etcd_hosts: BTreeSet<String> = overlays.iter().flat_map(|d| etcd_hosts(d)).collect();
    for secret in mounted.iter().filter(|s| s.as_str() != ADMIN_TOKEN_SECRET) {
        let Some(needs) = CERTS.iter().find(|n| n.secret == secret) else {
            problems.push(format!(
                "the overlays mount {secret}; tests/tests/k8s.rs does not know what it must hold"
            ));
            continue;
        };
        let Some(cert) = certificates
            .iter()
            .find(|c| str_of(&c["spec"]["secretName"]) == secret)
        else {
            problems.push(format!(
                "no Certificate of k8s/cert-manager makes the Secret {secret}, which the \
                 overlays mount"
            ));
            continue;
        };
        let usages: Vec<&str> = seq(&cert["spec"]["usages"]).iter().map(str_of).collect();
        // cert-manager's default usages: digital signature, key encipherment.
        let facts = CertFacts {
            dns_names: seq(&cert["spec"]["dnsNames"])
                .iter()
                .chain(seq(&cert["spec"]["ipAddresses"]))
                .map(|n| str_of(n).to_string())
                .collect(),
            server_auth: usages.contains(&"server auth"),
            client_auth: usages.contains(&"client auth"),
        };
        cert_needs_problems(&id(cert), needs, &facts, &etcd_hosts, &mut problems);
    }
    // Two CAs: the components' and etcd's.
    let mut issued = BTreeMap::<bool, BTreeSet<String>>::new();
    for secret in mounted.iter() {
        let (Some(needs), Some(cert)) = (
            CERTS.iter().find(|n| n.secret == secret),
            certificates
                .iter()
                .find(|c| str_of(&c["spec"]["secretName"]) == secret),
        ) else {
            continue;
        };
        issued
            .entry(needs.etcd)
            .or_default()
            .insert(str_of(&cert["spec"]["issuerRef"]["name"]).to_string());
    }
    for (etcd, names) in &issued {
        let what = if *etcd { "etcd's" } else { "Ringleader's" };
        if names.len() > 1 {
            problems.push(format!(
                "{what} certificates come from several issuers {names:?}"
            ));
        }
    }
    if let (Some(ours), Some(etcd)) = (issued.get(&false), issued.get(&true)) {
        if !ours.is_disjoint(etcd) {
            problems.push(format!(
                "etcd's certificates and Ringleader's share the issuer {:?}: a component's \
                 certificate would open etcd",
                ours.intersection(etcd).collect::<Vec<_>>()
            ));
        }
    }
    problems
}

#[test]
fn cert_manager_makes_every_secret_the_pods_mount() {
    let overlays: Vec<Vec<Value>> = overlays().iter().map(|o| render(o)).collect();
    let cm = render_dir("k8s/cert-manager");
    let problems = cert_manager_problems(&cm, &overlays);
    assert!(
        problems.is_empty(),
        "k8s/cert-manager has {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn cert_manager_checks_catch_broken_certificates() {
    let overlays = vec![render("cpu")];
    let after = |edit: &dyn Fn(&mut Vec<Value>)| {
        let mut cm = render_dir("k8s/cert-manager");
        edit(&mut cm);
        cert_manager_problems(&cm, &overlays)
    };
    fn cert_mut<'a>(docs: &'a mut [Value], secret: &str) -> &'a mut Value {
        docs.iter_mut()
            .find(|d| {
                str_of(&d["kind"]) == "Certificate" && str_of(&d["spec"]["secretName"]) == secret
            })
            .unwrap_or_else(|| panic!("no Certificate makes {secret}"))
    }

    let problems = after(&|docs| {
        let cert = cert_mut(docs, "ringleader-worker-tls");
        cert["spec"]["dnsNames"] = Value::from(vec![Value::from("worker.example.com")]);
    });
    assert_reported(
        "a worker certificate without its role",
        &problems,
        "does not name worker.ringleader.internal",
    );

    let problems = after(&|docs| {
        let cert = cert_mut(docs, "ringleader-client-tls");
        let names = cert["spec"]["dnsNames"].as_sequence_mut().unwrap();
        names.push(Value::from("coordinator.ringleader.internal"));
    });
    assert_reported(
        "a client certificate with two roles",
        &problems,
        "also names coordinator.ringleader.internal",
    );

    let problems = after(&|docs| {
        let cert = cert_mut(docs, "ringleader-coordinator-tls");
        cert["spec"].as_mapping_mut().unwrap().remove("ipAddresses");
    });
    assert_reported(
        "a coordinator certificate the port-forwarded dashboard fails",
        &problems,
        "does not name 127.0.0.1, which the dashboard is reached by",
    );

    let problems = after(&|docs| {
        let cert = cert_mut(docs, "ringleader-etcd-server-tls");
        cert["spec"]["usages"] = Value::from(vec![Value::from("server auth")]);
    });
    assert_reported(
        "an etcd server certificate peers cannot dial with",
        &problems,
        "lacks the client auth usage",
    );

    let problems = after(&|docs| {
        let cert = cert_mut(docs, "ringleader-etcd-server-tls");
        cert["spec"]["dnsNames"] = Value::from(vec![Value::from("*.etcd")]);
    });
    assert_reported(
        "an etcd certificate for other names",
        &problems,
        "does not cover etcd-0.etcd.ringleader.svc.cluster.local",
    );

    let problems = after(&|docs| {
        docs.retain(|d| str_of(&d["spec"]["secretName"]) != "ringleader-etcd-client-tls");
    });
    assert_reported(
        "a Secret cert-manager does not make",
        &problems,
        "no Certificate of k8s/cert-manager makes the Secret ringleader-etcd-client-tls",
    );

    let problems = after(&|docs| {
        let cert = cert_mut(docs, "ringleader-etcd-client-tls");
        cert["spec"]["issuerRef"]["name"] = Value::from("ringleader-ca");
    });
    assert_reported(
        "etcd's client certificate from Ringleader's CA",
        &problems,
        "share the issuer",
    );

    let problems = after(&|docs| {
        let cert = cert_mut(docs, "ringleader-coordinator-tls");
        let spec = cert["spec"].as_mapping_mut().unwrap();
        let names = spec.remove("dnsNames").unwrap();
        spec.insert(Value::from("dnsName"), names);
    });
    assert_reported("a misspelt field", &problems, "unknown field spec.dnsName");

    let problems = after(&|docs| {
        let cert = cert_mut(docs, "ringleader-client-tls");
        cert["spec"]["usages"] = Value::from(vec![Value::from("client-auth")]);
    });
    assert_reported(
        "a misspelt usage",
        &problems,
        "unknown usage \"client-auth\"",
    );

    let problems = after(&|docs| {
        let namespace = docs
            .iter_mut()
            .find(|d| str_of(&d["kind"]) == "Namespace")
            .expect("a Namespace");
        namespace["metadata"]
            .as_mapping_mut()
            .unwrap()
            .remove("labels");
    });
    assert_reported(
        "a namespace that would lose its labels",
        &problems,
        "k8s/cert-manager's Namespace/ringleader differs",
    );
}

/// DNS and IP names and extended key usages of a PEM certificate, read
/// with `openssl x509`.
fn openssl_facts(cert: &Path) -> CertFacts {
    let output = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-ext",
            "subjectAltName,extendedKeyUsage",
            "-in",
        ])
        .arg(cert)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): this check reads certificates with `openssl x509`")
        });
    assert!(
        output.status.success(),
        "openssl x509 {}: {}",
        cert.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let dns_names = text
        .split([',', '\n'])
        .map(str::trim)
        .filter_map(|n| {
            n.strip_prefix("DNS:")
                .or_else(|| n.strip_prefix("IP Address:"))
                .map(String::from)
        })
        .collect();
    CertFacts {
        dns_names,
        server_auth: text.contains("TLS Web Server Authentication"),
        client_auth: text.contains("TLS Web Client Authentication"),
    }
}

/// The guide that tells users how to make the Secrets.
const GUIDE: &str = "docs/KUBERNETES.md";

/// The arguments after `ringleader certs init` of the command the guide
/// gives (continuation lines joined, quotes dropped), and the `kubectl
/// create secret` lines it gives.
fn documented_secret_commands() -> (Vec<String>, Vec<String>) {
    let path = repo_root().join(GUIDE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        match line.trim_end().strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    let init = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("ringleader certs init "))
        .unwrap_or_else(|| panic!("{GUIDE} gives no `ringleader certs init` command"))
        .split('#')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|w| w.trim_matches(|c| c == '\'' || c == '"').to_string())
        .collect();
    let creates = lines
        .into_iter()
        .filter(|l| l.contains("create secret generic "))
        .collect();
    (init, creates)
}

#[test]
fn certs_init_makes_every_secret_the_pods_mount() {
    let overlays: Vec<Vec<Value>> = overlays().iter().map(|o| render(o)).collect();
    let mounted: BTreeSet<String> = overlays.iter().flat_map(|d| mounted_secrets(d)).collect();
    let etcd_hosts: BTreeSet<String> = overlays.iter().flat_map(|d| etcd_hosts(d)).collect();

    // The command of the guide, into a temp dir.
    let (init, creates) = documented_secret_commands();
    let dir = tempfile::tempdir().expect("a temp dir");
    let out = dir.path().join("certs");
    let mut argv = vec!["certs".to_string(), "init".to_string()];
    let mut documented_dir = None;
    let mut words = init.iter();
    while let Some(word) = words.next() {
        if word == "--dir" {
            documented_dir = words.next().cloned();
        } else if let Some(d) = word.strip_prefix("--dir=") {
            documented_dir = Some(d.to_string());
        } else {
            argv.push(word.clone());
        }
    }
    let documented_dir = documented_dir
        .unwrap_or_else(|| panic!("the `ringleader certs init` of {GUIDE} names no --dir"));
    argv.push("--dir".into());
    argv.push(out.to_string_lossy().into_owned());
    let output = command("ringleader")
        .args(&argv)
        .stdin(Stdio::null())
        .output()
        .expect("run `ringleader certs init`");
    assert!(
        output.status.success(),
        "`ringleader {}` (as {GUIDE} gives it) failed: {}{}",
        argv.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let mut problems = Vec::new();
    // The guide turns each directory into the Secret that mounts it.
    for secret in &mounted {
        let source = match CERTS.iter().find(|n| n.secret == secret) {
            Some(needs) => format!("--from-file={documented_dir}/{}", needs.certs_init_dir),
            None => format!("--from-file={ADMIN_TOKEN_KEY}={documented_dir}/admin.token"),
        };
        let made = creates.iter().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words
                .windows(3)
                .any(|w| w == ["secret", "generic", secret.as_str()])
                && words.iter().any(|w| w.trim_end_matches('/') == source)
        });
        if !made {
            problems.push(format!(
                "{GUIDE} does not create the Secret {secret} with {source} (`kubectl create \
                 secret generic {secret} … {source}`)"
            ));
        }
    }
    for secret in &mounted {
        if secret == ADMIN_TOKEN_SECRET {
            let token = out.join("admin.token");
            match std::fs::read_to_string(&token) {
                Ok(text) if !text.trim().is_empty() => {}
                _ => problems.push(format!(
                    "certs init wrote no {} for the Secret {secret}",
                    token.display()
                )),
            }
            continue;
        }
        let Some(needs) = CERTS.iter().find(|n| n.secret == secret) else {
            problems.push(format!(
                "the overlays mount {secret}, which certs init does not make"
            ));
            continue;
        };
        // `kubectl create secret generic SECRET --from-file=DIR/<dir>`.
        let sub = out.join(needs.certs_init_dir);
        let missing: Vec<&str> = TLS_FILES
            .iter()
            .copied()
            .filter(|f| !sub.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "certs init's {} lacks {missing:?} for the Secret {secret}",
                sub.display()
            ));
            continue;
        }
        let verify = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(sub.join("ca.crt"))
            .arg(sub.join("tls.crt"))
            .output()
            .expect("run openssl verify");
        if !verify.status.success() {
            problems.push(format!(
                "{}/tls.crt is not signed by its ca.crt: {}",
                sub.display(),
                String::from_utf8_lossy(&verify.stdout).trim()
            ));
        }
        let what = format!("certs init's {}/tls.crt ({secret})", needs.certs_init_dir);
        cert_needs_problems(
            &what,
            needs,
            &openssl_facts(&sub.join("tls.crt")),
            &etcd_hosts,
            &mut problems,
        );
    }
    // etcd's CA is not the components' CA.
    let ca = |d: &str| std::fs::read(out.join(d).join("ca.crt")).unwrap_or_default();
    if ca("etcd-server") == ca("coordinator") {
        problems.push("certs init signs etcd's certificates with the components' CA".into());
    }
    assert!(
        problems.is_empty(),
        "`ringleader certs init` does not make what the manifests mount ({} problem(s)):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}
