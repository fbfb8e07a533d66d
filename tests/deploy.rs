//! The deployment files, checked with nothing but Rust: every client config
//! in deploy/clients is either read by an end-to-end test or parsed here;
//! the dashboard and alert rules name only metrics hoard exports; the
//! Kubernetes ConfigMap's hoard.toml is a valid config; the Dockerfile and
//! the systemd unit have what the issue asks. scripts/check-deploy.sh runs
//! the format-aware tools (hadolint, promtool, docker-compose,
//! kubernetes-validate, systemd-analyze) on the same files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
    let yaml = read("deploy/kubernetes/configmap.yaml");
    let start = yaml.find("hoard.toml: |").expect("a hoard.toml key") + "hoard.toml: |".len();
    let toml: String = yaml[start..]
        .lines()
        .skip(1)
        .map(|l| l.strip_prefix("    ").unwrap_or(l.trim_start()))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("dockerhub-password");
    std::fs::write(&secret, "x\n").unwrap();
    let toml = toml.replace(
        "/etc/hoard/secrets/dockerhub-password",
        secret.to_str().unwrap(),
    );
    let path = dir.path().join("hoard.toml");
    std::fs::write(&path, toml).unwrap();
    let args = hoard::config::ServeArgs {
        config: Some(path),
        ..Default::default()
    };
    let config = hoard::config::Config::load(&args, []).unwrap();
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
