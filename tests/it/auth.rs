//! Upstream auth: the token flow, token caching, and credentials that never
//! reach a redirected host or come from a client.

use crate::fake::{digest_of, Fake};
use crate::{error_code, Hoard};

#[tokio::test]
async fn token_flow_is_answered_and_cached_per_scope() {
    let fake = Fake::start().await;
    fake.require_token("tok-123", None);
    let (_, layer) = fake.put_image("library/alpine", "1", b"authed layer");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    assert_eq!(hoard.status("/v2/alpine/manifests/1").await, 200);
    let r = hoard.get(&format!("/v2/alpine/blobs/{layer}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"authed layer");
    assert_eq!(fake.hits("GET", "/token"), 1, "{:?}", fake.all_hits());
    // The second request used the cached token: only the first got a 401.
    let challenged = fake
        .state
        .authorizations
        .lock()
        .unwrap()
        .iter()
        .filter(|(line, auth)| line.contains("/v2/") && auth.is_none())
        .count();
    assert_eq!(challenged, 1);
}

#[tokio::test]
async fn configured_credentials_go_to_the_token_endpoint() {
    let fake = Fake::start().await;
    // "bot:s3cret" in base64.
    fake.require_token("tok-xyz", Some("Basic Ym90OnMzY3JldA=="));
    fake.put_image("library/private", "1", b"p");
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        let dir = tempfile::tempdir().unwrap().keep();
        let path = dir.join("hoard.toml");
        std::fs::write(
            &path,
            "[registries.\"docker.io\"]\nusername = \"bot\"\npassword = \"s3cret\"\n",
        )
        .unwrap();
        args.config = Some(path);
    })
    .await;
    assert_eq!(hoard.status("/v2/private/manifests/1").await, 200);
}

