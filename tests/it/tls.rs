//! TLS on the API listener: HTTP/2 and HTTP/1.1 by ALPN, a plain listener
//! beside it, client certificates, and certificates replaced on disk taking
//! effect without a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::fake::Fake;
use crate::pki::{write, Ca, Purpose as ExtendedKeyUsagePurpose};
use crate::{eventually, eventually_async, Hoard};

fn client(ca: &Ca, identity: Option<(String, String)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap());
    if let Some((cert, key)) = identity {
        builder = builder
            .identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// hoard serving TLS with a certificate from `ca` (files in `pki`), with
/// `tweak` applied to the rest of its flags.
async fn start_tls(
    fake: &Fake,
    ca: &Ca,
    pki: &std::path::Path,
    tweak: impl FnOnce(&mut hoard::config::ServeArgs),
) -> Hoard {
    let (cert, key) = ca.server_files(pki);
    Hoard::start(&fake.url(), &[], |args| {
        args.tls_cert = Some(cert);
        args.tls_key = Some(key);
        tweak(args);
    })
    .await
}

/// The API version check through `client`: its status, or the error of a
/// connection that failed (an untrusted or missing certificate).
async fn base_check(client: &reqwest::Client, hoard: &Hoard) -> reqwest::Result<u16> {
    let r = client.get(https(hoard, "/v2/")).send().await?;
    Ok(r.status().as_u16())
}

fn https(hoard: &Hoard, path: &str) -> String {
    format!("https://localhost:{}{path}", hoard.addr.port())
}

/// The protocol ALPN settles on when a client offers `offer`.
async fn negotiated(hoard: &Hoard, ca: &Ca, offer: &[&[u8]]) -> Option<Vec<u8>> {
    let stream = connect(hoard, ca, offer).await;
    stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

/// A TLS connection trusting `ca`, offering `offer` by ALPN.
async fn connect(
    hoard: &Hoard,
    ca: &Ca,
    offer: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pki_types::CertificateDer::from(ca.cert.der().to_vec());
    roots.add(der).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = offer.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(hoard.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[tokio::test]
async fn pulls_over_tls_with_h2_or_http1_and_a_plain_listener_beside() {
    let fake = Fake::start().await;
    let (_, layer) = fake.put_image("library/alpine", "3", b"layer over tls");
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("hoard test CA");
    let hoard = start_tls(&fake, &ca, pki.path(), |args| {
        args.plain_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;

    let tls = client(&ca, None);
    assert_eq!(base_check(&tls, &hoard).await.unwrap(), 200);
    let r = tls
        .get(https(&hoard, &format!("/v2/library/alpine/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"layer over tls");

    assert_eq!(
        negotiated(&hoard, &ca, &[b"h2", b"http/1.1"])
            .await
            .as_deref(),
        Some(&b"h2"[..])
    );
    assert_eq!(
        negotiated(&hoard, &ca, &[b"http/1.1"]).await.as_deref(),
        Some(&b"http/1.1"[..])
    );

    // Plain HTTP on the TLS port is refused; the plain listener serves.
    let plain = reqwest::Client::new();
    assert!(plain
        .get(format!("http://{}/v2/", hoard.addr))
        .send()
        .await
        .is_err());
    let r = plain
        .get(format!(
            "http://{}/v2/library/alpine/blobs/{layer}",
            hoard.plain.unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"layer over tls");

    // A client that does not trust the CA gets nowhere.
    let stranger = client(&Ca::new("another CA"), None);
    assert!(base_check(&stranger, &hoard).await.is_err());
}

#[tokio::test]
async fn client_certificates_are_required_when_a_client_ca_is_set() {
    let fake = Fake::start().await;
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("hoard test CA");
    let clients = Ca::new("hoard clients CA");
    let client_ca = write(pki.path(), "clients.pem", &clients.pem());
    let hoard = start_tls(&fake, &ca, pki.path(), |args| {
        args.tls_client_ca = Some(client_ca);
    })
    .await;

    let anonymous = client(&ca, None);
    assert!(base_check(&anonymous, &hoard).await.is_err());
    let foreign = clients_of(&Ca::new("someone else's CA"), &ca);
    assert!(base_check(&foreign, &hoard).await.is_err());
    let member = clients_of(&clients, &ca);
    assert_eq!(base_check(&member, &hoard).await.unwrap(), 200);
}

/// A client with a certificate from `issuer`, trusting `server_ca`.
fn clients_of(issuer: &Ca, server_ca: &Ca) -> reqwest::Client {
    let identity = issuer.issue(&["ci-runner"], ExtendedKeyUsagePurpose::ClientAuth);
    client(server_ca, Some(identity))
}

/// The log lines of events on this thread; with the current-thread
/// runtime of `#[tokio::test]`, hoard's tasks log here too.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Collects until the guard is dropped.
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn contain(&self, text: &str) -> bool {
        String::from_utf8_lossy(&self.0.lock().unwrap()).contains(text)
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let fake = Fake::start().await;
    let pki = tempfile::tempdir().unwrap();
    let old = Ca::new("old CA");
    let hoard = start_tls(&fake, &old, pki.path(), |args| {
        args.tls_reload_interval = Some("100ms".into());
    })
    .await;
    assert_eq!(base_check(&client(&old, None), &hoard).await.unwrap(), 200);

    // A broken file is ignored (the old certificate stays in use).
    write(pki.path(), "cert.pem", "not a certificate");
    assert!(
        eventually(Duration::from_secs(10), || logs
            .contain("TLS reload failed"))
        .await,
        "the broken file was never tried"
    );
    assert_eq!(base_check(&client(&old, None), &hoard).await.unwrap(), 200);

    // Renewed by a new CA: picked up within the reload interval.
    let new = Ca::new("new CA");
    new.server_files(pki.path());
    let renewed = client(&new, None);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            base_check(&renewed, &hoard).await.is_ok()
        })
        .await,
        "new certificate never served"
    );
    assert!(base_check(&client(&old, None), &hoard).await.is_err());
}

#[tokio::test]
async fn a_silent_http2_client_is_dropped() {
    let fake = Fake::start().await;
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("hoard test CA");
    let hoard = start_tls(&fake, &ca, pki.path(), |args| {
        args.header_read_timeout = Some("1s".into());
    })
    .await;
    // Handshake, h2 agreed, then nothing: not even the connection preface.
    let mut stream = connect(&hoard, &ca, &[b"h2"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut buf),
    )
    .await;
    assert!(closed.is_ok(), "the silent HTTP/2 client was kept past 5 s");
}
