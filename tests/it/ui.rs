//! Issue 17: the status page's routes and its JSON (`/ui/api/status`): what
//! it shows after pulls, downloads in progress, registry states, logins and
//! `ui.enabled = false`. The page itself runs in a real browser in
//! tests/e2e_ui.rs.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::Notify;

use crate::fake::{Fake, Fault};
use crate::{eventually_async, Hoard};

async fn status(hoard: &Hoard) -> serde_json::Value {
    let r = hoard.get("/ui/api/status").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.headers()["cache-control"], "no-store");
    r.json().await.unwrap()
}

#[tokio::test]
async fn issue_17_the_status_shows_images_hits_registries_and_the_store() {
    let fake = Fake::start().await;
    let (manifest, layer) = fake.put_image("library/app", "1", b"a layer of some bytes");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    for _ in 0..2 {
        assert_eq!(hoard.status("/v2/app/manifests/1").await, 200);
        assert_eq!(hoard.status(&format!("/v2/app/blobs/{layer}")).await, 200);
    }
    let s = status(&hoard).await;
    let images = s["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{s}");
    let image = &images[0];
    assert_eq!(image["registry"], "docker.io");
    assert_eq!(image["repository"], "library/app");
    assert_eq!(image["tag"], "1");
    assert_eq!(image["digest"], manifest);
    assert!(image["size"].as_u64().unwrap() > 20);
    assert!(image["last_pulled"].as_u64().unwrap() > 0);
    // 4 lookups, the first two went upstream.
    assert_eq!(s["total"]["requests"], 4);
    assert_eq!(s["total"]["misses"], 2);
    assert_eq!(s["total"]["hit_ratio"], 0.5);
    assert_eq!(
        s["recent"]["requests"], 4,
        "the last 5 minutes hold all of it"
    );
    assert!(s["total"]["cache_bytes"].as_u64().unwrap() >= 21);
    let docker = s["registries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "docker.io")
        .unwrap()
        .clone();
    assert_eq!(docker["state"], "ok");
    assert_eq!(
        docker["window_seconds"], 21600,
        "the fake announces Docker Hub's window"
    );
    assert!(s["store"]["used_bytes"].as_u64().unwrap() > 0);
    assert!(s["store"]["limit_bytes"].as_u64().unwrap() > 0);
    assert!(s["store"]["disk_free_bytes"].as_u64().is_some());
    // The chart has the activity so far, even before the next sample.
    let points = s["history"].as_array().unwrap();
    let charted: u64 = points.iter().map(|p| p["requests"].as_u64().unwrap()).sum();
    assert_eq!(charted, 4, "{points:?}");
}

#[tokio::test]
async fn issue_17_the_page_and_its_assets_are_served_with_a_strict_policy() {
    let fake = Fake::start().await;
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let page = hoard.get("/ui/").await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("default-src 'self'") && policy.contains("frame-ancestors 'none'"));
    let html = page.text().await.unwrap();
    assert!(
        html.contains(r#"<script src="/ui/app.js""#)
            && !html.contains("http://")
            && !html.contains("https://")
    );
    for (path, kind) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let r = hoard.get(path).await;
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(kind));
    }
    let r = hoard.get("/ui").await;
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "/ui/");
    assert_eq!(hoard.status("/ui/nothing-here").await, 404);
    let post = hoard
        .client
        .post(hoard.url("/ui/api/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
}

#[tokio::test]
async fn issue_17_a_download_in_progress_shows_its_progress_and_readers() {
    let fake = Fake::start().await;
    let data = crate::noise(512 * 1024, 3);
    let (_, layer) = fake.put_image("library/big", "1", &data);
    let gate = Arc::new(Notify::new());
    fake.fault(&layer, Fault::Gate(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let reader = {
        let (client, url) = (
            hoard.client.clone(),
            hoard.url(&format!("/v2/big/blobs/{layer}")),
        );
        tokio::spawn(async move { client.get(url).send().await.unwrap().bytes().await.unwrap() })
    };
    // Part of the blob arrives, then upstream holds the rest.
    let seen = std::sync::Mutex::new(serde_json::Value::Null);
    let shown = eventually_async(Duration::from_secs(10), || async {
        let downloads = status(&hoard).await["downloads"].clone();
        let half = downloads
            .as_array()
            .and_then(|d| d.first())
            .and_then(|d| d["received"].as_u64())
            .is_some_and(|received| received > 0 && received < 512 * 1024);
        *seen.lock().unwrap() = downloads;
        half
    })
    .await;
    let seen = seen.into_inner().unwrap();
    assert!(shown, "{seen}");
    let download = &seen[0];
    assert_eq!(download["registry"], "docker.io");
    assert_eq!(download["repository"], "library/big");
    assert_eq!(download["digest"], layer);
    assert_eq!(download["size"], 512 * 1024);
    assert!(download["readers"].as_u64().unwrap() >= 1);
    gate.notify_one();
    assert_eq!(reader.await.unwrap().len(), data.len());
    let done = eventually_async(Duration::from_secs(10), || async {
        status(&hoard).await["downloads"]
            .as_array()
            .is_some_and(Vec::is_empty)
    })
    .await;
    assert!(done, "a finished download leaves the list");
}

#[tokio::test]
async fn issue_17_a_failing_or_rate_limited_registry_says_so() {
    let fake = Fake::start().await;
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let docker = |s: serde_json::Value| {
        s["registries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "docker.io")
            .unwrap()
            .clone()
    };
    fake.fault("/manifests/", Fault::Status(500, None));
    assert_eq!(hoard.status("/v2/a/manifests/1").await / 100, 5);
    let failing = docker(status(&hoard).await);
    assert_eq!(failing["state"], "unreachable");
    assert_eq!(failing["failures"], 1);
    fake.clear_faults();
    fake.fault("/manifests/", Fault::Status(429, Some(120)));
    assert_eq!(hoard.status("/v2/b/manifests/1").await, 429);
    let limited = docker(status(&hoard).await);
    assert_eq!(limited["state"], "rate_limited");
    let left = limited["retry_in_seconds"].as_u64().unwrap();
    assert!((110..=120).contains(&left), "{left}");
}

#[tokio::test]
async fn issue_17_with_logins_the_page_asks_for_one_and_lists_what_the_user_may_pull() {
    let fake = Fake::start().await;
    fake.put_image("library/public", "1", b"public layer");
    fake.put_image("acme/secret", "1", b"secret layer");
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("admin:{hash}\nguest:{hash}\n")).unwrap();
    let config = dir.path().join("hoard.toml");
    std::fs::write(
        &config,
        "[auth.access]\n\"admin\" = [\"*\"]\n\"guest\" = [\"docker.io/library/*\"]\n",
    )
    .unwrap();
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.config = Some(config);
        args.htpasswd = Some(htpasswd);
    })
    .await;
    let as_user = |user: &str, path: &str| {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:pw"));
        hoard
            .client
            .get(hoard.url(path))
            .header("authorization", format!("Basic {token}"))
            .send()
    };
    for path in [
        "/v2/library/public/manifests/1",
        "/v2/acme/secret/manifests/1",
    ] {
        assert_eq!(as_user("admin", path).await.unwrap().status(), 200);
    }
    for path in ["/ui/", "/ui/api/status"] {
        let r = hoard.get(path).await;
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic"));
    }
    let names = |s: serde_json::Value| -> Vec<String> {
        s["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["repository"].as_str().unwrap().to_owned())
            .collect()
    };
    let admin: serde_json::Value = as_user("admin", "/ui/api/status")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut all = names(admin);
    all.sort();
    assert_eq!(all, ["acme/secret", "library/public"]);
    let guest: serde_json::Value = as_user("guest", "/ui/api/status")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = guest.to_string();
    assert_eq!(names(guest), ["library/public"]);
    assert!(
        !text.contains("secret"),
        "nothing of what guest may not pull: {text}"
    );
}

#[tokio::test]
async fn issue_17_ui_enabled_false_turns_the_page_off() {
    let fake = Fake::start().await;
    let hoard = Hoard::start(&fake.url(), &[], |args| args.ui = Some(false)).await;
    for path in ["/ui/", "/ui/api/status", "/ui/app.js"] {
        assert_eq!(hoard.status(path).await, 404, "{path}");
    }
    assert_eq!(hoard.status("/v2/").await, 200);
}
