//! The deployment files, checked with nothing but Rust: every client config
//! in deploy/clients is either read by an end-to-end test or parsed here;
//! the dashboard and alert rules name only metrics hoard exports; the
//! Kubernetes ConfigMaps' hoard.toml are valid configs; the Dockerfile and
//! the systemd unit have what the issue asks; the replicated deployments
//! (issue 13: deploy/kubernetes/replicated, the compose file with three
//! replicas, Garage and nginx) give each replica a valid cluster config and
//! wire the objects to each other. scripts/check-deploy.sh runs the
//! format-aware tools (hadolint, promtool, docker-compose,
//! kubernetes-validate, systemd-analyze, nginx -t) on the same files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use yaml_rust2::parser::Parser;
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::Event;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Client configs no engine here can run: they are parsed instead.
const NOT_RUN_HERE: &[(&str, &str)] = &[
    ("k3s/registries.yaml", "k3s is not installable from Debian"),
    (
        "buildkit/buildkitd.toml",
        "buildkitd is not packaged in Debian 12",
    ),
    ("ci/github-actions.yml", "needs a GitHub runner"),
    ("ci/gitlab-runner.toml", "needs a GitLab runner"),
];

#[test]
fn every_client_config_is_used_by_an_end_to_end_test_or_parsed() {
    let clients = root().join("deploy/clients");
    let mut e2e_sources = String::new();
    for file in files_under(&root().join("tests")) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("e2e_") && name.ends_with(".rs") {
            e2e_sources.push_str(&std::fs::read_to_string(&file).unwrap());
        }
    }
    for file in files_under(&clients) {
        let relative = file
            .strip_prefix(&clients)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if relative == "README.md" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // The workflow points at the buildkitd.toml, which holds the address.
        assert!(
            text.contains("mirror.example:5000") || text.contains("buildkitd.toml"),
            "{relative} lacks the mirror.example:5000 placeholder the tests substitute"
        );
        // Used directly, or through its folder (client_config_dir).
        let used = relative
            .match_indices('/')
            .map(|(i, _)| &relative[..i])
            .chain([relative.as_str()])
            .any(|prefix| e2e_sources.contains(&format!("\"{prefix}\"")));
        if used {
            continue;
        }
        assert!(
            NOT_RUN_HERE.iter().any(|(f, _)| *f == relative),
            "{relative} is neither used by an end-to-end test nor listed as not runnable here"
        );
        if relative.ends_with(".toml") {
            toml::from_str::<toml::Value>(&text).unwrap_or_else(|e| panic!("{relative}: {e}"));
        }
    }
}

/// The metric names hoard declares (all in src/metrics.rs; histograms with
/// their series suffixes), checked against what it renders.
fn exported_metrics() -> BTreeSet<String> {
    let declared = metrics_named(&read("src/metrics.rs"));
    let rendered = hoard::metrics::Metrics::new().render();
    let mut names = BTreeSet::new();
    for name in declared {
        if rendered.contains(&format!("# TYPE {name} histogram")) || name.ends_with("_seconds") {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name);
    }
    names
}

fn metrics_named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("hoard_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.insert(text[start..end].to_owned());
        i = end;
    }
    out
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics() {
    let exported = exported_metrics();
    assert!(
        exported.contains("hoard_cache_requests_total"),
        "{exported:?}"
    );
    let dashboard = read("deploy/grafana/hoard-dashboard.json");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(parsed["panels"].as_array().unwrap().len() >= 8);
    for (file, text) in [
        ("dashboard", dashboard.clone()),
        ("alerts", read("deploy/prometheus/alerts.yml")),
    ] {
        let named = metrics_named(&text);
        assert!(!named.is_empty());
        for metric in named {
            assert!(
                exported.contains(&metric),
                "{file} uses {metric}, which hoard does not export"
            );
        }
    }
    // What the issue asks the dashboard to show.
    for needed in [
        "hoard_cache_requests_total",
        "hoard_served_bytes_total",
        "hoard_upstream_ratelimit_remaining",
        "hoard_upstream_requests_total",
        "hoard_store_bytes",
        "hoard_store_max_bytes",
        "hoard_evicted_blobs_total",
        "hoard_http_request_duration_seconds_bucket",
    ] {
        assert!(dashboard.contains(needed), "the dashboard lacks {needed}");
    }
}

