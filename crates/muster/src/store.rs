//! `muster store`: operations on the store itself.
//!
//! `muster store migrate --from sqlite:PATH --to postgres://...` copies every collection of an
//! SQLite installation into an empty PostgreSQL database, page by page, etags included
//! ([`PostgresStore::import`]). Bodies are opened with the SQLite key file and sealed again
//! by the PostgreSQL store with the same key (the default `--sealing-key`), so nothing secret
//! is ever written in clear and the nodes then share that key file. At the end every
//! collection's count is compared on both sides.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use muster_store::{Collection, ListQuery, PostgresStore, SqliteStore, Store};

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Copy an SQLite installation into an empty PostgreSQL database.
    ///
    /// Stop `muster serve` first (writes made during the copy would be missed; the count
    /// check at the end reports them). The PostgreSQL store then uses the SQLite key file:
    /// give it to every node (--sealing-key).
    ///
    /// Example:
    ///   muster store migrate --from sqlite:muster-data/muster.db \
    ///       --to 'postgres://muster:PASSWORD@db.example.lan/muster?sslmode=verify-full'
    #[command(verbatim_doc_comment)]
    Migrate(MigrateArgs),
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The SQLite store to copy: `sqlite:PATH` (its key file is PATH.key)
    #[arg(long)]
    from: String,
    /// The PostgreSQL database to fill (must hold no records)
    #[arg(long, env = "MUSTER_STORE", hide_env_values = true)]
    to: String,
    /// Sealing key file for the PostgreSQL store [default: the SQLite database's key file]
    #[arg(long)]
    sealing_key: Option<PathBuf>,
    /// Records copied per transaction
    #[arg(long, default_value_t = 500)]
    page: usize,
}

pub async fn run(command: StoreCommand) -> anyhow::Result<()> {
    match command {
        StoreCommand::Migrate(args) => migrate(args).await,
    }
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let Some(path) = args.from.strip_prefix("sqlite:").map(PathBuf::from) else {
        bail!("--from must be sqlite:PATH (the muster.db of an installation)");
    };
    if !path.is_file() {
        bail!("--from: {} is not a file", path.display());
    }
    if args.page == 0 {
        bail!("--page must be at least 1");
    }
    let source = SqliteStore::open(&path)
        .with_context(|| format!("opening the SQLite store {}", path.display()))?;
    let key = args
        .sealing_key
        .unwrap_or_else(|| muster_store::sqlite::key_file_path(&path));
    let target = PostgresStore::open(&args.to, &key)
        .await
        .context("opening the PostgreSQL store")?;

    let mut present = 0;
    for &collection in Collection::ALL {
        present += target.count(collection, None).await?;
    }
    if present > 0 {
        bail!(
            "{} already holds {present} records: migrate only into an empty database",
            target.display()
        );
    }
    let mut total = 0;
    for &collection in Collection::ALL {
        total += source.count(collection, None).await?;
    }

    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>20} [{bar:40}] {pos}/{len} records ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    for &collection in Collection::ALL {
        bar.set_message(collection.as_str());
        let mut after = None;
        loop {
            let page = source
                .list(
                    collection,
                    ListQuery {
                        partition: None,
                        after: after.take(),
                        limit: args.page,
                    },
                )
                .await
                .with_context(|| format!("reading {}", collection.as_str()))?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            target
                .import(collection, &page)
                .await
                .with_context(|| format!("copying {}", collection.as_str()))?;
            bar.inc(page.len() as u64);
            if page.len() < args.page {
                break;
            }
        }
    }
    bar.finish_and_clear();

    let mut mismatches = Vec::new();
    for &collection in Collection::ALL {
        let (from, to) = (
            source.count(collection, None).await?,
            target.count(collection, None).await?,
        );
        if from != to {
            mismatches.push(format!(
                "{}: {from} in SQLite, {to} copied",
                collection.as_str()
            ));
        }
    }
    if !mismatches.is_empty() {
        bail!(
            "the counts differ (was the server still running?): {}",
            mismatches.join("; ")
        );
    }
    println!(
        "Copied {total} records from {} to {}; every collection's count matches.",
        path.display(),
        target.display()
    );
    println!(
        "Sealing key: {} (give it to every node: --sealing-key)",
        key.display()
    );
    Ok(())
}
