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
//! * gRPC probes point at a container port;
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
//! `checks_catch_broken_manifests` and `spec_checks_catch_broken_specs_and_mounts`
//! break a rendering in several ways and make sure each break is reported.

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
/// Documents that tell users to run `/etc/ringleader/specs/FILE`.
const DOCS: &[&str] = &["docs/KUBERNETES.md", "README.md"];

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
                    if let Some(port) = c[probe]["grpc"]["port"].as_u64() {
                        if !ports.iter().any(|(_, p)| *p == port) {
                            problems.push(format!(
                                "{name}: {probe} gRPC port {port} is no container port {ports:?}"
                            ));
                        }
                    }
                }
                self.check_command_line(&name, c, &config_maps, &mut problems);
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

        // The container's environment: env (values; fieldRefs get stand-ins)
        // and the ConfigMaps of envFrom.
        let mut env = BTreeMap::new();
        for var in seq(&c["env"]) {
            let key = str_of(&var["name"]).to_string();
            let value = match (
                &var["value"],
                str_of(&var["valueFrom"]["fieldRef"]["fieldPath"]),
            ) {
                (Value::String(v), _) => v.clone(),
                (_, "status.podIP") => "127.0.0.1".to_string(),
                (_, "metadata.name") => "pod-0".to_string(),
                _ => "x".to_string(),
            };
            env.insert(key, value);
        }
        let mut from_config_maps = Vec::new();
        for source in seq(&c["envFrom"]) {
            let map = str_of(&source["configMapRef"]["name"]);
            if map.is_empty() {
                continue;
            }
            match config_maps.get(map) {
                Some(doc) => {
                    for (k, v) in string_map(&doc["data"]) {
                        from_config_maps.push(k.clone());
                        env.entry(k).or_insert(v);
                    }
                }
                None => problems.push(format!("{name}: envFrom ConfigMap {map} is not rendered")),
            }
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
        c["readinessProbe"]["grpc"]["port"] = Value::from(7500);
    });
    assert_reported("a probe on the wrong port", &problems, "gRPC port 7500");

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