#[test]
fn the_kubernetes_configmap_holds_a_valid_config() {
    let config = load_config(
        Some(&configmap_toml("deploy/kubernetes/configmap.yaml")),
        &BTreeMap::new(),
    )
    .unwrap_or_else(|e| panic!("deploy/kubernetes/configmap.yaml: {e}"));
    assert_eq!(config.listen.port(), 5000);
    // The StatefulSet mounts what the config points at.
    let statefulset = read("deploy/kubernetes/statefulset.yaml");
    for needed in [
        "/var/lib/hoard",
        "/etc/hoard/secrets",
        "/healthz",
        "containerPort: 5000",
        "runAsNonRoot: true",
    ] {
        assert!(statefulset.contains(needed), "statefulset lacks {needed}");
    }
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
    for line in kustomization.lines() {
        if let Some(file) = line
            .trim()
            .strip_prefix("- ")
            .filter(|f| f.ends_with(".yaml"))
        {
            assert!(
                root().join("deploy/kubernetes").join(file).exists(),
                "{file} missing"
            );
        }
    }
}

#[test]
fn dockerfile_and_systemd_unit_have_what_production_needs() {
    let dockerfile = read("Dockerfile");
    for needed in [
        " AS build",
        "cargo build --release --locked",
        "USER 65532:65532",
        "EXPOSE 5000",
        "VOLUME [\"/var/lib/hoard\"]",
        "HEALTHCHECK",
        "org.opencontainers.image.source",
        "ARG HOARD_GIT_COMMIT",
    ] {
        assert!(dockerfile.contains(needed), "Dockerfile lacks {needed}");
    }
    // Dependencies are built before the sources are copied.
    let deps = dockerfile.find("cargo build").unwrap();
    assert!(deps < dockerfile.find("COPY src src").unwrap());
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l == "*") && ignore.contains("!src/"));

    let unit = read("deploy/systemd/hoard.service");
    for needed in [
        "Type=notify",
        "DynamicUser=yes",
        "StateDirectory=hoard",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecReload=",
    ] {
        assert!(unit.contains(needed), "hoard.service lacks {needed}");
    }
}

/// `hoard.toml` loaded as `hoard serve` loads it: from `toml` (as the file
/// given to --config, if any) under the `HOARD_*` variables of `env`. The
/// Secret the Kubernetes configs name is a temp file here.
fn load_config(
    toml: Option<&str>,
    env: &BTreeMap<String, String>,
) -> Result<hoard::config::Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut args = hoard::config::ServeArgs::default();
    if let Some(toml) = toml {
        let secret = dir.path().join("dockerhub-password");
        std::fs::write(&secret, "x\n").unwrap();
        let toml = toml.replace(
            "/etc/hoard/secrets/dockerhub-password",
            secret.to_str().unwrap(),
        );
        let path = dir.path().join("hoard.toml");
        std::fs::write(&path, toml).unwrap();
        args.config = Some(path);
    }
    hoard::config::Config::load(&args, env.clone()).map_err(|e| e.to_string())
}

/// The `hoard.toml` key of the ConfigMap in `relative`.
fn configmap_toml(relative: &str) -> String {
    let configmap = only_document(relative);
    assert_eq!(configmap["kind"], "ConfigMap", "{relative}");
    configmap["data"]["hoard.toml"]
        .as_str()
        .unwrap_or_else(|| panic!("{relative} has no hoard.toml key"))
        .to_owned()
}

/// The one YAML document of `relative`, parsed by yaml-rust2, as serde_json
/// values under YAML's failsafe schema, as the checks compare them: every
/// scalar is its text as written (a quoted "5000" and a plain 5000 alike;
/// `0400` stays `0400`), only a plain empty, `~` or `null` being null.
/// Aliases are expanded; a key given twice, a key that is not text, and a
/// merge key (`<<`, not expanded here) are refused.
fn only_document(relative: &str) -> Value {
    let text = read(relative);
    let mut file = YamlFile {
        name: relative,
        parser: Parser::new_from_str(&text),
        anchors: BTreeMap::new(),
    };
    let mut documents = Vec::new();
    loop {
        match file.next() {
            (Event::StreamStart | Event::DocumentEnd, _) => {}
            (Event::DocumentStart, _) => documents.push(file.node()),
            (Event::StreamEnd, _) => break,
            (event, mark) => file.fail(mark, &format!("unexpected {event:?}")),
        }
    }
    assert_eq!(documents.len(), 1, "{relative}: one document expected");
    documents.pop().unwrap()
}

