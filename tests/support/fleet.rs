//! The parts of a fleet, real and started by the test: Garage (a real S3
//! server, `cargo install --locked garage`), hoard replicas that know each
//! other's addresses before they start, and nginx balancing over them.
//!
//! Ports: Garage binds port 0 but does not say which port it got, so its
//! listening sockets are read from /proc and told apart by asking each one
//! (the admin API answers its bearer token, S3 answers XML). hoard and
//! nginx get sockets the test bound on port 0 itself: hoard through systemd
//! socket activation (`LISTEN_FDS`), nginx through its own inherited-socket
//! variable (`NGINX`), so every replica's URL is known before any starts.

use std::net::TcpListener;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{hoard_command, require_tool, Daemon, HoardProcess};

/// A single-node Garage with one bucket and one key allowed on it.
pub struct Garage {
    pub daemon: Daemon,
    /// `http://127.0.0.1:PORT`, path-style S3.
    pub endpoint: String,
    admin: String,
    token: String,
    pub bucket: String,
    bucket_id: String,
    pub key_id: String,
    /// The key's secret, in a file (hoard's `secret_access_key_file`).
    pub secret_file: PathBuf,
    pub secret: String,
    dir: tempfile::TempDir,
}

impl Garage {
    pub fn start() -> Garage {
        let bin = require_tool("garage");
        let dir = tempfile::tempdir().unwrap();
        let token = hex::encode(rand_bytes(16));
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:0"
rpc_public_addr = "127.0.0.1:0"
rpc_secret = "{secret}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:0"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:0"
admin_token = "{token}"
"#,
                meta = dir.path().join("meta").display(),
                data = dir.path().join("data").display(),
                secret = hex::encode(rand_bytes(32)),
            ),
        )
        .unwrap();
        let mut daemon = Daemon::spawn(
            "garage",
            Command::new(bin).arg("-c").arg(&config).arg("server"),
            dir.path().join("garage.log"),
        );
        daemon.wait_for_line("Admin API server listening", |_| Some(()));
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        // Which listening socket is which: ask each.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (admin, endpoint) = loop {
            let mut admin = None;
            let mut s3 = None;
            for port in listening_ports(daemon.pid()) {
                let url = format!("http://127.0.0.1:{port}");
                let answer = client
                    .get(format!("{url}/v2/GetClusterHealth"))
                    .bearer_auth(&token)
                    .send();
                if let Ok(r) = answer {
                    if r.status() == 200 {
                        admin = Some(url);
                    } else if r.text().unwrap_or_default().contains("<Error>") {
                        s3 = Some(url);
                    }
                }
            }
            if let (Some(admin), Some(s3)) = (admin, s3) {
                break (admin, s3);
            }
            assert!(
                Instant::now() < deadline,
                "cannot find Garage's admin and S3 ports:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let call = |op: &str, body: serde_json::Value| -> serde_json::Value {
            let r = client
                .post(format!("{admin}/v2/{op}"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .unwrap_or_else(|e| panic!("garage {op}: {e}"));
            let status = r.status();
            let text = r.text().unwrap();
            assert!(status.is_success(), "garage {op}: {status} {text}");
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
        };
        let status: serde_json::Value = client
            .get(format!("{admin}/v2/GetClusterStatus"))
            .bearer_auth(&token)
            .send()
            .and_then(|r| r.text())
            .map(|t| serde_json::from_str(&t).expect("garage answers JSON"))
            .unwrap();
        let node = status["nodes"][0]["id"].as_str().unwrap().to_owned();
        call(
            "UpdateClusterLayout",
            serde_json::json!({"roles": [{"id": node, "zone": "dc1", "capacity": 10_000_000_000u64, "tags": []}]}),
        );
        call("ApplyClusterLayout", serde_json::json!({"version": 1}));
        let bucket = "hoard".to_owned();
        let created = call("CreateBucket", serde_json::json!({"globalAlias": bucket}));
        let bucket_id = created["id"].as_str().unwrap().to_owned();
        let key = call("CreateKey", serde_json::json!({"name": "hoard"}));
        let key_id = key["accessKeyId"].as_str().unwrap().to_owned();
        let secret = key["secretAccessKey"].as_str().unwrap().to_owned();
        call(
            "AllowBucketKey",
            serde_json::json!({"bucketId": bucket_id, "accessKeyId": key_id,
                "permissions": {"read": true, "write": true, "owner": true}}),
        );
        let secret_file = dir.path().join("s3-secret");
        std::fs::write(&secret_file, &secret).unwrap();
        Garage {
            daemon,
            endpoint,
            admin,
            token,
            bucket,
            bucket_id,
            key_id,
            secret_file,
            secret,
            dir,
        }
    }

    /// The bucket's counters: objects, bytes, unfinished multipart uploads.
    pub fn bucket_info(&self) -> serde_json::Value {
        reqwest::blocking::Client::new()
            .get(format!(
                "{}/v2/GetBucketInfo?id={}",
                self.admin, self.bucket_id
            ))
            .bearer_auth(&self.token)
            .send()
            .and_then(|r| r.text())
            .map(|t| serde_json::from_str(&t).expect("garage answers JSON"))
            .unwrap()
    }

    /// hoard's flags for this bucket.
    pub fn hoard_args(&self) -> Vec<String> {
        vec![
            "--s3-endpoint".into(),
            self.endpoint.clone(),
            "--s3-bucket".into(),
            self.bucket.clone(),
            "--s3-region".into(),
            "garage".into(),
        ]
    }

    /// `hoard_args`, and `upstream` as Docker Hub.
    pub fn hoard_args_to(&self, upstream: &str) -> Vec<String> {
        let mut args = self.hoard_args();
        args.extend(["--upstream".into(), format!("docker.io={upstream}")]);
        args
    }

    /// hoard's environment for this bucket's key (the AWS chain).
    pub fn hoard_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
        ]
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel
    /// and never answered, the worst way an object store fails.
    pub fn freeze(&self) {
        signal(self.daemon.pid(), "STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        signal(self.daemon.pid(), "CONT");
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        // A frozen process ignores SIGTERM until it runs again.
        self.thaw();
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

fn rand_bytes(n: usize) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = vec![0; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut out)
        .unwrap();
    out
}

/// TCP ports `pid` listens on (from /proc: its socket inodes, matched in
/// /proc/net/tcp's LISTEN rows).
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = Vec::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy().into_owned();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                {
                    inodes.push(inode.to_owned());
                }
            }
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let mut ports = Vec::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10 || fields[3] != "0A" || !inodes.iter().any(|i| i == fields[9]) {
            continue;
        }
        if let Some(port) = fields[1]
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        {
            ports.push(port);
        }
    }
    ports
}

