//! The store commands, run on a stopped store: `hoard verify` and
//! `hoard gc`. Opening takes the store's lock, so against a running daemon
//! they are refused before they touch anything.

use std::path::PathBuf;

use anyhow::Context as _;

/// Which store a command works on.
#[derive(clap::Args)]
pub struct StoreArgs {
    /// The data directory of the store.
    #[arg(
        long,
        env = "HOARD_DATA_DIR",
        value_name = "DIR",
        default_value = "hoard-data"
    )]
    pub data_dir: PathBuf,
}

/// Opens a store for maintenance, reconciling it first.
pub fn open_store(
    args: &StoreArgs,
) -> anyhow::Result<(hoard::store::Store, hoard::store::Reconciled)> {
    if !args.data_dir.join("index").exists() {
        anyhow::bail!("{} holds no hoard store", args.data_dir.display());
    }
    let (store, reconciled) = match hoard::store::Store::open_reconciled(&args.data_dir) {
        Ok(opened) => opened,
        Err(e @ hoard::store::Error::Locked { .. }) => {
            anyhow::bail!("{e}: stop it first, or use its admin API (--admin)")
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot open the store in {}", args.data_dir.display()))
        }
    };
    eprintln!(
        "reconciled {} index entries in {} ms: {} without a file dropped, {} of the wrong size quarantined, {} files adopted, {} stray files removed",
        reconciled.entries,
        reconciled.millis,
        reconciled.dropped,
        reconciled.quarantined.len(),
        reconciled.adopted,
        reconciled.removed
    );
    Ok((store, reconciled))
}

pub fn verify(args: &StoreArgs) -> anyhow::Result<()> {
    let (store, reconciled) = open_store(args)?;
    let started = std::time::Instant::now();
    let mut seen = 0u64;
    let report = store.verify(|_, _| {
        seen += 1;
        if seen.is_multiple_of(1000) {
            eprintln!("verified {seen} blobs");
        }
    })?;
    let corrupt: Vec<_> = reconciled
        .quarantined
        .iter()
        .chain(&report.quarantined)
        .collect();
    println!(
        "verified {} blobs ({} bytes) in {:.1}s: {} corrupt",
        report.checked,
        report.bytes,
        started.elapsed().as_secs_f64(),
        corrupt.len()
    );
    for digest in &corrupt {
        println!(
            "quarantined {digest} -> {}",
            args.data_dir
                .join("quarantine")
                .join(digest.hex())
                .display()
        );
    }
    if !corrupt.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

pub fn gc(args: &StoreArgs) -> anyhow::Result<()> {
    let (store, _) = open_store(args)?;
    let report = store.gc()?;
    println!(
        "removed {} unreferenced blobs ({} bytes)",
        report.blobs, report.bytes
    );
    Ok(())
}