/// yaml-rust2's events for one file, made into serde_json values (its own
/// `Yaml` resolves plain scalars by the core schema: `0400` would be 400).
struct YamlFile<'a> {
    name: &'a str,
    parser: Parser<std::str::Chars<'a>>,
    anchors: BTreeMap<usize, Value>,
}

impl YamlFile<'_> {
    fn next(&mut self) -> (Event, Marker) {
        let name = self.name;
        self.parser
            .next_token()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Whether the next event is `end` (consumed if so), and where it is.
    fn at(&mut self, end: &Event) -> (bool, Marker) {
        let name = self.name;
        let (event, mark) = self.parser.peek().unwrap_or_else(|e| panic!("{name}: {e}"));
        let (found, mark) = (event == end, *mark);
        if found {
            self.next();
        }
        (found, mark)
    }

    fn fail(&self, mark: Marker, message: &str) -> ! {
        panic!("{}:{}: {message}", self.name, mark.line())
    }

    fn node(&mut self) -> Value {
        let (event, mark) = self.next();
        let (value, anchor) = match event {
            Event::Scalar(text, style, anchor, _) => {
                let null = style == TScalarStyle::Plain
                    && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL");
                let value = if null {
                    Value::Null
                } else {
                    Value::String(text)
                };
                (value, anchor)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                while !self.at(&Event::SequenceEnd).0 {
                    items.push(self.node());
                }
                (Value::Array(items), anchor)
            }
            Event::MappingStart(anchor, _) => {
                let mut map = serde_json::Map::new();
                loop {
                    let (end, mark) = self.at(&Event::MappingEnd);
                    if end {
                        break;
                    }
                    let key = match self.node() {
                        Value::String(key) if key != "<<" => key,
                        key => self.fail(mark, &format!("the key {key} is not read here")),
                    };
                    let value = self.node();
                    if map.insert(key.clone(), value).is_some() {
                        self.fail(mark, &format!("{key} given twice"));
                    }
                }
                (Value::Object(map), anchor)
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(value) => return value.clone(),
                None => self.fail(mark, "an alias to no anchor"),
            },
            other => self.fail(mark, &format!("unexpected {other:?}")),
        };
        if anchor > 0 {
            self.anchors.insert(anchor, value.clone());
        }
        value
    }
}

const REPLICATED: &str = "deploy/kubernetes/replicated";

/// The replicated set: each file but the kustomization, parsed.
struct Replicated {
    kustomization: Value,
    objects: Vec<(String, Value)>,
}

