//! Records the git commit the binary was built from, for `hoard --version`.
//! Outside a git checkout (a Docker build context without .git) the
//! `HOARD_GIT_COMMIT` environment variable may supply it; else "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=HOARD_GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::env::var("HOARD_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=HOARD_GIT_COMMIT={commit}");
}
