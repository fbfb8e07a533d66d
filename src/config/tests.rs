//! Tests of `Config::load` as a whole: defaults, the three sources and
//! their order, the errors, and the redacted listing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

#[test]
fn embedded_default_serves_docker_hub_on_5000() {
    let c = Config::load(&ServeArgs::default(), []).unwrap();
    assert_eq!(c.listen.port(), 5000);
    assert_eq!(c.store.data_dir, PathBuf::from("hoard-data"));
    assert_eq!(
        c.upstream.registries["docker.io"].url.as_str(),
        "https://registry-1.docker.io/"
    );
    assert_eq!(c.upstream.tag_ttl.default, Duration::from_secs(300));
    assert!(!c.upstream.allow_any);
    assert_eq!(c.upstream.any_ports, [443, 80]);
}

#[test]
fn credentials_from_files_and_docker_config_with_explicit_ones_first() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "from-file\n").unwrap();
    let docker = dir.path().join("config.json");
    std::fs::write(
            &docker,
            r#"{"auths": {"ghcr.io": {"username": "d", "password": "docker-pw"},
                          "https://index.docker.io/v1/": {"username": "d", "password": "docker-pw"}}}"#,
        )
        .unwrap();
    let env = [
        (
            "HOARD_REGISTRY_DOCKER_IO_USERNAME".to_owned(),
            "u".to_owned(),
        ),
        (
            "HOARD_REGISTRY_DOCKER_IO_PASSWORD_FILE".to_owned(),
            dir.path().join("pw").display().to_string(),
        ),
    ];
    let args = ServeArgs {
        upstream: vec!["ghcr.io=https://ghcr.io".into()],
        docker_config: Some(docker),
        ..ServeArgs::default()
    };
    let c = Config::load(&args, env).unwrap();
    assert_eq!(
        c.upstream.registries["docker.io"].credentials,
        Some(Credentials::Basic {
            username: "u".into(),
            password: "from-file".into()
        })
    );
    assert_eq!(
        c.upstream.registries["ghcr.io"].credentials,
        Some(Credentials::Basic {
            username: "d".into(),
            password: "docker-pw".into()
        })
    );
    let shown = format!("{:?}", c.upstream.registries);
    assert!(!shown.contains("from-file") && !shown.contains("docker-pw"));
}

#[test]
fn a_token_file_gives_a_bearer_token_and_an_empty_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "tok-from-file\n").unwrap();
    let env = |path: &Path| {
        [(
            "HOARD_REGISTRY_DOCKER_IO_TOKEN_FILE".to_owned(),
            path.display().to_string(),
        )]
    };
    let c = Config::load(&ServeArgs::default(), env(&token)).unwrap();
    assert_eq!(
        c.upstream.registries["docker.io"].credentials,
        Some(Credentials::Bearer("tok-from-file".into()))
    );
    std::fs::write(&token, "\n").unwrap();
    assert!(Config::load(&ServeArgs::default(), env(&token)).is_err());
}

#[test]
fn tls_files_come_from_file_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hoard.toml");
    std::fs::write(
        &path,
        "[tls]\ncert = \"/a/cert.pem\"\nkey = \"/a/key.pem\"\nplain_listen = \"127.0.0.1:5001\"\n",
    )
    .unwrap();
    let args = ServeArgs {
        config: Some(path),
        tls_client_ca: Some("/b/ca.pem".into()),
        ..ServeArgs::default()
    };
    let c = Config::load(&args, []).unwrap();
    let tls = c.tls.unwrap();
    assert_eq!(tls.cert, PathBuf::from("/a/cert.pem"));
    assert_eq!(tls.client_ca, Some(PathBuf::from("/b/ca.pem")));
    assert_eq!(tls.plain_listen, Some("127.0.0.1:5001".parse().unwrap()));

    // A plain listener or a client CA without a certificate is a mistake.
    let args = ServeArgs {
        plain_listen: Some("127.0.0.1:5001".parse().unwrap()),
        ..ServeArgs::default()
    };
    assert!(Config::load(&args, []).is_err());
    let args = ServeArgs {
        tls_client_ca: Some("/b/ca.pem".into()),
        ..ServeArgs::default()
    };
    assert!(Config::load(&args, []).is_err());
}

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hoard.toml");
    let args = ServeArgs {
        config: Some(path),
        ..ServeArgs::default()
    };
    let c = Config::load(&args, []).unwrap();
    assert!(c.upstream.registries.contains_key("ghcr.io"));
    assert!(c.upstream.registries.contains_key("quay.io"));
}