impl Replicated {
    fn load() -> Replicated {
        let mut kustomization = None;
        let mut objects = Vec::new();
        for file in files_under(&root().join(REPLICATED)) {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.ends_with(".yaml"), "{REPLICATED}/{name}: not .yaml");
            let document = only_document(&format!("{REPLICATED}/{name}"));
            if name == "kustomization.yaml" {
                kustomization = Some(document);
            } else {
                objects.push((name, document));
            }
        }
        Replicated {
            kustomization: kustomization.expect("a kustomization.yaml"),
            objects,
        }
    }

    /// The one object of `kind`.
    fn one(&self, kind: &str) -> &Value {
        let found = self.of_kind(kind);
        assert_eq!(found.len(), 1, "one {kind} expected in {REPLICATED}");
        found[0]
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .map(|(_, o)| o)
            .filter(|o| o["kind"] == kind)
            .collect()
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.of_kind(kind)
            .into_iter()
            .find(|o| o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {REPLICATED}"))
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment")
    }

    fn pod_labels(&self) -> &serde_json::Map<String, Value> {
        self.deployment()["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .expect("pod labels")
    }

    fn container(&self) -> &Value {
        let containers = self.deployment()["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers");
        assert_eq!(containers.len(), 1);
        &containers[0]
    }

    /// The Service whose clusterIP is None (`headless`) or not.
    fn service(&self, headless: bool) -> &Value {
        let found: Vec<_> = self
            .of_kind("Service")
            .into_iter()
            .filter(|s| (s["spec"]["clusterIP"] == "None") == headless)
            .collect();
        assert_eq!(found.len(), 1, "one Service with headless = {headless}");
        found[0]
    }

    fn namespace(&self) -> &str {
        self.kustomization["namespace"]
            .as_str()
            .expect("a namespace")
    }

    /// The container's environment as the kubelet builds it, the pod IP
    /// being `pod_ip`: `$(VAR)` expands a variable listed earlier, and is
    /// left as written otherwise (as Kubernetes does). Secret values are
    /// `secret:<name>/<key>`.
    fn environment(&self, pod_ip: &str) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for var in self.container()["env"].as_array().expect("env") {
            let name = var["name"].as_str().expect("a name").to_owned();
            let value = if let Some(value) = var["value"].as_str() {
                let mut value = value.to_owned();
                for (earlier, its) in &env {
                    value = value.replace(&format!("$({earlier})"), its);
                }
                value
            } else {
                let from = &var["valueFrom"];
                match (
                    from["fieldRef"]["fieldPath"].as_str(),
                    &from["secretKeyRef"],
                ) {
                    (Some("status.podIP"), _) => pod_ip.to_owned(),
                    (Some("metadata.namespace"), _) => self.namespace().to_owned(),
                    (None, secret) if secret.is_object() => {
                        format!(
                            "secret:{}/{}",
                            secret["name"].as_str().unwrap(),
                            secret["key"].as_str().unwrap()
                        )
                    }
                    _ => panic!("{name}: an unexpected valueFrom {from}"),
                }
            };
            env.insert(name, value);
        }
        env
    }
}

