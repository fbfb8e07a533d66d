//! The admin API: token required; list, pin, unpin, evict one image, gc.

use crate::fake::Fake;
use crate::Hoard;

async fn admin(
    hoard: &Hoard,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let url = format!("http://{}{path}", hoard.admin.expect("admin listener"));
    let mut request = hoard.client.request(method.parse().unwrap(), url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap(),
    )
}

#[tokio::test]
async fn admin_api_lists_pins_evicts_and_collects() {
    let fake = Fake::start().await;
    let (keep_digest, keep_layer) = fake.put_image("library/keep", "1", &[1u8; 50_000]);
    let (_, drop_layer) = fake.put_image("library/drop", "1", &[2u8; 60_000]);
    let token = "admin-secret";
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        args.admin_token = Some(token.into());
    })
    .await;
    for (name, layer) in [("keep", &keep_layer), ("drop", &drop_layer)] {
        assert_eq!(hoard.status(&format!("/v2/{name}/manifests/1")).await, 200);
        assert_eq!(
            hoard.status(&format!("/v2/{name}/blobs/{layer}")).await,
            200
        );
    }
    // A client has its blob once verified; the commit follows. Wait for
    // both downloads to be committed before looking at the store.
    assert!(
        crate::eventually(std::time::Duration::from_secs(10), || {
            hoard.metric("hoard_inflight_fetches") == 0.0
        })
        .await
    );

    let (status, body) = admin(&hoard, "GET", "/admin/images", None).await;
    assert_eq!(status, 401);
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    assert_eq!(
        admin(&hoard, "GET", "/admin/images", Some("wrong-secret"))
            .await
            .0,
        401
    );
    // The registry API does not serve the admin routes.
    assert_eq!(hoard.get("/admin/images").await.status(), 404);

    let (status, body) = admin(&hoard, "GET", "/admin/images", Some(token)).await;
    assert_eq!(status, 200);
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{body}");
    assert_eq!(images[1]["image"], "docker.io/library/keep:1");
    assert_eq!(images[1]["digest"], keep_digest.as_str());
    assert!(images[1]["size"].as_u64().unwrap() > 50_000);

    let (status, body) = admin(&hoard, "POST", "/admin/pins?image=keep%3A1", Some(token)).await;
    assert_eq!((status, body["added"].as_bool()), (200, Some(true)));
    let (_, body) = admin(&hoard, "GET", "/admin/pins", Some(token)).await;
    assert_eq!(
        body["pins"],
        serde_json::json!(["docker.io/library/keep:1"])
    );

    // Evicting a pinned image removes nothing; an unpinned one goes.
    let (_, body) = admin(&hoard, "POST", "/admin/evict?image=keep:1", Some(token)).await;
    assert_eq!(body["blobs"], 0);
    let (_, body) = admin(&hoard, "POST", "/admin/evict?image=drop:1", Some(token)).await;
    assert!(body["blobs"].as_u64().unwrap() >= 2, "{body}");
    assert_eq!(
        hoard.status(&format!("/v2/drop/blobs/{drop_layer}")).await,
        200
    );
    assert_eq!(
        fake.hits("GET", &drop_layer),
        2,
        "evicted, so fetched again"
    );
    assert_eq!(
        hoard.status(&format!("/v2/keep/blobs/{keep_layer}")).await,
        200
    );
    assert_eq!(fake.hits("GET", &keep_layer), 1);

    let (status, body) = admin(
        &hoard,
        "DELETE",
        "/admin/pins?image=docker.io/library/keep:1",
        Some(token),
    )
    .await;
    assert_eq!((status, body["removed"].as_bool()), (200, Some(true)));
    let (status, _) = admin(&hoard, "POST", "/admin/gc", Some(token)).await;
    assert_eq!(status, 200);
    let (status, body) = admin(&hoard, "POST", "/admin/verify", Some(token)).await;
    assert_eq!(status, 200);
    assert!(body["checked"].as_u64().unwrap() >= 2, "{body}");
    assert_eq!(body["quarantined"], serde_json::json!([]));
    let (status, body) = admin(&hoard, "POST", "/admin/pins?image=Bad_Name", Some(token)).await;
    assert_eq!(
        (status, body["errors"][0]["code"].as_str()),
        (400, Some("NAME_INVALID"))
    );
}

#[tokio::test]
async fn the_admin_client_speaks_the_servers_protocol_and_names_its_failures() {
    use hoard::registry::admin::{Client, ClientError};
    let fake = Fake::start().await;
    fake.put_image("library/alpine", "1", b"layer");
    let token = "admin-secret";
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        args.admin_token = Some(token.into());
    })
    .await;
    assert_eq!(hoard.status("/v2/alpine/manifests/1").await, 200);
    let base = format!("http://{}", hoard.admin.unwrap());

    let client = Client::new(&base, token);
    let images = client.images(Some("docker.io")).await.unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].image, "docker.io/library/alpine:1");
    assert!(client.images(Some("ghcr.io")).await.unwrap().is_empty());
    let image = hoard::reference::ImageRef::parse("alpine:1").unwrap();
    assert!(client.pin(&image).await.unwrap());
    assert!(!client.pin(&image).await.unwrap(), "pinned already");
    assert!(client.unpin(&image).await.unwrap());

    // A wrong token: the server's refusal, without the token in it.
    match Client::new(&base, "wrong-secret").images(None).await {
        Err(e @ ClientError::Refused { status: 401, .. }) => {
            assert!(!e.to_string().contains("wrong-secret"), "{e}");
        }
        other => panic!("expected a 401 refusal, got {other:?}"),
    }
    // Nothing listens on port 0: the cause is named, not "error sending
    // request".
    match Client::new("http://127.0.0.1:0", token).images(None).await {
        Err(e @ ClientError::Unreachable { .. }) => {
            assert!(e.to_string().contains("refused"), "{e}");
        }
        other => panic!("expected an unreachable admin API, got {other:?}"),
    }
}
