//! End to end, issue 17: the status page in a real browser. Debian's
//! `chromium` (headless), driven by Playwright (`playwright-core` from npm,
//! in tests/ui; scripts/test.sh installs it), loads hoard's `/ui/` after
//! skopeo pulled images through it from a real distribution upstream; then
//! the upstream is stopped and the page must say so after its next refresh.
//! Screenshots go to target/ui/. A missing tool fails the test.

mod support;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// `node` with tests/ui's packages, and chromium.
fn browser_tools() -> (PathBuf, PathBuf) {
    let node = require_tool("node");
    let chromium = require_tool("chromium");
    let modules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/node_modules/playwright-core");
    assert!(
        modules.is_dir(),
        "playwright-core is not installed: run scripts/test.sh (it runs `npm ci --prefix tests/ui`)"
    );
    (node, chromium)
}

/// Kills the browser driver if the test fails half way.
struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn issue_17_the_status_page_shows_the_mirror_and_a_failing_upstream() {
    let (node, chromium) = browser_tools();
    let upstream = Distribution::start();
    seed(&upstream);
    let hoard = HoardProcess::start(&upstream.url(), &[]);
    let pulled = tempfile::tempdir().unwrap();
    // Each image twice: the second pull is answered from the cache.
    for (n, image) in ["library/alpine-like:3", "owner/app:1.0", "library/multi:1"]
        .iter()
        .enumerate()
    {
        for round in 0..2 {
            skopeo_copy(
                &hoard.addr(),
                image,
                &pulled.path().join(format!("{n}-{round}")),
            );
        }
    }
    // Taken in the test's own folder, then copied under target/ui.
    let shot_dir = tempfile::tempdir().unwrap();
    let shots = shot_dir.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/status-page.mjs");
    let mut driver = Driver(
        Command::new(node)
            .arg(script)
            .arg(format!("http://{}", hoard.addr()))
            .arg(shots)
            .args([
                "docker.io/library/alpine-like:3",
                "docker.io/owner/app:1.0",
                "docker.io/library/multi:1",
            ])
            .env("CHROMIUM", chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut said = BufReader::new(driver.0.stdout.take().unwrap()).lines();
    let mut expect = |line: &str| {
        let got = said.next().map(|l| l.unwrap_or_default());
        assert_eq!(
            got.as_deref(),
            Some(line),
            "the browser checks (stderr above)"
        );
    };
    expect("phase1 ok");

    // The upstream goes away; the next pull of something not cached fails,
    // and the page's next refresh must say the registry is failing.
    drop(upstream);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let status = client
        .get(format!(
            "http://{}/v2/library/absent/manifests/1",
            hoard.addr()
        ))
        .send()
        .unwrap()
        .status();
    assert_eq!(status.as_u16() / 100, 5, "{status}");
    let mut stdin = driver.0.stdin.take().unwrap();
    writeln!(stdin, "upstream down").unwrap();
    drop(stdin);
    expect("phase2 ok");
    let exit = driver.0.wait().unwrap();
    assert!(exit.success(), "{exit}");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let kept = target.join("ui");
    std::fs::create_dir_all(&kept).unwrap();
    for shot in ["status.png", "status-phone.png", "status-failing.png"] {
        assert!(shots.join(shot).is_file(), "{shot} saved");
        std::fs::copy(shots.join(shot), kept.join(shot)).unwrap();
    }
}