#[tokio::test]
async fn redirected_blob_downloads_never_carry_the_token() {
    let registry = Fake::start().await;
    let cdn = Fake::start().await;
    registry.require_token("secret-token", None);
    registry.redirect_blobs_to(&cdn.url());
    let layer = b"layer served by the cdn".to_vec();
    let (_, layer_digest) = registry.put_image("library/alpine", "1", &layer);
    cdn.put_blob("cdn", layer.clone());
    let hoard = Hoard::start(&registry.url(), &[], |_| {}).await;
    let r = hoard.get(&format!("/v2/alpine/blobs/{layer_digest}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r.bytes().await.unwrap()), layer_digest);
    assert_eq!(cdn.hits("GET", "/cdn/"), 1);
    let cdn_auth = cdn.state.authorizations.lock().unwrap().clone();
    assert!(
        cdn_auth.iter().all(|(_, auth)| auth.is_none()),
        "{cdn_auth:?}"
    );
    // The registry itself did get the token.
    assert!(registry
        .state
        .authorizations
        .lock()
        .unwrap()
        .iter()
        .any(|(_, auth)| auth.as_deref() == Some("Bearer secret-token")));
}

#[tokio::test]
async fn client_authorization_is_never_forwarded() {
    let fake = Fake::start().await;
    let (_, layer) = fake.put_image("library/alpine", "1", b"x");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    for path in [
        "/v2/alpine/manifests/1".to_owned(),
        format!("/v2/alpine/blobs/{layer}"),
    ] {
        let r = hoard
            .client
            .get(hoard.url(&path))
            .header("authorization", "Basic Y2xpZW50OmNsaWVudC1zZWNyZXQ=")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let seen = fake.state.authorizations.lock().unwrap().clone();
    assert!(seen.iter().all(|(_, auth)| auth.is_none()), "{seen:?}");
}

#[tokio::test]
async fn failing_token_endpoint_is_a_502_and_nothing_is_stored() {
    let fake = Fake::start().await;
    fake.require_token("t", None);
    fake.fail_token_endpoint();
    fake.put_image("library/alpine", "1", b"x");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard.get("/v2/alpine/manifests/1").await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    assert_eq!(hoard.blob_files(), 0);
}

#[tokio::test]
async fn a_password_file_supplies_the_password() {
    let fake = Fake::start().await;
    // "bot:from-a-file" in base64.
    fake.require_token("tok-f", Some("Basic Ym90OmZyb20tYS1maWxl"));
    fake.put_image("library/private", "1", b"p");
    let dir = tempfile::tempdir().unwrap();
    // As a mounted Kubernetes secret: the value, then a newline.
    std::fs::write(dir.path().join("password"), "from-a-file\n").unwrap();
    let config = dir.path().join("hoard.toml");
    std::fs::write(
        &config,
        format!(
            "[registries.\"docker.io\"]\nusername = \"bot\"\npassword_file = \"{}\"\n",
            dir.path().join("password").display()
        ),
    )
    .unwrap();
    let hoard = Hoard::start(&fake.url(), &[], |args| args.config = Some(config)).await;
    assert_eq!(hoard.status("/v2/private/manifests/1").await, 200);
}

#[tokio::test]
async fn docker_config_json_credentials_and_identity_tokens() {
    let fake = Fake::start().await;
    fake.require_refresh_token("tok-r", "refresh-canary");
    fake.put_image("library/private", "1", b"p");
    let dir = tempfile::tempdir().unwrap();
    let docker_config = dir.path().join("config.json");
    std::fs::write(
        &docker_config,
        r#"{"auths": {"https://index.docker.io/v1/": {"auth": "", "identitytoken": "refresh-canary"}}}"#,
    )
    .unwrap();
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.docker_config = Some(docker_config)
    })
    .await;
    assert_eq!(hoard.status("/v2/private/manifests/1").await, 200);
    let posts = fake.token_posts();
    assert_eq!(posts.len(), 1, "one exchange, then the token is cached");
    assert!(posts[0].contains("grant_type=refresh_token"), "{posts:?}");
}

/// A credential helper for the tests below: `docker-credential-it` in its
/// own temp dir, counting its runs in `runs` and then running `body`.
struct Helper {
    dir: tempfile::TempDir,
}

impl Helper {
    fn new(body: &str) -> Helper {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        crate::support::credential_helper(
            dir.path(),
            "it",
            &format!("read server\necho run >> {}\n{body}", runs.display()),
        );
        Helper { dir }
    }

    /// Answers `bot` with the password in the file `password`.
    fn with_password(password: &str) -> Helper {
        let helper = Helper::new(
            r#"printf '{"Username":"bot","Secret":"%s"}' "$(cat "$(dirname "$0")/password")""#,
        );
        helper.set_password(password);
        helper
    }

    fn set_password(&self, password: &str) {
        std::fs::write(self.dir.path().join("password"), password).unwrap();
    }

    fn runs(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("runs"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    fn config(&self) -> hoard::config::CredentialHelper {
        hoard::config::CredentialHelper {
            name: "it".into(),
            program: self.dir.path().join("docker-credential-it"),
            server: "https://index.docker.io/v1/".into(),
            ttl: std::time::Duration::from_secs(3600),
            timeout: std::time::Duration::from_secs(10),
        }
    }

    /// hoard with this helper for `docker.io` (mapped to `fake`).
    async fn hoard(&self, fake: &Fake) -> Hoard {
        self.hoard_with(fake, |_| {}).await
    }

    async fn hoard_with(
        &self,
        fake: &Fake,
        tweak: impl FnOnce(&mut hoard::config::Config),
    ) -> Hoard {
        let helper = self.config();
        Hoard::start_with_config(&fake.url(), |config| {
            config
                .upstream
                .registries
                .get_mut("docker.io")
                .unwrap()
                .helper = Some(helper);
            tweak(config);
        })
        .await
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

#[tokio::test]
async fn issue_15_credentials_the_token_endpoint_refuses_are_fetched_again_once() {
    let helper = Helper::with_password("old");
    let fake = Fake::start().await;
    fake.require_token("tok-old", Some(&basic("bot", "old")));
    for tag in ["1", "2", "3", "4", "5"] {
        fake.put_image("library/private", tag, tag.as_bytes());
    }
    let hoard = helper.hoard(&fake).await;
    assert_eq!(hoard.status("/v2/private/manifests/1").await, 200);
    assert_eq!(helper.runs(), 1);

    // Rotated: the old token and password are refused; the helper now
    // hands out the new password.
    fake.require_token("tok-new", Some(&basic("bot", "new")));
    helper.set_password("new");
    assert_eq!(hoard.status("/v2/private/manifests/2").await, 200);
    assert_eq!(
        helper.runs(),
        2,
        "the token endpoint's 401 ran the helper again"
    );
    assert_eq!(hoard.status("/v2/private/manifests/3").await, 200);
    assert_eq!(helper.runs(), 2, "and its answer is kept");

    // A helper that keeps handing out a refused password: the requests
    // fail, and its answer (itself fetched after a refusal) is kept a while
    // rather than fetched again for each of them.
    fake.require_token("tok-newer", Some(&basic("bot", "newer")));
    assert_eq!(hoard.status("/v2/private/manifests/4").await / 100, 5);
    assert_eq!(hoard.status("/v2/private/manifests/5").await / 100, 5);
    assert_eq!(helper.runs(), 2);
}

#[tokio::test]
async fn issue_15_a_registry_403_runs_the_helper_again_once_and_not_per_request() {
    let helper = Helper::with_password("pw");
    let fake = Fake::start().await;
    fake.require_token("tok", Some(&basic("bot", "pw")));
    for tag in ["1", "2", "3"] {
        fake.put_image("library/private", tag, tag.as_bytes());
    }
    let hoard = helper.hoard(&fake).await;
    assert_eq!(hoard.status("/v2/private/manifests/1").await, 200);
    assert_eq!(helper.runs(), 1);
    fake.fault("manifests/2", crate::fake::Fault::Status(403, None));
    fake.fault("manifests/3", crate::fake::Fault::Status(403, None));
    // The 403 may mean rotated credentials (ECR answers 403 to an expired
    // token): one new run, one retry, then the denial stands.
    let before = fake.hits("GET", "/v2/library/private/manifests/2");
    assert_eq!(hoard.status("/v2/private/manifests/2").await, 403);
    assert_eq!(helper.runs(), 2);
    assert_eq!(
        fake.hits("GET", "/v2/library/private/manifests/2") - before,
        2
    );
    // The answer fetched after that refusal is kept: a repository the
    // credentials may not read does not run the helper per request, nor is
    // the request sent again with the same credentials.
    let before = fake.hits("GET", "/v2/library/private/manifests/3");
    assert_eq!(hoard.status("/v2/private/manifests/3").await, 403);
    assert_eq!(helper.runs(), 2);
    assert_eq!(
        fake.hits("GET", "/v2/library/private/manifests/3") - before,
        1
    );
}

/// A registry whose token endpoint takes the helper's login (`bot`, `pw`)
/// and whose blob GETs redirect to a blob store (`cdn`); one image, whose
/// layer digest comes back.
async fn behind_a_blob_store() -> (Fake, Fake, String) {
    let fake = Fake::start().await;
    let cdn = Fake::start().await;
    fake.require_token("tok", Some(&basic("bot", "pw")));
    fake.redirect_blobs_to(&cdn.url());
    let (_, layer) = fake.put_image("library/private", "1", b"layer");
    cdn.put_blob("cdn", b"layer".to_vec());
    (fake, cdn, layer)
}

#[tokio::test]
async fn issue_15_a_missing_repository_or_a_blob_stores_403_is_not_a_refused_login() {
    let helper = Helper::with_password("pw");
    let (fake, cdn, layer) = behind_a_blob_store().await;
    let hoard = helper.hoard(&fake).await;
    assert_eq!(hoard.status("/v2/private/manifests/1").await, 200);
    assert_eq!(helper.runs(), 1);

    // Docker Hub's answer for a repository that does not exist: a 401
    // saying the token lacks the scope. The login is fine.
    fake.fault("library/absent/", crate::fake::Fault::InsufficientScope);
    assert_eq!(hoard.status("/v2/absent/manifests/1").await, 401);
    // A signed blob-store URL that answers 403 (expired, clock skew): not
    // the registry refusing the login either.
    cdn.fault("/cdn/", crate::fake::Fault::Status(403, None));
    let status = hoard.status(&format!("/v2/private/blobs/{layer}")).await;
    assert!(status >= 400, "{status}");
    assert_eq!(
        cdn.hits("GET", "/cdn/"),
        1,
        "asked once, not again after a new run"
    );
    assert_eq!(helper.runs(), 1, "neither ran the helper again");
}

#[tokio::test]
async fn issue_15_a_challenge_from_a_redirect_target_gets_no_login() {
    // A blob store answering 401 with a token service of its own: the
    // helper's password must not go there.
    let helper = Helper::with_password("pw");
    let (fake, cdn, layer) = behind_a_blob_store().await;
    cdn.fault("/cdn/", crate::fake::Fault::InsufficientScope);
    let hoard = helper.hoard(&fake).await;
    // The token for the repository is cached: the blob GET carries it, and
    // the first answer it gets is the blob store's challenge.
    assert_eq!(hoard.status("/v2/private/manifests/1").await, 200);
    let status = hoard.status(&format!("/v2/private/blobs/{layer}")).await;
    assert!(status >= 400, "{status}");
    assert_eq!(cdn.hits("GET", "/token"), 0, "{:?}", cdn.all_hits());
    assert!(cdn
        .state
        .authorizations
        .lock()
        .unwrap()
        .iter()
        .all(|(_, auth)| auth.is_none()));
}

#[tokio::test]
async fn issue_15_a_basic_registry_refusing_no_credentials_runs_the_helper_again() {
    // ECR-like: a Basic challenge. The helper's first run finds nothing
    // (ecr-login says "not found" for any failure, an STS hiccup); the
    // registry's challenge then runs it again, and that answer is used.
    let helper = Helper::new(&format!(
        r#"[ "$(wc -l < "$(dirname "$0")/runs")" -gt 1 ] || {{ echo '{}'; exit 1; }}
echo '{{"Username":"AWS","Secret":"ecr-token"}}'"#,
        "credentials not found in native keychain"
    ));
    let fake = Fake::start().await;
    fake.require_basic(&basic("AWS", "ecr-token"));
    fake.put_image("library/private", "1", b"p1");
    fake.put_image("library/private", "2", b"p2");
    let hoard = helper.hoard(&fake).await;
    assert_eq!(hoard.status("/v2/private/manifests/1").await, 200);
    assert_eq!(helper.runs(), 2);
    assert_eq!(hoard.status("/v2/private/manifests/2").await, 200);
    assert_eq!(
        helper.runs(),
        2,
        "the Basic login is made from the kept answer"
    );
}

#[tokio::test]
async fn issue_15_a_helper_run_outlives_a_request_given_up_at_its_deadline() {
    // The helper takes longer than the response deadline: the first client
    // gets a 503 with Retry-After, and the run goes on rather than being
    // killed with the request, so a retry finds its answer. A tag list is
    // asked for: unlike a manifest fetch, it is not carried on in a task of
    // its own past the deadline, so only the run's own task keeps it going.
    let helper = Helper::new(r#"sleep 1; echo '{"Username":"bot","Secret":"pw"}'"#);
    let fake = Fake::start().await;
    fake.require_token("tok", Some(&basic("bot", "pw")));
    fake.put_image("library/private", "1", b"p1");
    let hoard = helper
        .hoard_with(&fake, |config| {
            config.limits.response_deadline = std::time::Duration::from_millis(300);
        })
        .await;
    let r = hoard.get("/v2/private/tags/list").await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let ok = crate::support::eventually_async(std::time::Duration::from_secs(20), || async {
        hoard.status("/v2/private/tags/list").await == 200
    })
    .await;
    assert!(ok, "the retry found the helper's answer");
    assert_eq!(helper.runs(), 1, "one run, not one per request");
}

#[tokio::test]
async fn issue_15_an_identity_token_from_a_helper_is_posted_as_a_refresh_token() {
    let helper = Helper::new(r#"echo '{"Username":"<token>","Secret":"refresh-from-helper"}'"#);
    let fake = Fake::start().await;
    fake.require_refresh_token("tok", "refresh-from-helper");
    fake.put_image("library/private", "1", b"p1");
    let hoard = helper.hoard(&fake).await;
    assert_eq!(hoard.status("/v2/private/manifests/1").await, 200);
    let posts = fake.token_posts();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert!(
        posts[0].contains("grant_type=refresh_token")
            && posts[0].contains("refresh_token=refresh-from-helper"),
        "{posts:?}"
    );
    // Never as a password: no Basic header reached the token endpoint.
    assert!(fake
        .state
        .authorizations
        .lock()
        .unwrap()
        .iter()
        .all(|(_, auth)| !auth.as_deref().unwrap_or("").starts_with("Basic")));
}
