//! The client commands, which talk HTTP to a running mirror: `hoard warm`
//! and `hoard health`.

use anyhow::Context as _;

/// `hoard health`: one GET /healthz with a 5 s budget.
pub fn health(addr: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_secs(5);
    let target = addr
        .to_socket_addrs()
        .with_context(|| format!("bad address {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    if line.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        anyhow::bail!(
            "{addr}/healthz: {}",
            line.lines().next().unwrap_or("no answer")
        )
    }
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
