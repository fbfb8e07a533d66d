//! `hoard ls`, `pin` and `unpin`: through a running daemon's admin API
//! (`--admin`), or on a stopped store.

use anyhow::Context as _;
use hoard::mirror::catalog::CachedImage;
use hoard::reference::ImageRef;
use hoard::registry::admin;

use super::human;
use super::store::{open_store, StoreArgs};

/// A running daemon's admin API, or a stopped store.
#[derive(clap::Args)]
pub struct Target {
    /// Admin API of a running hoard, e.g. http://127.0.0.1:5001.
    #[arg(long, env = "HOARD_ADMIN_URL", value_name = "URL")]
    admin: Option<String>,
    /// Its token.
    #[arg(
        long,
        env = "HOARD_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// Without --admin: a stopped store.
    #[command(flatten)]
    store: StoreArgs,
}

impl Target {
    /// The admin client, if `--admin` was given.
    fn admin(&self) -> anyhow::Result<Option<admin::Client>> {
        let Some(base) = &self.admin else {
            return Ok(None);
        };
        let token = self
            .admin_token
            .as_deref()
            .context("--admin needs --admin-token (or HOARD_ADMIN_TOKEN)")?;
        Ok(Some(admin::Client::new(base, token)))
    }
}

/// Runs one admin call to completion.
fn block_on<T>(call: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(call))
}

/// `hoard ls`: a table like `docker images` (sizes in binary units, times
/// as ages), or with `json` the daemon's JSON as it is.
pub fn ls(target: &Target, registry: Option<String>, json: bool) -> anyhow::Result<()> {
    let images: Vec<CachedImage> = match target.admin()? {
        Some(client) => block_on(client.images(registry.as_deref()))??,
        None => {
            let (store, _) = open_store(&target.store)?;
            hoard::mirror::catalog::images(&store, &[], registry.as_deref())?
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&admin::Images { images })?
        );
        return Ok(());
    }
    let now = hoard::clock::unix_ms() / 1000;
    println!(
        "{:<50} {:<19} {:>10} {:<16} {:<16} {:<20} PINNED",
        "IMAGE", "DIGEST", "SIZE", "PULLED", "CHECKED", "PLATFORMS"
    );
    for image in &images {
        println!("{}", row(image, now));
    }
    Ok(())
}

/// One line of `hoard ls` at unix second `now`. The strings come from a
/// daemon's JSON: cut by characters, never by bytes, whatever they hold.
fn row(image: &CachedImage, now: u64) -> String {
    let digest: String = image.digest.chars().take(19).collect();
    format!(
        "{:<50} {:<19} {:>10} {:<16} {:<16} {:<20} {}",
        image.image,
        digest,
        human::size(image.size),
        human::ago(image.last_pulled_secs, now),
        human::ago(image.checked_at_ms / 1000, now),
        if image.platforms.is_empty() {
            "-".to_owned()
        } else {
            image.platforms.join(",")
        },
        if image.pinned { "yes" } else { "" }
    )
}

/// `hoard pin` (`on`) and `hoard unpin`.
pub fn pin(target: &Target, image: &str, on: bool) -> anyhow::Result<()> {
    let parsed = ImageRef::parse(image).with_context(|| format!("invalid image {image:?}"))?;
    let changed = match target.admin()? {
        Some(client) if on => block_on(client.pin(&parsed))??,
        Some(client) => block_on(client.unpin(&parsed))??,
        None => {
            let (store, _) = open_store(&target.store)?;
            if on {
                store.add_pin(&parsed.to_string())?
            } else {
                store.remove_pin(&parsed.to_string())?
            }
        }
    };
    let verb = if on { "pinned" } else { "unpinned" };
    match changed {
        true => println!("{verb} {parsed}"),
        false => println!("{parsed} was already {verb}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_12_a_row_with_non_ascii_text_from_the_daemon_does_not_panic() {
        let image = CachedImage {
            image: "docker.io/library/ünïcödé:1".into(),
            // Byte 19 falls inside a character: a byte slice there panics.
            digest: "sha256:aéééééééééééééééééééé".into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 3 * 1024 * 1024,
            checked_at_ms: 1_000_000_000,
            last_pulled_secs: 1_000_000 - 300,
            pinned: true,
            platforms: vec!["linux/amd64".into()],
        };
        let line = row(&image, 1_000_000);
        assert!(line.contains("sha256:aééééééééééé "), "{line}");
        assert!(line.ends_with("yes"));
        // Sizes and times as people read them.
        assert!(line.contains("   3.0 MiB 5 min ago"), "{line}");
        assert!(
            line.contains("just now") && line.contains("linux/amd64"),
            "{line}"
        );
    }
}
