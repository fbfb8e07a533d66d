//! Client logins (htpasswd, HTTP Basic) and access rules: who may pull
//! which repositories, and that private content cached for one client is
//! not served to another who may not see it.

use std::time::Duration;

use base64::Engine as _;

use crate::fake::Fake;
use crate::{error_code, Hoard};

/// Failed logins from one address before it gets 429.
const MAX_FAILED_LOGINS: u32 = 10;

const CONFIG: &str = r#"
[auth]
realm = "office mirror"
[auth.groups]
ci = ["runner"]
[auth.access]
"group:ci" = ["ghcr.io/acme/*", "docker.io/*"]
"guest" = ["docker.io/library/*"]
"anonymous" = ["docker.io/library/*"]
"#;

/// hoard with users runner (group ci) and guest, and the rules above.
async fn start(fake: &Fake) -> (tempfile::TempDir, Hoard) {
    start_with(fake, CONFIG).await
}

/// hoard with users runner and guest and the auth config `config`.
async fn start_with(fake: &Fake, config_text: &str) -> (tempfile::TempDir, Hoard) {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("runner:{hash}\nguest:{hash}\n")).unwrap();
    let config = dir.path().join("hoard.toml");
    std::fs::write(&config, config_text).unwrap();
    let ghcr = format!("ghcr.io={}", fake.url());
    let hoard = Hoard::start(&fake.url(), &[&ghcr], |args| {
        args.config = Some(config);
        args.htpasswd = Some(htpasswd);
    })
    .await;
    (dir, hoard)
}

fn basic(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

async fn get(hoard: &Hoard, path: &str, login: Option<(&str, &str)>) -> reqwest::Response {
    let mut request = hoard.client.get(hoard.url(path));
    if let Some((user, password)) = login {
        request = request.header("authorization", basic(user, password));
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn the_base_check_challenges_and_a_wrong_password_gets_only_401() {
    let fake = Fake::start().await;
    let (_dir, hoard) = start(&fake).await;

    let r = get(&hoard, "/v2/", None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"office mirror\""
    );
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    assert_eq!(
        get(&hoard, "/v2/", Some(("runner", "pw"))).await.status(),
        200
    );

    let r = get(
        &hoard,
        "/v2/acme/app/manifests/1?ns=ghcr.io",
        Some(("runner", "nope")),
    )
    .await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(fake.hits("GET", "/v2/"), 0, "nothing went upstream");
    assert_eq!(fake.hits("HEAD", "/v2/"), 0);

    // /metrics and /healthz stay open unless protect_metrics is set.
    assert_eq!(get(&hoard, "/metrics", None).await.status(), 200);
    assert_eq!(get(&hoard, "/healthz", None).await.status(), 200);
}

#[tokio::test]
async fn rules_decide_per_user_group_and_anonymous() {
    let fake = Fake::start().await;
    let (manifest, _) = fake.put_image("library/alpine", "3", b"public layer");
    fake.put_image("acme/app", "1", b"private layer");
    let (_dir, hoard) = start(&fake).await;

    // Public Docker Hub images: anonymous and guest.
    let path = format!("/v2/library/alpine/manifests/{manifest}");
    assert_eq!(get(&hoard, &path, None).await.status(), 200);
    assert_eq!(
        get(&hoard, &path, Some(("guest", "pw"))).await.status(),
        200
    );

    // acme's private images: only the ci group.
    let private = "/v2/acme/app/manifests/1?ns=ghcr.io";
    let r = get(&hoard, private, Some(("guest", "pw"))).await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
    let r = get(&hoard, private, None).await;
    assert_eq!(r.status(), 401, "anonymous clients are asked to log in");
    assert_eq!(
        get(&hoard, private, Some(("runner", "pw"))).await.status(),
        200
    );
}

#[tokio::test]
async fn a_cached_private_blob_is_not_served_to_a_client_without_access() {
    let fake = Fake::start().await;
    let (_, secret) = fake.put_image("acme/app", "1", b"private bytes");
    fake.put_image("library/alpine", "3", b"public layer");
    let (_dir, hoard) = start(&fake).await;

    // Cached for the allowed user.
    let r = get(
        &hoard,
        &format!("/v2/acme/app/blobs/{secret}?ns=ghcr.io"),
        Some(("runner", "pw")),
    )
    .await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"private bytes");
    assert_eq!(fake.hits("GET", "/blobs/"), 1);

    // Same repository, by digest: refused.
    let r = get(
        &hoard,
        &format!("/v2/acme/app/blobs/{secret}?ns=ghcr.io"),
        Some(("guest", "pw")),
    )
    .await;
    assert_eq!(r.status(), 403);
    // Through a repository the guest may see: upstream says that one does
    // not hold it, so it is not served from the cache either.
    for login in [Some(("guest", "pw")), None] {
        let r = get(&hoard, &format!("/v2/library/alpine/blobs/{secret}"), login).await;
        assert_eq!(r.status(), 404);
        assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    }
    assert_eq!(fake.hits("GET", "/blobs/"), 1, "never fetched again");
}

#[tokio::test]
async fn repeated_failed_logins_from_one_address_are_throttled() {
    let fake = Fake::start().await;
    let (_dir, hoard) = start(&fake).await;
    for _ in 0..MAX_FAILED_LOGINS {
        assert_eq!(
            get(&hoard, "/v2/", Some(("runner", "guess")))
                .await
                .status(),
            401
        );
    }
    let r = get(&hoard, "/v2/", Some(("runner", "pw"))).await;
    assert_eq!(r.status(), 429);
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    // Clients that do not try to log in are not affected.
    assert_eq!(get(&hoard, "/healthz", None).await.status(), 200);
}

#[tokio::test]
async fn protect_metrics_puts_metrics_and_healthz_behind_the_login() {
    let fake = Fake::start().await;
    let (_dir, hoard) = start_with(&fake, "[auth]\nprotect_metrics = true\n").await;
    for path in ["/metrics", "/healthz"] {
        let r = get(&hoard, path, None).await;
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers().contains_key("www-authenticate"));
        assert_eq!(get(&hoard, path, Some(("guest", "pw"))).await.status(), 200);
    }
}

#[tokio::test]
async fn a_changed_htpasswd_file_is_read_again() {
    let fake = Fake::start().await;
    let every = Duration::from_millis(100);
    let config = CONFIG.replace("[auth]\n", "[auth]\nreload_interval = \"100ms\"\n");
    let (dir, hoard) = start_with(&fake, &config).await;
    let newcomer = Some(("newcomer", "pw2"));
    assert_eq!(get(&hoard, "/v2/", newcomer).await.status(), 401);
    let hash = bcrypt::hash("pw2", 4).unwrap();
    std::fs::write(dir.path().join("htpasswd"), format!("newcomer:{hash}\n")).unwrap();
    // Polled with the new login, which fails until the file is read again.
    // Each failure counts towards the failed-login limit (10 a minute), so
    // polls are one reload interval apart: the file is read again by the
    // second, and the limit is never reached.
    let mut failures = 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = get(&hoard, "/v2/", newcomer).await.status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 401);
        failures += 1;
        assert!(
            failures < MAX_FAILED_LOGINS && tokio::time::Instant::now() < deadline,
            "the changed htpasswd file was not read again ({failures} failed logins)"
        );
        tokio::time::sleep(every).await;
    }
    // And the users that went with the old file are gone.
    assert_eq!(
        get(&hoard, "/v2/", Some(("guest", "pw"))).await.status(),
        401
    );
}