/// Whether `selector` (matchLabels, or a Service's plain map) selects what
/// has `labels`.
fn selects(selector: &Value, labels: &serde_json::Map<String, Value>) -> bool {
    let selector = selector.get("matchLabels").unwrap_or(selector);
    let selector = selector.as_object().expect("a label selector");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn labels(object: &Value) -> &serde_json::Map<String, Value> {
    object["metadata"]["labels"].as_object().expect("labels")
}

fn number(value: &Value) -> u64 {
    value
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{value} is not a number"))
}

/// A Kubernetes quantity in binary units ("20Gi"), in bytes.
fn quantity(value: &Value) -> u64 {
    let text = value.as_str().expect("a quantity");
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap();
    let unit: u64 = match &text[split..] {
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => panic!("{text}: unit {other} not handled here"),
    };
    text[..split].parse::<u64>().unwrap() * unit
}

#[test]
fn issue_13_every_replicated_manifest_parses_and_is_in_the_kustomization() {
    let set = Replicated::load();
    assert_eq!(set.kustomization["kind"], "Kustomization");
    for (file, object) in &set.objects {
        for field in [
            &object["apiVersion"],
            &object["kind"],
            &object["metadata"]["name"],
        ] {
            assert!(field.as_str().is_some_and(|f| !f.is_empty()), "{file}");
        }
    }
    let listed: BTreeSet<&str> = set.kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let present: BTreeSet<&str> = set.objects.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(listed, present, "kustomization.yaml resources vs the files");
    assert_eq!(set.one("Namespace")["metadata"]["name"], set.namespace());
}

#[test]
fn issue_13_the_replicated_configmap_and_deployment_make_a_valid_replica() {
    let set = Replicated::load();
    let toml = configmap_toml(&format!("{REPLICATED}/configmap.yaml"));
    let env = set.environment("10.1.2.3");
    let config = load_config(Some(&toml), &env).unwrap_or_else(|e| panic!("{e}"));
    // The shared tier, with keys from the AWS chain (the Secret's variables).
    let s3 = config.store.s3.as_ref().expect("a [store.s3] bucket");
    assert_eq!(s3.credentials, hoard::config::S3Credentials::Chain);
    for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        let from = env.get(key).unwrap_or_else(|| panic!("{key} not set"));
        let (secret, secret_key) = from
            .strip_prefix("secret:")
            .and_then(|f| f.split_once('/'))
            .unwrap_or_else(|| panic!("{key} is not from a Secret"));
        let secret = set.named("Secret", secret);
        assert!(
            secret["stringData"][secret_key].is_string(),
            "{key}: the Secret lacks {secret_key}"
        );
    }
    // The peers: the headless Service's name in the pod's namespace, and
    // this pod's IP as the others reach it.
    let cluster = config.cluster.as_ref().expect("a [cluster]");
    assert_eq!(cluster.advertise.as_str(), "http://10.1.2.3:5000/");
    let headless = set.service(true);
    let peer_port = number(&headless["spec"]["ports"][0]["port"]);
    assert_eq!(
        cluster.peers,
        hoard::config::Peers::Dns {
            name: format!(
                "{}.{}.svc.cluster.local",
                headless["metadata"]["name"].as_str().unwrap(),
                set.namespace()
            ),
            port: peer_port as u16,
        }
    );
    assert_eq!(u64::from(config.listen.port()), peer_port);
    let container = set.container();
    assert_eq!(
        container["ports"][0]["containerPort"],
        config.listen.port().to_string()
    );
    // The hot tier: the emptyDir mounted at data_dir, bigger than what the
    // store may keep (past its sizeLimit the kubelet evicts the pod).
    let pod = &set.deployment()["spec"]["template"]["spec"];
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == config.store.data_dir.to_str().unwrap())
        .expect("a volume at data_dir");
    let volumes = pod["volumes"].as_array().expect("volumes");
    let data = volumes
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the data volume");
    let max_bytes = config.store.max_bytes.expect("store.max_size set");
    assert!(max_bytes < quantity(&data["emptyDir"]["sizeLimit"]));
    assert!(max_bytes < quantity(&container["resources"]["requests"]["ephemeral-storage"]));
    // What the other volumes name exists.
    for volume in volumes {
        if let Some(name) = volume["configMap"]["name"].as_str() {
            set.named("ConfigMap", name);
        }
        if let Some(name) = volume["secret"]["secretName"].as_str() {
            set.named("Secret", name);
        }
    }
    // Shutdown fits in the grace period, after the preStop pause.
    let pause = number(&container["lifecycle"]["preStop"]["sleep"]["seconds"]);
    assert!(
        pause + config.shutdown_timeout.as_secs() < number(&pod["terminationGracePeriodSeconds"])
    );
    // As the single replica: non-root, read-only, probed on /healthz.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], "true");
    assert_eq!(pod["securityContext"]["runAsUser"], "65532");
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"],
        "true"
    );
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        "false"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(
            container[probe]["httpGet"]["port"],
            container["ports"][0]["name"]
        );
    }
}

#[test]
fn issue_13_the_replicated_services_select_the_pods_and_only_ready_ones_are_peers() {
    let set = Replicated::load();
    let pods = set.pod_labels();
    let deployment = set.deployment();
    assert!(selects(&deployment["spec"]["selector"], pods));
    let headless = set.service(true);
    let client = set.service(false);
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], "false");
    for service in [headless, client] {
        let name = &service["metadata"]["name"];
        assert!(selects(&service["spec"]["selector"], pods), "{name}");
        assert_eq!(service["spec"]["ports"][0]["port"], "5000", "{name}");
        assert_eq!(
            service["spec"]["ports"][0]["targetPort"],
            set.container()["ports"][0]["name"],
            "{name}"
        );
    }
    // As written, before the kubelet expands it.
    let env: BTreeMap<_, _> = set.container()["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), &v["value"]))
        .collect();
    let dns = env["HOARD_PEERS_DNS"].as_str().expect("HOARD_PEERS_DNS");
    let headless_name = headless["metadata"]["name"].as_str().unwrap();
    assert!(dns.starts_with(&format!("{headless_name}.")), "{dns}");
    assert!(dns.ends_with(":5000"), "{dns}");
    assert_eq!(env["HOARD_ADVERTISE"], "http://$(POD_IP):5000");
    // One scrape per replica: the ServiceMonitor takes the client Service,
    // not the headless one over the same pods.
    let monitor = set.one("ServiceMonitor");
    assert!(selects(&monitor["spec"]["selector"], labels(client)));
    assert!(!selects(&monitor["spec"]["selector"], labels(headless)));
    // The replicas may reach each other's port 5000.
    let policy = set.one("NetworkPolicy");
    assert!(selects(&policy["spec"]["podSelector"], pods));
    let to_peers = policy["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .any(|rule| {
            rule["to"]
                .as_array()
                .is_some_and(|to| to.iter().any(|peer| selects(&peer["podSelector"], pods)))
                && rule["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"] == "5000")
        });
    assert!(
        to_peers,
        "networkpolicy.yaml: no egress to the other replicas"
    );
    let from_anyone = policy["spec"]["ingress"][0]["ports"].as_array().unwrap();
    assert!(from_anyone.iter().any(|p| p["port"] == "5000"));
}