/// A TCP port on 127.0.0.1 that refuses connections: bound here (port 0)
/// and never listening, for as long as the returned socket lives.
pub fn refusing_port() -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket calls on a fresh fd that the OwnedFd then owns;
    // the address structs are fully initialised before use.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let bound = libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len);
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        let mut got: libc::sockaddr_in = std::mem::zeroed();
        let mut got_len = len;
        libc::getsockname(fd, &mut got as *mut _ as *mut libc::sockaddr, &mut got_len);
        (owned, u16::from_be(got.sin_port))
    }
}

/// A socket bound on 127.0.0.1 port 0, to hand to a process it starts.
pub fn bound() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// `command` with `listener` as its fd 3 (inherited across exec).
fn hand_over(command: &mut Command, listener: &TcpListener) {
    let fd = listener.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls: dup2
    // (the copy has no CLOEXEC), or, when the socket already is fd 3,
    // fcntl to clear its CLOEXEC.
    unsafe {
        command.pre_exec(move || {
            let result = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if result < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A hoard replica on `listener` (socket activation), its store in `data`,
/// with the fleet's bucket and peers in `args`.
pub fn replica(
    data: tempfile::TempDir,
    listener: &TcpListener,
    args: &[String],
    env: &[(&'static str, String)],
) -> HoardProcess {
    // LISTEN_PID must be hoard's own pid: a shell sets it to its own, then
    // execs hoard in its place.
    let hoard = hoard_command();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
        .arg(hoard.get_program())
        .arg("serve")
        .arg("--data-dir")
        .arg(data.path().join("store"))
        .args(args)
        .env_remove("HOARD_CONFIG")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    hand_over(&mut command, listener);
    HoardProcess::spawn(data, command)
}

/// nginx in front of `upstreams` on the socket `listener`: a round-robin
/// balancer (`start`) or a relay limiting its rate, as an internet link
/// does (`relay`). Its access log lines are `METHOD URI STATUS RANGE BYTES`
/// (`RANGE` is `-` without a `Range` header).
pub struct Nginx {
    pub daemon: Daemon,
    pub url: String,
    dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(listener: &TcpListener, upstreams: &[String]) -> Nginx {
        Nginx::with(
            listener,
            upstreams,
            "proxy_buffering off; proxy_next_upstream error timeout http_502 http_503;",
        )
    }

    /// A relay to `upstream` sending at most `rate` bytes per second per
    /// connection (nginx's `limit_rate`, e.g. `16m`).
    pub fn relay(listener: &TcpListener, upstream: &str, rate: &str) -> Nginx {
        Nginx::with(
            listener,
            &[upstream.to_owned()],
            // Buffered: nginx applies limit_rate to what it writes
            // from its buffers, not to an unbuffered pass-through.
            &format!("limit_rate {rate};"),
        )
    }

    /// The access log's lines so far.
    pub fn access_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn with(listener: &TcpListener, upstreams: &[String], directives: &str) -> Nginx {
        let bin = require_tool("nginx");
        let dir = tempfile::tempdir().unwrap();
        let addr = listener.local_addr().unwrap();
        let servers: String = upstreams
            .iter()
            .map(|u| format!("    server {};\n", u.trim_start_matches("http://")))
            .collect();
        let d = dir.path().display();
        let config = format!(
            r#"daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  log_format ranges '$request_method $request_uri $status $http_range $body_bytes_sent';
  access_log {d}/access.log ranges;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream hoard {{
{servers}  }}
  server {{
    listen {addr};
    location / {{
      proxy_pass http://hoard;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_request_buffering off;
      proxy_read_timeout 120s;
      {directives}
    }}
  }}
}}
"#
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new(bin);
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .env("NGINX", "3;");
        hand_over(&mut command, listener);
        let mut daemon = Daemon::spawn("nginx", &mut command, dir.path().join("nginx.log"));
        let url = format!("http://{addr}");
        daemon.wait_http(&format!("{url}/v2/"));
        Nginx { daemon, url, dir }
    }
}