#[test]
fn file_then_env_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hoard.toml");
    std::fs::write(
        &path,
        r#"
tag_ttl = "1m"
max_manifest_size = "1MiB"
[registries."ghcr.io"]
tag_ttl = "10s"
username = "bot"
password = "from-file"
"#,
    )
    .unwrap();
    let args = ServeArgs {
        config: Some(path),
        tag_ttl: Some("30s".into()),
        upstream: vec!["docker.io=http://127.0.0.1:5001".into()],
        ..ServeArgs::default()
    };
    let env = [(
        "HOARD_REGISTRY_GHCR_IO_PASSWORD".to_string(),
        "from-env".to_string(),
    )];
    let c = Config::load(&args, env).unwrap();
    assert_eq!(c.upstream.tag_ttl.default, Duration::from_secs(30));
    assert_eq!(c.upstream.max_manifest_bytes, 1 << 20);
    assert_eq!(
        c.upstream.tag_ttl.for_registry("ghcr.io"),
        Duration::from_secs(10)
    );
    assert_eq!(
        c.upstream.tag_ttl.for_registry("docker.io"),
        Duration::from_secs(30)
    );
    assert_eq!(
        c.upstream.registries["docker.io"].url.as_str(),
        "http://127.0.0.1:5001/"
    );
    assert_eq!(
        c.upstream.registries["ghcr.io"].url.as_str(),
        "https://ghcr.io/"
    );
    let creds = c.upstream.registries["ghcr.io"]
        .credentials
        .clone()
        .unwrap();
    assert_eq!(
        creds,
        Credentials::Basic {
            username: "bot".into(),
            password: "from-env".into()
        }
    );
    assert!(!format!("{creds:?}").contains("from-env"));
}

#[test]
fn bad_values_are_refused() {
    for args in [
        ServeArgs {
            tag_ttl: Some("soon".into()),
            ..Default::default()
        },
        ServeArgs {
            upstream: vec!["docker.io".into()],
            ..Default::default()
        },
        ServeArgs {
            upstream: vec!["docker.io=ftp://x".into()],
            ..Default::default()
        },
        ServeArgs {
            upstream: vec!["Bad_Host=http://x".into()],
            ..Default::default()
        },
        ServeArgs {
            max_manifest_size: Some("4 parsecs".into()),
            ..Default::default()
        },
    ] {
        assert!(Config::load(&args, []).is_err(), "{args:?}");
    }
}

/// The config file `text`, loaded with nothing else.
fn from_file(text: &str) -> Result<Config> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hoard.toml");
    std::fs::write(&path, text).unwrap();
    let args = ServeArgs {
        config: Some(path),
        ..ServeArgs::default()
    };
    Config::load(&args, [])
}

/// The variables `vars`, loaded with nothing else.
fn from_env(vars: &[(&str, &str)]) -> Result<Config> {
    let env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::load(&ServeArgs::default(), env)
}

/// The command line `argv` (as clap parses it), loaded with nothing else.
fn from_flags(argv: &[&str]) -> Result<Config> {
    let args = args::parse(argv.iter().map(|s| s.to_string())).unwrap();
    Config::load(&args, [])
}

