//! The client commands, which talk HTTP to a running mirror: `hoard warm`
//! and `hoard health`.

use anyhow::Context as _;

/// How long `hoard health` waits for each step (connect, send, answer):
/// together under the image's HEALTHCHECK timeout of 6 s.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);

/// `hoard health`: one GET /healthz with a 5 s budget, to `addr` over plain
/// HTTP, or to where `serve` would listen (resolved from the defaults, the
/// config file and the HOARD_* variables, as `serve` resolves them).
pub fn health(addr: Option<String>, config: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let (targets, tls) = match &addr {
        Some(addr) => (vec![resolve(addr)?], false),
        None => {
            let args = hoard::config::ServeArgs {
                config,
                ..Default::default()
            };
            let config = hoard::config::Config::load(&args, std::env::vars())
                .context("cannot read the settings `serve` would use")?;
            own_listener(&config)?
        }
    };
    let mut tried = Vec::new();
    let connected = targets.iter().find_map(|target| {
        std::net::TcpStream::connect_timeout(target, HEALTH_TIMEOUT)
            .map(|stream| (stream, *target))
            .map_err(|e| tried.push(format!("{target}: {e}")))
            .ok()
    });
    let Some((stream, target)) = connected else {
        anyhow::bail!(
            "cannot connect to {}: {}",
            addr.unwrap_or_else(|| targets[0].to_string()),
            tried.join("; ")
        );
    };
    let shown = addr.unwrap_or_else(|| target.to_string());
    stream.set_read_timeout(Some(HEALTH_TIMEOUT))?;
    stream.set_write_timeout(Some(HEALTH_TIMEOUT))?;
    let line = if tls {
        let name = rustls_pki_types::ServerName::IpAddress(target.ip().into());
        let connection = rustls::ClientConnection::new(liveness_tls(), name)?;
        healthz(rustls::StreamOwned::new(connection, stream), &shown)?
    } else {
        healthz(stream, &shown)?
    };
    if line.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        anyhow::bail!(
            "{shown}/healthz: {}",
            line.lines().next().unwrap_or("no answer")
        )
    }
}

fn resolve(addr: &str) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs as _;
    addr.to_socket_addrs()
        .with_context(|| format!("bad address {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))
}

/// Where this machine reaches the listener `config` sets up (addresses to
/// try in order), and whether it speaks TLS. A listener on all addresses is
/// asked on loopback (`[::]` on ::1, then on 127.0.0.1: a container with
/// IPv6 off has no ::1, yet a dual-stack listener answers on IPv4). One
/// that wants client certificates is asked on a plain listener (a liveness
/// check has no certificate to show): `tls.plain_listen`, else
/// `metrics_listen`.
fn own_listener(
    config: &hoard::config::Config,
) -> anyhow::Result<(Vec<std::net::SocketAddr>, bool)> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let loopback = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => {
            vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())]
        }
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => vec![
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        ],
        addr => vec![addr],
    };
    Ok(match &config.tls {
        Some(tls) if tls.client_ca.is_some() => match tls.plain_listen.or(config.metrics_listen) {
            Some(plain) => (loopback(plain), false),
            None => anyhow::bail!(
                "{} requires client certificates: set tls.plain_listen or metrics_listen \
                     for the health check, or pass --addr",
                config.listen
            ),
        },
        Some(_) => (loopback(config.listen), true),
        None => (loopback(config.listen), false),
    })
}

/// Sends `GET /healthz` on `stream` and reads the status line.
fn healthz(mut stream: impl std::io::Read + std::io::Write, host: &str) -> anyhow::Result<String> {
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .and_then(|()| stream.flush())
    .with_context(|| format!("{host}: the request could not be sent (TLS handshake?)"))?;
    let mut head = [0u8; 64];
    let n = stream
        .read(&mut head)
        .with_context(|| format!("{host} sent no answer"))?;
    Ok(String::from_utf8_lossy(&head[..n]).into_owned())
}

/// TLS for a liveness check of hoard's own listener on this machine: the
/// certificate is not checked (it names the mirror's public name, and the
/// check only asks whether the process answers), so nothing secret is sent.
fn liveness_tls() -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    #[derive(Debug)]
    struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

pub fn warm(mirror: &str, platform: &str, images: &[String]) -> anyhow::Result<()> {
    let platforms = hoard::warm::parse_platforms(platform);
    let images = images
        .iter()
        .map(|i| {
            hoard::reference::ImageRef::parse(i).with_context(|| format!("invalid image {i:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let progress = indicatif::MultiProgress::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let mut failed = 0;
    for image in &images {
        match runtime.block_on(hoard::warm::warm(
            &client,
            mirror,
            image,
            &platforms,
            Some(&progress),
        )) {
            Ok(r) => println!(
                "{image}: {} manifests, {} blobs ({} already cached), {} fetched",
                r.manifests,
                r.blobs,
                r.cached,
                super::human::size(r.fetched_bytes)
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{image}: {e}");
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} images could not be warmed", images.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> hoard::config::Config {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hoard.toml");
        std::fs::write(&file, text).unwrap();
        let args = hoard::config::ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        hoard::config::Config::load(&args, std::iter::empty()).unwrap()
    }

    #[test]
    fn issue_18_the_health_check_asks_the_listener_on_loopback() {
        let addrs = |list: &[&str]| -> Vec<std::net::SocketAddr> {
            list.iter().map(|a| a.parse().unwrap()).collect()
        };
        assert_eq!(
            own_listener(&config("")).unwrap(),
            (addrs(&["127.0.0.1:5000"]), false),
            "the default 0.0.0.0:5000"
        );
        assert_eq!(
            own_listener(&config("listen = \"[::]:8443\"")).unwrap(),
            (addrs(&["[::1]:8443", "127.0.0.1:8443"]), false)
        );
        assert_eq!(
            own_listener(&config("listen = \"127.0.0.2:7000\"")).unwrap(),
            (addrs(&["127.0.0.2:7000"]), false)
        );
        let tls = "listen = \"0.0.0.0:443\"\n[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n";
        assert_eq!(
            own_listener(&config(tls)).unwrap(),
            (addrs(&["127.0.0.1:443"]), true)
        );
        let mtls = format!("metrics_listen = \"127.0.0.1:9090\"\n{tls}client_ca = \"/ca.pem\"\n");
        assert_eq!(
            own_listener(&config(&mtls)).unwrap(),
            (addrs(&["127.0.0.1:9090"]), false),
            "client certificates required: the plain metrics listener"
        );
        let e = own_listener(&config(&format!("{tls}client_ca = \"/ca.pem\"\n"))).unwrap_err();
        assert!(
            e.to_string().contains("tls.plain_listen or metrics_listen"),
            "{e}"
        );
    }
}