#[test]
fn issue_13_the_replicated_pods_are_spread_budgeted_and_autoscaled() {
    let set = Replicated::load();
    let pods = set.pod_labels();
    let deployment = set.deployment();
    let hpa = set.one("HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(target["kind"], deployment["kind"]);
    assert_eq!(target["name"], deployment["metadata"]["name"]);
    assert_eq!(target["apiVersion"], deployment["apiVersion"]);
    let min = number(&hpa["spec"]["minReplicas"]);
    assert!(min >= 3);
    assert!(number(&hpa["spec"]["maxReplicas"]) > min);
    let cpu = hpa["spec"]["metrics"].as_array().unwrap().iter().any(|m| {
        m["type"] == "Resource"
            && m["resource"]["name"] == "cpu"
            && m["resource"]["target"]["type"] == "Utilization"
    });
    assert!(cpu, "the HPA scales on CPU");
    // Utilization is a share of the request, which must be there.
    assert!(set.container()["resources"]["requests"]["cpu"].is_string());
    // The HPA owns the count: a count in the manifest would reset it on
    // every apply.
    assert!(deployment["spec"]["replicas"].is_null());
    // Drains may take a replica, never all of them.
    let pdb = set.one("PodDisruptionBudget");
    assert!(selects(&pdb["spec"]["selector"], pods));
    let allowed = match (&pdb["spec"]["maxUnavailable"], &pdb["spec"]["minAvailable"]) {
        (Value::String(max), Value::Null) => max.parse::<u64>().unwrap(),
        (Value::Null, Value::String(min_available)) => {
            min - min_available.parse::<u64>().unwrap().min(min)
        }
        other => panic!("pdb.yaml: {other:?}"),
    };
    assert!((1..min).contains(&allowed), "{allowed} of {min} may go");
    // Spread over nodes, preferred.
    let affinity = &deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    let terms = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .expect("preferred pod anti-affinity");
    assert!(terms.iter().any(|t| {
        let term = &t["podAffinityTerm"];
        term["topologyKey"] == "kubernetes.io/hostname" && selects(&term["labelSelector"], pods)
    }));
    assert!(affinity["requiredDuringSchedulingIgnoredDuringExecution"].is_null());
}

const COMPOSE: &str = "deploy/compose/docker-compose.replicated.yml";

/// The compose file's hoard services: name -> environment.
fn compose_replicas(compose: &Value) -> BTreeMap<String, BTreeMap<String, String>> {
    compose["services"]
        .as_object()
        .expect("services")
        .iter()
        .filter(|(name, _)| name.starts_with("hoard"))
        .map(|(name, service)| {
            let env = service["environment"]
                .as_object()
                .unwrap_or_else(|| panic!("{name}: environment as a map"))
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            (name.clone(), env)
        })
        .collect()
}

#[test]
fn issue_13_the_compose_replicas_list_each_other_and_share_one_bucket() {
    let compose = only_document(COMPOSE);
    let replicas = compose_replicas(&compose);
    assert_eq!(replicas.len(), 3, "{:?}", replicas.keys());
    let advertised: BTreeSet<String> = replicas
        .iter()
        .map(|(name, env)| {
            assert_eq!(env["HOARD_ADVERTISE"], format!("http://{name}:5000"));
            env["HOARD_ADVERTISE"].clone()
        })
        .collect();
    let first = replicas.values().next().unwrap();
    let mut volumes = BTreeSet::new();
    for (name, env) in &replicas {
        let peers: BTreeSet<String> = env["HOARD_PEERS"].split(',').map(str::to_owned).collect();
        assert_eq!(peers, advertised, "{name}: HOARD_PEERS");
        for shared in [
            "HOARD_S3_ENDPOINT",
            "HOARD_S3_BUCKET",
            "HOARD_S3_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "HOARD_MAX_SIZE",
        ] {
            assert!(env.contains_key(shared), "{name} lacks {shared}");
            assert_eq!(env[shared], first[shared], "{name}: {shared}");
        }
        // What hoard makes of it.
        let config = load_config(None, env).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cluster = config.cluster.expect("a cluster");
        assert_eq!(
            cluster.advertise.as_str(),
            format!("{}/", env["HOARD_ADVERTISE"])
        );
        let hoard::config::Peers::Static(urls) = cluster.peers else {
            panic!("{name}: static peers expected");
        };
        assert_eq!(urls.len(), 3, "{name}: {urls:?}");
        assert_eq!(
            config.store.s3.expect("a bucket").bucket,
            env["HOARD_S3_BUCKET"]
        );
        // Each its own hot tier.
        let service = &compose["services"][name];
        let volume = service["volumes"][0].as_str().unwrap();
        let (volume, path) = volume.split_once(':').unwrap();
        assert_eq!(path, env["HOARD_DATA_DIR"]);
        assert!(
            compose["volumes"].get(volume).is_some(),
            "{volume} undeclared"
        );
        assert!(volumes.insert(volume.to_owned()), "{volume} shared");
        // Reached through nginx only.
        assert!(service["ports"].is_null(), "{name} publishes a port");
    }
    // The bucket is the garage service, as garage.toml serves it.
    let garage_toml: toml::Value = toml::from_str(&read("deploy/compose/garage.toml")).unwrap();
    let endpoint = reqwest::Url::parse(&first["HOARD_S3_ENDPOINT"]).unwrap();
    let garage = &compose["services"][endpoint.host_str().unwrap()];
    assert!(garage["image"]
        .as_str()
        .unwrap()
        .starts_with("dxflrs/garage:"));
    assert!(garage["volumes"].as_array().unwrap().iter().any(|v| v
        .as_str()
        .unwrap()
        .starts_with("./garage.toml:/etc/garage.toml")));
    let api = garage_toml["s3_api"]["api_bind_addr"].as_str().unwrap();
    assert!(
        api.ends_with(&format!(":{}", endpoint.port().unwrap())),
        "{api}"
    );
    assert_eq!(
        garage_toml["s3_api"]["s3_region"].as_str(),
        Some(first["HOARD_S3_REGION"].as_str())
    );
    assert_eq!(garage_toml["replication_factor"].as_integer(), Some(1));
    // The one-time set-up the header gives creates that bucket and that key.
    let text = read(COMPOSE);
    let bucket = &first["HOARD_S3_BUCKET"];
    for step in [
        format!("$g bucket create {bucket}\n"),
        format!(
            "$g key import --yes -n hoard {} {}\n",
            first["AWS_ACCESS_KEY_ID"], first["AWS_SECRET_ACCESS_KEY"]
        ),
        format!("$g bucket allow --read --write {bucket} --key hoard\n"),
        "$g layout apply --version 1\n".to_owned(),
    ] {
        assert!(text.contains(&step), "{COMPOSE} lacks the step {step:?}");
    }
    // nginx in front, on the one published port.
    let nginx = &compose["services"]["nginx"];
    assert_eq!(nginx["ports"], serde_json::json!(["5000:5000"]));
    assert!(nginx["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v == "./nginx.conf:/etc/nginx/nginx.conf:ro"));
    for name in replicas.keys() {
        assert_eq!(nginx["depends_on"][name]["condition"], "service_healthy");
    }
}

#[test]
fn issue_13_nginx_balances_over_every_compose_replica_and_streams() {
    let conf = read("deploy/compose/nginx.conf");
    let lines: Vec<&str> = conf
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    // Well formed: every statement ends, every block closes.
    let mut depth = 0i32;
    for line in &lines {
        assert!(
            line.ends_with(';') || line.ends_with('{') || *line == "}",
            "nginx.conf: {line:?}"
        );
        depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
        assert!(depth >= 0);
    }
    assert_eq!(depth, 0, "nginx.conf: unbalanced braces");
    // The upstream lists every replica, and is what the server proxies to.
    let open = lines
        .iter()
        .position(|l| l.starts_with("upstream ") && l.ends_with('{'))
        .expect("an upstream block");
    let name = lines[open]["upstream ".len()..]
        .trim_end_matches('{')
        .trim();
    let servers: BTreeSet<String> = lines[open + 1..]
        .iter()
        .take_while(|l| **l != "}")
        .filter_map(|l| l.strip_prefix("server "))
        .map(|s| format!("http://{}", s.split_whitespace().next().unwrap()))
        .collect();
    let compose = only_document(COMPOSE);
    let replicas: BTreeSet<String> = compose_replicas(&compose)
        .values()
        .map(|env| env["HOARD_ADVERTISE"].clone())
        .collect();
    assert_eq!(
        servers, replicas,
        "nginx.conf upstream vs the compose replicas"
    );
    for needed in [
        format!("proxy_pass http://{name};"),
        "listen 5000;".to_owned(),
        "proxy_buffering off;".to_owned(),
        "proxy_request_buffering off;".to_owned(),
        "proxy_http_version 1.1;".to_owned(),
        "proxy_set_header Connection \"\";".to_owned(),
        "proxy_set_header Host $http_host;".to_owned(),
    ] {
        assert!(
            lines.contains(&needed.as_str()),
            "nginx.conf lacks {needed}"
        );
    }
    // No load balancing method: round robin.
    for method in ["hash ", "ip_hash", "least_conn", "random"] {
        assert!(!lines.iter().any(|l| l.starts_with(method)), "{method}");
    }
    // Timeouts between reads of a big layer from a cold upstream.
    for timeout in ["proxy_read_timeout", "proxy_send_timeout"] {
        let value = lines
            .iter()
            .find_map(|l| l.strip_prefix(timeout))
            .unwrap_or_else(|| panic!("nginx.conf lacks {timeout}"));
        let seconds: u64 = value
            .trim()
            .trim_end_matches(';')
            .trim_end_matches('s')
            .parse()
            .unwrap();
        assert!(seconds >= 300, "{timeout} {seconds}s");
    }
}

#[test]
fn issue_13_replicated_files_name_only_exported_metrics() {
    let exported = exported_metrics();
    let mut files = files_under(&root().join(REPLICATED));
    for name in ["docker-compose.replicated.yml", "nginx.conf", "garage.toml"] {
        files.push(root().join("deploy/compose").join(name));
    }
    let mut named = BTreeSet::new();
    for file in files {
        for metric in metrics_named(&std::fs::read_to_string(&file).unwrap()) {
            assert!(
                exported.contains(&metric),
                "{} names {metric}, which hoard does not export",
                file.display()
            );
            named.insert(metric);
        }
    }
    for needed in ["hoard_peer_requests_total", "hoard_bucket_uploads_total"] {
        assert!(
            named.contains(needed),
            "no replicated file explains {needed}"
        );
    }
}

#[test]
fn issue_14_hosts_toml_capabilities_are_ones_containerd_1_6_and_1_7_accept() {
    // containerd before 2.x refuses a whole hosts.toml over a capability it
    // does not know ("unknown capability"), and only 2.x builds with the
    // referrers fetcher know `referrers`: the examples stay within these.
    let known = ["pull", "resolve", "push"];
    let mut checked = 0;
    for path in files_under(&root().join("deploy/clients")) {
        if path.file_name().is_none_or(|n| n != "hosts.toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        let hosts = parsed.get("host").and_then(toml::Value::as_table);
        for (_, host) in hosts.into_iter().flatten() {
            for capability in host["capabilities"].as_array().unwrap() {
                let capability = capability.as_str().unwrap();
                assert!(
                    known.contains(&capability),
                    "{}: capability {capability}",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} hosts checked");
}