/// One setting (or a pair that only goes together) written as a file
/// snippet, as variables, and as flags (when it has any).
struct Setting {
    file: String,
    env: Vec<(&'static str, String)>,
    flags: Option<Vec<String>>,
}

fn setting(file: &str, env: &[(&'static str, &str)], flags: Option<&[&str]>) -> Setting {
    Setting {
        file: file.to_owned(),
        env: env.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        flags: flags.map(|f| f.iter().map(|s| s.to_string()).collect()),
    }
}

/// Every setting the environment or a flag can set.
fn every_setting(dir: &Path) -> Vec<Setting> {
    let secret = dir.join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let secret = secret.to_str().unwrap();
    let docker = dir.join("config.json");
    std::fs::write(
        &docker,
        r#"{"auths": {"docker.io": {"username": "d", "password": "p"}}}"#,
    )
    .unwrap();
    let docker = docker.to_str().unwrap();
    vec![
        setting(
            "listen = \"127.0.0.1:7000\"",
            &[("HOARD_LISTEN", "127.0.0.1:7000")],
            Some(&["--listen", "127.0.0.1:7000"]),
        ),
        setting(
            "metrics_listen = \"127.0.0.1:7001\"",
            &[("HOARD_METRICS_LISTEN", "127.0.0.1:7001")],
            Some(&["--metrics-listen", "127.0.0.1:7001"]),
        ),
        setting(
            "data_dir = \"/srv/hoard\"",
            &[("HOARD_DATA_DIR", "/srv/hoard")],
            Some(&["--data-dir", "/srv/hoard"]),
        ),
        setting(
            "log_format = \"json\"",
            &[("HOARD_LOG_FORMAT", "json")],
            Some(&["--log-format", "json"]),
        ),
        setting(
            "tag_ttl = \"42s\"",
            &[("HOARD_TAG_TTL", "42s")],
            Some(&["--tag-ttl", "42s"]),
        ),
        setting(
            "allow_any_upstream = true",
            &[("HOARD_ALLOW_ANY_UPSTREAM", "true")],
            Some(&["--allow-any-upstream"]),
        ),
        setting(
            "max_manifest_size = \"1MiB\"",
            &[("HOARD_MAX_MANIFEST_SIZE", "1MiB")],
            Some(&["--max-manifest-size", "1MiB"]),
        ),
        setting(
            "shutdown_timeout = \"3s\"",
            &[("HOARD_SHUTDOWN_TIMEOUT", "3s")],
            Some(&["--shutdown-timeout", "3s"]),
        ),
        setting(
            "[store]\nmax_size = \"1GiB\"",
            &[("HOARD_MAX_SIZE", "1GiB")],
            Some(&["--max-size", "1GiB"]),
        ),
        setting(
            "[store]\nmin_free_space = 1024",
            &[("HOARD_MIN_FREE_SPACE", "1KiB")],
            Some(&["--min-free-space", "1024"]),
        ),
        setting(
            "[store.s3]\nbucket = \"hoard\"",
            &[("HOARD_S3_BUCKET", "hoard")],
            Some(&["--s3-bucket", "hoard"]),
        ),
        setting(
            "[store.s3]\nbucket = \"hoard\"\nendpoint = \"http://127.0.0.1:3900\"",
            &[
                ("HOARD_S3_BUCKET", "hoard"),
                ("HOARD_S3_ENDPOINT", "http://127.0.0.1:3900"),
            ],
            Some(&["--s3-bucket", "hoard", "--s3-endpoint", "http://127.0.0.1:3900"]),
        ),
        setting(
            "[store.s3]\nbucket = \"hoard\"\n[cluster]\nadvertise = \"http://127.0.0.1:5001\"\npeers = [\"http://127.0.0.1:5001\", \"http://127.0.0.1:5002\"]",
            &[
                ("HOARD_S3_BUCKET", "hoard"),
                ("HOARD_ADVERTISE", "http://127.0.0.1:5001"),
                ("HOARD_PEERS", "http://127.0.0.1:5001,http://127.0.0.1:5002"),
            ],
            Some(&[
                "--s3-bucket",
                "hoard",
                "--advertise",
                "http://127.0.0.1:5001",
                "--peer",
                "http://127.0.0.1:5001",
                "--peer",
                "http://127.0.0.1:5002",
            ]),
        ),
        setting(
            "[store.s3]\nbucket = \"hoard\"\n[cluster]\nadvertise = \"http://127.0.0.1:5001\"\npeers_dns = \"localhost:5001\"",
            &[
                ("HOARD_S3_BUCKET", "hoard"),
                ("HOARD_ADVERTISE", "http://127.0.0.1:5001"),
                ("HOARD_PEERS_DNS", "localhost:5001"),
            ],
            Some(&[
                "--s3-bucket",
                "hoard",
                "--advertise",
                "http://127.0.0.1:5001",
                "--peers-dns",
                "localhost:5001",
            ]),
        ),
        setting(
            "[store.s3]\nbucket = \"hoard\"\nregion = \"garage\"",
            &[("HOARD_S3_BUCKET", "hoard"), ("HOARD_S3_REGION", "garage")],
            Some(&["--s3-bucket", "hoard", "--s3-region", "garage"]),
        ),
        setting(
            &format!("[upstream]\ndocker_config = {docker:?}"),
            &[("HOARD_DOCKER_CONFIG", docker)],
            Some(&["--docker-config", docker]),
        ),
        setting(
            "[upstream]\nmax_concurrent_fetches = 3",
            &[("HOARD_MAX_CONCURRENT_FETCHES", "3")],
            Some(&["--max-concurrent-fetches", "3"]),
        ),
        setting(
            "[upstream]\nrate_limit_floor = 3",
            &[("HOARD_RATE_LIMIT_FLOOR", "3")],
            Some(&["--rate-limit-floor", "3"]),
        ),
        setting(
            "[upstream]\nconnect_timeout = \"3s\"",
            &[("HOARD_CONNECT_TIMEOUT", "3s")],
            Some(&["--connect-timeout", "3s"]),
        ),
        setting(
            "[upstream]\nresponse_timeout = \"3s\"",
            &[("HOARD_RESPONSE_TIMEOUT", "3s")],
            Some(&["--response-timeout", "3s"]),
        ),
        setting(
            "[upstream]\nstall_timeout = \"3s\"",
            &[("HOARD_STALL_TIMEOUT", "3s")],
            Some(&["--stall-timeout", "3s"]),
        ),
        setting(
            "[upstream]\nresume_attempts = 5",
            &[("HOARD_RESUME_ATTEMPTS", "5")],
            Some(&["--resume-attempts", "5"]),
        ),
        setting(
            "[upstream]\nrange_fill = false",
            &[("HOARD_RANGE_FILL", "false")],
            Some(&["--range-fill", "false"]),
        ),
        setting(
            "[ui]\nenabled = false",
            &[("HOARD_UI", "false")],
            Some(&["--ui", "false"]),
        ),
        setting(
            "[upstream]\nany_ports = [443, 5000]",
            &[("HOARD_ANY_PORTS", "443,5000")],
            Some(&["--any-port", "443", "--any-port", "5000"]),
        ),
        setting(
            "[limits]\nmax_connections_per_client = 3",
            &[("HOARD_MAX_CONNECTIONS_PER_CLIENT", "3")],
            Some(&["--max-connections-per-client", "3"]),
        ),
        setting(
            "[limits]\nresponse_deadline = \"3s\"",
            &[("HOARD_RESPONSE_DEADLINE", "3s")],
            Some(&["--response-deadline", "3s"]),
        ),
        setting(
            "[limits]\nheader_read_timeout = \"3s\"",
            &[("HOARD_HEADER_READ_TIMEOUT", "3s")],
            Some(&["--header-read-timeout", "3s"]),
        ),
        setting(
            "[admin]\nlisten = \"127.0.0.1:7002\"\ntoken = \"t\"",
            &[
                ("HOARD_ADMIN_LISTEN", "127.0.0.1:7002"),
                ("HOARD_ADMIN_TOKEN", "t"),
            ],
            Some(&["--admin-listen", "127.0.0.1:7002", "--admin-token", "t"]),
        ),
        setting(
            "[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"",
            &[("HOARD_TLS_CERT", "/c.pem"), ("HOARD_TLS_KEY", "/k.pem")],
            Some(&["--tls-cert", "/c.pem", "--tls-key", "/k.pem"]),
        ),
        setting(
            "[tls]\nclient_ca = \"/ca.pem\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"",
            &[
                ("HOARD_TLS_CLIENT_CA", "/ca.pem"),
                ("HOARD_TLS_CERT", "/c.pem"),
                ("HOARD_TLS_KEY", "/k.pem"),
            ],
            Some(&[
                "--tls-client-ca=/ca.pem",
                "--tls-cert=/c.pem",
                "--tls-key=/k.pem",
            ]),
        ),
        setting(
            "[tls]\nplain_listen = \"127.0.0.1:7003\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"",
            &[
                ("HOARD_PLAIN_LISTEN", "127.0.0.1:7003"),
                ("HOARD_TLS_CERT", "/c.pem"),
                ("HOARD_TLS_KEY", "/k.pem"),
            ],
            Some(&[
                "--plain-listen=127.0.0.1:7003",
                "--tls-cert=/c.pem",
                "--tls-key=/k.pem",
            ]),
        ),
        setting(
            "[tls]\nreload_interval = \"100ms\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"",
            &[
                ("HOARD_TLS_RELOAD_INTERVAL", "100ms"),
                ("HOARD_TLS_CERT", "/c.pem"),
                ("HOARD_TLS_KEY", "/k.pem"),
            ],
            Some(&[
                "--tls-reload-interval=100ms",
                "--tls-cert=/c.pem",
                "--tls-key=/k.pem",
            ]),
        ),
        setting(
            "[auth]\nreload_interval = \"100ms\"\nhtpasswd = \"/etc/htpasswd\"",
            &[
                ("HOARD_AUTH_RELOAD_INTERVAL", "100ms"),
                ("HOARD_HTPASSWD", "/etc/htpasswd"),
            ],
            Some(&["--auth-reload-interval=100ms", "--htpasswd=/etc/htpasswd"]),
        ),
        setting(
            "[auth]\nhtpasswd = \"/etc/htpasswd\"",
            &[("HOARD_HTPASSWD", "/etc/htpasswd")],
            Some(&["--htpasswd", "/etc/htpasswd"]),
        ),
        setting(
            "[registries.\"ghcr.io\"]\nurl = \"http://127.0.0.1:9\"",
            &[("HOARD_UPSTREAM", "ghcr.io=http://127.0.0.1:9")],
            Some(&["--upstream", "ghcr.io=http://127.0.0.1:9"]),
        ),
        setting(
            "[registries.\"docker.io\"]\nurl = \"http://127.0.0.1:9\"",
            &[("HOARD_REGISTRY_DOCKER_IO_URL", "http://127.0.0.1:9")],
            Some(&["--upstream=docker.io=http://127.0.0.1:9"]),
        ),
        setting(
            "[registries.\"docker.io\"]\ntag_ttl = \"7s\"",
            &[("HOARD_REGISTRY_DOCKER_IO_TAG_TTL", "7s")],
            None,
        ),
        setting(
            "[registries.\"docker.io\"]\nusername = \"u\"\npassword = \"p\"",
            &[
                ("HOARD_REGISTRY_DOCKER_IO_USERNAME", "u"),
                ("HOARD_REGISTRY_DOCKER_IO_PASSWORD", "p"),
            ],
            None,
        ),
        setting(
            &format!("[registries.\"docker.io\"]\nusername = \"u\"\npassword_file = {secret:?}"),
            &[
                ("HOARD_REGISTRY_DOCKER_IO_USERNAME", "u"),
                ("HOARD_REGISTRY_DOCKER_IO_PASSWORD_FILE", secret),
            ],
            None,
        ),
        setting(
            "[registries.\"docker.io\"]\ntoken = \"t\"",
            &[("HOARD_REGISTRY_DOCKER_IO_TOKEN", "t")],
            None,
        ),
        setting(
            &format!("[registries.\"docker.io\"]\ntoken_file = {secret:?}"),
            &[("HOARD_REGISTRY_DOCKER_IO_TOKEN_FILE", secret)],
            None,
        ),
    ]
}

#[test]
fn each_setting_means_the_same_from_the_file_the_environment_and_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = Config::load(&ServeArgs::default(), []).unwrap();
    for setting in every_setting(dir.path()) {
        let file = from_file(&setting.file).unwrap();
        assert_ne!(file, defaults, "{} changes nothing", setting.file);
        let env: Vec<(&str, &str)> = setting.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(from_env(&env).unwrap(), file, "{env:?}");
        if let Some(flags) = &setting.flags {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            assert_eq!(from_flags(&flags).unwrap(), file, "{flags:?}");
        }
    }
}

#[test]
fn every_variable_of_a_flag_is_in_that_table() {
    let dir = tempfile::tempdir().unwrap();
    let covered: Vec<&str> = every_setting(dir.path())
        .iter()
        .flat_map(|s| s.env.iter().map(|(k, _)| *k))
        .collect();
    for arg in args::command().get_arguments() {
        let Some(var) = arg.get_env().and_then(|v| v.to_str()) else {
            continue;
        };
        assert!(
            var == "HOARD_CONFIG" || covered.contains(&var),
            "{var} is not tested"
        );
    }
}

#[test]
fn the_file_then_the_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hoard.toml");
    std::fs::write(
        &path,
        r#"
listen = "127.0.0.1:7000"
tag_ttl = "1m"
[store]
max_size = "1GiB"
[upstream]
stall_timeout = "1s"
connect_timeout = "1s"
"#,
    )
    .unwrap();
    let env = [
        ("HOARD_TAG_TTL", "2m"),
        ("HOARD_STALL_TIMEOUT", "2s"),
        ("HOARD_MAX_SIZE", "2GiB"),
        // The file comes from the environment too.
        ("HOARD_CONFIG", path.to_str().unwrap()),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let args = args::parse(["--tag-ttl=3m", "--max-size=3GiB"].map(String::from)).unwrap();
    let c = Config::load(&args, env).unwrap();
    assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap(), "file only");
    assert_eq!(
        c.upstream.connect_timeout,
        Duration::from_secs(1),
        "file only"
    );
    assert_eq!(
        c.upstream.stall_timeout,
        Duration::from_secs(2),
        "env over file"
    );
    assert_eq!(
        c.upstream.tag_ttl.default,
        Duration::from_secs(180),
        "flag over env"
    );
    assert_eq!(c.store.max_bytes, Some(3 << 30), "flag over env");
    assert_eq!(
        c.upstream.response_timeout,
        Duration::from_secs(30),
        "default"
    );
}

#[test]
fn variables_of_registries_apply_to_hosts_named_by_a_flag_too() {
    let env = [
        ("HOARD_REGISTRY_GHCR_IO_TOKEN", "t"),
        ("HOARD_REGISTRY_QUAY_IO_TOKEN", "not configured: ignored"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let args = ServeArgs {
        upstream: vec!["ghcr.io=http://127.0.0.1:9".into()],
        ..ServeArgs::default()
    };
    let c = Config::load(&args, env).unwrap();
    assert_eq!(
        c.upstream.registries["ghcr.io"].credentials,
        Some(Credentials::Bearer("t".into()))
    );
    assert!(!c.upstream.registries.contains_key("quay.io"));
}

#[test]
fn an_invalid_value_names_the_file_key_whatever_set_it() {
    // (file key, file snippet, variable, flag)
    let cases = [
        (
            "upstream.stall_timeout",
            "[upstream]\nstall_timeout = \"soon\"",
            ("HOARD_STALL_TIMEOUT", "soon"),
            "--stall-timeout=soon",
        ),
        (
            "tag_ttl",
            "tag_ttl = \"soon\"",
            ("HOARD_TAG_TTL", "soon"),
            "--tag-ttl=soon",
        ),
        (
            "limits.header_read_timeout",
            "[limits]\nheader_read_timeout = \"1 fortnight\"",
            ("HOARD_HEADER_READ_TIMEOUT", "1 fortnight"),
            "--header-read-timeout=1 fortnight",
        ),
        (
            "store.max_size",
            "[store]\nmax_size = \"4 parsecs\"",
            ("HOARD_MAX_SIZE", "4 parsecs"),
            "--max-size=4 parsecs",
        ),
        (
            "max_manifest_size",
            "max_manifest_size = \"MiB\"",
            ("HOARD_MAX_MANIFEST_SIZE", "MiB"),
            "--max-manifest-size=MiB",
        ),
        (
            "upstream.max_concurrent_fetches",
            "[upstream]\nmax_concurrent_fetches = 0",
            ("HOARD_MAX_CONCURRENT_FETCHES", "0"),
            "--max-concurrent-fetches=0",
        ),
        (
            "upstream.any_ports",
            "[upstream]\nany_ports = [443, 0]",
            ("HOARD_ANY_PORTS", "443,0"),
            "--any-port=0",
        ),
        (
            "limits.max_connections_per_client",
            "[limits]\nmax_connections_per_client = 0",
            ("HOARD_MAX_CONNECTIONS_PER_CLIENT", "0"),
            "--max-connections-per-client=0",
        ),
        (
            "registries.\"ghcr.io\".url",
            "[registries.\"ghcr.io\"]\nurl = \"ftp://x\"",
            ("HOARD_UPSTREAM", "ghcr.io=ftp://x"),
            "--upstream=ghcr.io=ftp://x",
        ),
        (
            "registries.\"Bad_Host\"",
            "[registries.\"Bad_Host\"]\nurl = \"http://x\"",
            ("HOARD_UPSTREAM", "Bad_Host=http://x"),
            "--upstream=Bad_Host=http://x",
        ),
    ];
    for (key, file, var, flag) in cases {
        let errors = [
            from_file(file).unwrap_err(),
            from_env(&[var]).unwrap_err(),
            from_flags(&[flag]).unwrap_err(),
        ];
        for e in errors {
            let ConfigError::Invalid { key: named, .. } = &e else {
                panic!("{e}");
            };
            assert_eq!(named, key, "{e}");
            assert!(!e.to_string().contains("--"), "{e}");
        }
    }
    // Only the file writes these.
    for (key, file) in [
        ("warm.interval", "[warm]\ninterval = \"often\""),
        ("warm.platforms", "[warm]\nplatforms = [\"amd64\"]"),
        ("warm.images", "[warm]\nimages = [\"UPPER/case\"]"),
        ("store.max_tag_age", "[store]\nmax_tag_age = \"old\""),
        ("store.pins", "[store]\npins = [\"\"]"),
        (
            "registries.\"ghcr.io\".tag_ttl",
            "[registries.\"ghcr.io\"]\ntag_ttl = \"soon\"",
        ),
        (
            "registries.\"ghcr.io\"",
            "[registries.\"ghcr.io\"]\nusername = \"alone\"",
        ),
        ("tls.key", "[tls]\ncert = \"/c.pem\""),
        (
            "tls.cert",
            "[tls]\nclient_ca = \"/ca.pem\"\nkey = \"/k.pem\"",
        ),
        ("tls.reload_interval", "[tls]\nreload_interval = \"0s\""),
        (
            "auth.reload_interval",
            "[auth]\nreload_interval = \"often\"",
        ),
        ("tls.plain_listen", "[tls]\nplain_listen = \"127.0.0.1:1\""),
        ("auth.htpasswd", "[auth]\nprotect_metrics = true"),
        ("admin.listen", "[admin]\nlisten = \"127.0.0.1:1\""),
    ] {
        match from_file(file) {
            Err(ConfigError::Invalid { key: named, .. }) => assert_eq!(named, key, "{file}"),
            other => panic!("{file}: {other:?}"),
        }
    }
}

#[test]
fn a_variable_clap_refuses_is_named() {
    let e = from_env(&[("HOARD_LISTEN", "nowhere")]).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Invalid { key, .. } if key == "HOARD_LISTEN"),
        "{e}"
    );
    assert!(e.to_string().contains("\"nowhere\""), "{e}");
}

#[test]
fn unknown_keys_in_the_file_are_refused() {
    for (text, typo) in [
        ("listen_typo = 1", "listen_typo"),
        ("[upstream]\nstall = \"1s\"", "stall"),
        ("[store]\nmax_bytes = 1", "max_bytes"),
        ("[registries.\"ghcr.io\"]\npasword = \"x\"", "pasword"),
        ("[tls]\ncertificate = \"/c.pem\"", "certificate"),
    ] {
        match from_file(text) {
            Err(ConfigError::Parse { message, .. }) => assert!(message.contains(typo), "{message}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn the_listing_shows_each_section_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
[admin]
listen = "127.0.0.1:7002"
token = "admin-canary"
[tls]
cert = "/c.pem"
key = "/k.pem"
plain_listen = "127.0.0.1:7003"
[auth]
htpasswd = "/etc/htpasswd"
[warm]
images = ["alpine:3.19"]
platforms = ["linux/amd64"]
[registries."ghcr.io"]
username = "bot"
password = "registry-canary"
[registries."quay.io"]
token = "token-canary"
"#;
    let path = dir.path().join("hoard.toml");
    std::fs::write(&path, text).unwrap();
    let args = ServeArgs {
        config: Some(path),
        ..ServeArgs::default()
    };
    let c = Config::load(&args, []).unwrap();
    let shown = c.to_string();
    for line in [
        "listen = 0.0.0.0:5000\n",
        "data_dir = hoard-data\n",
        "max_manifest_size = 4194304 bytes\n",
        "[tls]\n  cert = /c.pem\n  key = /k.pem\n  client_ca = (off)\n  plain_listen = 127.0.0.1:7003\n",
        "  htpasswd = /etc/htpasswd\n  realm = \"hoard\"\n",
        "  header_read_timeout = 30s\n",
        "  min_free_space = 536870912 bytes\n",
        "  stall_timeout = 30s\n",
        "[admin]\n  listen = 127.0.0.1:7002\n  token = <redacted>\n",
        "  platforms = [\"linux/amd64\"]\n",
        "[registries.\"ghcr.io\"]\n  url = https://ghcr.io/\n  tag_ttl = 5m\n  credentials = user \"bot\", password <redacted>\n",
        "  credentials = bearer token <redacted>\n",
    ] {
        assert!(shown.contains(line), "{line:?} not in\n{shown}");
    }
    for secret in ["admin-canary", "registry-canary", "token-canary"] {
        assert!(!shown.contains(secret), "{secret} shown");
        assert!(!format!("{c:?}").contains(secret), "{secret} in Debug");
    }
}

#[test]
fn reload_intervals_default_to_5s_and_alone_turn_nothing_on() {
    let c = from_flags(&["--tls-cert=/c.pem", "--tls-key=/k.pem", "--htpasswd=/h"]).unwrap();
    assert_eq!(c.tls.unwrap().reload_interval, Duration::from_secs(5));
    assert_eq!(c.auth.unwrap().reload_interval, Duration::from_secs(5));
    let c = from_file("[tls]\nreload_interval = \"1s\"\n[auth]\nreload_interval = \"1s\"").unwrap();
    assert_eq!((c.tls, c.auth), (None, None));
}

#[test]
fn issue_13_a_bucket_selects_the_s3_backend_and_its_settings_are_checked() {
    let config = from_file("[store.s3]\nbucket = \"hoard\"\nprefix = \"/team-a/\"").unwrap();
    let s3 = config.store.s3.expect("a bucket selects s3");
    assert_eq!(s3.prefix, "team-a/");
    assert_eq!(s3.credentials, S3Credentials::Chain);
    assert!(!s3.redirect);
    assert_eq!(s3.redirect_ttl, Duration::from_secs(600));
    assert_eq!(from_file("").unwrap().store.s3, None);
    let refused = [
        ("[store]\nbackend = \"s3\"", "store.s3.bucket"),
        ("[store]\nbackend = \"tape\"", "store.backend"),
        (
            "[store]\nbackend = \"fs\"\n[store.s3]\nbucket = \"hoard\"",
            "store.backend",
        ),
        (
            "[store.s3]\nendpoint = \"http://127.0.0.1:1\"",
            "store.s3.bucket",
        ),
        ("[store.s3]\nbucket = \"No_Such\"", "store.s3.bucket"),
        (
            "[store.s3]\nbucket = \"hoard\"\nendpoint = \"ftp://x\"",
            "store.s3.endpoint",
        ),
        (
            "[store.s3]\nbucket = \"hoard\"\naccess_key_id = \"GK1\"",
            "store.s3.secret_access_key_file",
        ),
        (
            "[store.s3]\nbucket = \"hoard\"\nredirect_ttl = \"30d\"",
            "store.s3.redirect_ttl",
        ),
        (
            "[store.s3]\nbucket = \"hoard\"\nprefix = \"a/../b\"",
            "store.s3.prefix",
        ),
    ];
    for (text, key) in refused {
        match from_file(text) {
            Err(ConfigError::Invalid { key: named, .. }) => assert_eq!(named, key, "{text}"),
            other => panic!("{text}: expected an error naming {key}, got {other:?}"),
        }
    }
}

#[test]
fn issue_13_peers_need_a_bucket_and_this_replica_s_url() {
    let config = from_file(
        "[store.s3]\nbucket = \"hoard\"\n[cluster]\nadvertise = \"http://127.0.0.1:5002/\"\npeers = [\"http://127.0.0.1:5001\"]",
    )
    .unwrap();
    let cluster = config.cluster.expect("peers make a cluster");
    match cluster.peers {
        Peers::Static(urls) => assert_eq!(
            urls.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            ["http://127.0.0.1:5001/", "http://127.0.0.1:5002/"],
            "advertise is one of the replicas"
        ),
        other => panic!("{other:?}"),
    }
    let refused = [
        ("[cluster]\nadvertise = \"http://a:1\"\npeers = [\"http://b:1\"]", "cluster.peers"),
        ("[store.s3]\nbucket = \"hoard\"\n[cluster]\npeers = [\"http://b:1\"]", "cluster.advertise"),
        ("[store.s3]\nbucket = \"hoard\"\n[cluster]\nadvertise = \"http://a:1\"", "cluster.advertise"),
        (
            "[store.s3]\nbucket = \"hoard\"\n[cluster]\nadvertise = \"http://a:1\"\npeers = [\"http://b:1/v2\"]",
            "cluster.peers",
        ),
        (
            "[store.s3]\nbucket = \"hoard\"\n[cluster]\nadvertise = \"http://a:1\"\npeers_dns = \"hoard\"",
            "cluster.peers_dns",
        ),
        (
            "[store.s3]\nbucket = \"hoard\"\n[cluster]\nadvertise = \"http://a:1\"\npeers_dns = \"h:1\"\npeers = [\"http://b:1\"]",
            "cluster.peers_dns",
        ),
    ];
    for (text, key) in refused {
        match from_file(text) {
            Err(ConfigError::Invalid { key: named, .. }) => assert_eq!(named, key, "{text}"),
            other => panic!("{text}: expected an error naming {key}, got {other:?}"),
        }
    }
}

#[test]
fn issue_15_a_missing_credential_helper_stops_start_up() {
    let e = from_file("[registries.\"ghcr.io\"]\ncredential_helper = \"hoard-test-absent\"\n")
        .unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("registries.\"ghcr.io\".credential_helper")
            && e.contains("docker-credential-hoard-test-absent is not on PATH"),
        "{e}"
    );
    // The same from a config.json's credsStore (it covers docker.io).
    let dir = tempfile::tempdir().unwrap();
    let docker = dir.path().join("config.json");
    std::fs::write(&docker, r#"{"credsStore": "hoard-test-absent"}"#).unwrap();
    let args = ServeArgs {
        docker_config: Some(docker),
        ..ServeArgs::default()
    };
    let e = Config::load(&args, []).unwrap_err().to_string();
    assert!(
        e.contains("upstream.docker_config") && e.contains("docker-credential-hoard-test-absent"),
        "{e}"
    );
}

#[test]
fn issue_15_a_credential_helper_excludes_a_login_and_its_durations_are_checked() {
    let e = from_file(
        "[registries.\"ghcr.io\"]\ncredential_helper = \"x\"\nusername = \"u\"\npassword = \"p\"\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("exclusive"), "{e}");
    let e = from_env(&[
        ("HOARD_REGISTRY_DOCKER_IO_CREDENTIAL_HELPER", "x"),
        ("HOARD_REGISTRY_DOCKER_IO_CREDENTIAL_TTL", "soon"),
    ])
    .unwrap_err();
    assert!(e.to_string().contains("credential_ttl"), "{e}");
}

#[test]
fn issue_15_the_readme_cloud_examples_use_real_keys() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("## Private registries and cloud credentials")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let blocks: Vec<&str> = section
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(blocks.len(), 5, "ECR, Artifact Registry, ACR, GHCR, Quay");
    let dir = tempfile::tempdir().unwrap();
    for block in blocks {
        // The secrets the examples name, so that only a helper missing on
        // this machine can stop them.
        let mut text = block.to_owned();
        for line in block.lines() {
            if let Some(path) = line.strip_prefix("password_file = ") {
                let file = dir.path().join(path.trim_matches('"').replace('/', "_"));
                std::fs::write(&file, "secret").unwrap();
                text = text.replace(path, &format!("{:?}", file.display().to_string()));
            }
        }
        match from_file(&text) {
            Ok(_) => {}
            Err(e) => assert!(e.to_string().contains("is not on PATH"), "{block}: {e}"),
        }
    }
}
