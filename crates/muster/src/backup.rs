//! `muster backup` and `muster restore`: one archive file (tar) holding everything a data
//! dir needs to come back: a consistent snapshot of the database taken while the server runs
//! (`VACUUM INTO`), its sealing key, the local CA and server certificate, and
//! `connection.json`, with a manifest naming the Muster and schema versions.
//!
//! A restore checks the archive (manifest, sealing key, schema version not newer than this
//! binary's, the key opens the database) in a staging dir inside the target before any file
//! of the target is replaced, so a refused restore leaves the target as it was.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use muster_store::sqlite::{key_file_path, schema_version, snapshot};
use muster_store::SqliteStore;
use serde::{Deserialize, Serialize};

const MANIFEST: &str = "muster-backup.json";
const DB: &str = "muster.db";
const DB_KEY: &str = "muster.db.key";
/// Copied when present (a data dir that uses `--tls-cert` may lack the server pair).
const OPTIONAL_FILES: [&str; 7] = [
    "ca.pem",
    "ca.key",
    "issuing-ca.pem",
    "issuing-ca.key",
    "server.pem",
    "server.key",
    "connection.json",
];
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    format: u32,
    muster_version: String,
    schema_version: u32,
    created_utc: String,
    files: Vec<String>,
}

#[derive(Args)]
pub struct BackupArgs {
    /// Data dir of the (running or stopped) server [default: ./muster-data]
    #[arg(long, env = "MUSTER_DATA_DIR", default_value = "muster-data")]
    data_dir: PathBuf,
    /// Archive to write (must not exist); it holds secrets
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Archive written by `muster backup`
    file: PathBuf,
    /// Data dir to restore into: empty or missing, unless --force
    #[arg(long, env = "MUSTER_DATA_DIR", default_value = "muster-data")]
    data_dir: PathBuf,
    /// Replace the Muster files of a non-empty data dir (stop its server first)
    #[arg(long)]
    force: bool,
}

/// A directory removed when dropped (staging for snapshots and restores).
struct Staging(PathBuf);

impl Staging {
    fn create(path: PathBuf) -> anyhow::Result<Staging> {
        let mut b = std::fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        b.create(&path)
            .with_context(|| format!("creating the staging dir {}", path.display()))?;
        Ok(Staging(path))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sibling path of `path`: `dir/.{name}.{what}-{pid}`.
fn sibling(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{what}-{}", std::process::id()))
}

fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

pub fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    let db = dir.join(DB);
    if !db.is_file() {
        bail!(
            "no database at {} (is --data-dir the server's data dir?)",
            db.display()
        );
    }
    let key = key_file_path(&db);
    if !key.is_file() {
        bail!(
            "sealing key missing: {} (the database cannot be restored without it)",
            key.display()
        );
    }
    if args.out.exists() {
        bail!("{} exists; choose a new file name", args.out.display());
    }
    let out = std::path::absolute(&args.out).unwrap_or(args.out.clone());
    let staging = Staging::create(sibling(&out, "snapshot"))?;
    let copy = staging.0.join(DB);
    let schema = snapshot(&db, &copy).context("taking the database snapshot")?;

    let mut files = vec![(DB.to_string(), copy), (DB_KEY.to_string(), key)];
    for name in OPTIONAL_FILES {
        let p = dir.join(name);
        if p.is_file() {
            files.push((name.to_string(), p));
        }
    }
    let manifest = Manifest {
        format: FORMAT,
        muster_version: env!("CARGO_PKG_VERSION").to_string(),
        schema_version: schema,
        created_utc: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        files: files.iter().map(|(n, _)| n.clone()).collect(),
    };

    // Written under a temporary name and renamed, so `out` is whole or absent.
    let partial = sibling(&out, "partial");
    let result = write_archive(&partial, &manifest, &files).and_then(|()| {
        std::fs::rename(&partial, &out)
            .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result?;
    println!(
        "Backed up {} (schema version {schema}, {} files) to {}",
        dir.display(),
        manifest.files.len(),
        out.display()
    );
    eprintln!(
        "warning: {} holds secrets (the database's sealing key, the CA key, every access \
         policy and device key): keep it as safe as the data dir itself",
        out.display()
    );
    Ok(())
}

fn write_archive(
    path: &Path,
    manifest: &Manifest,
    files: &[(String, PathBuf)],
) -> anyhow::Result<()> {
    let file = create_private(path).with_context(|| format!("creating {}", path.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let manifest_json = serde_json::to_vec_pretty(manifest)?;
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest_json.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
    header.set_cksum();
    tar.append_data(&mut header, MANIFEST, manifest_json.as_slice())
        .context("writing the manifest")?;
    for (name, source) in files {
        let mut f =
            std::fs::File::open(source).with_context(|| format!("reading {}", source.display()))?;
        let len = f.metadata()?.len();
        let mut header = tar::Header::new_gnu();
        header.set_size(len);
        header.set_mode(0o600);
        header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
        header.set_cksum();
        tar.append_data(&mut header, name, &mut f)
            .with_context(|| format!("adding {}", source.display()))?;
    }
    let mut writer = tar.into_inner().context("finishing the archive")?;
    writer.flush()?;
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all().context("syncing the archive")?;
    Ok(())
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    let non_empty = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    if non_empty && !args.force {
        bail!(
            "{} is not empty; restore into an empty or new data dir, or pass --force to replace \
             its Muster files (stop its server first)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    let staging = Staging::create(dir.join(format!(".restore-{}", std::process::id())))?;
    let manifest = unpack(&args.file, &staging.0)?;

    let staged_db = staging.0.join(DB);
    if !staged_db.is_file() {
        bail!("{} holds no {DB}: not a Muster backup", args.file.display());
    }
    if !staging.0.join(DB_KEY).is_file() {
        bail!(
            "sealing key missing: {} holds no {DB_KEY}, and the database cannot be opened \
             without it",
            args.file.display()
        );
    }
    let schema = schema_version(&staged_db).context("reading the backup's schema version")?;
    if schema > SqliteStore::SCHEMA_VERSION {
        bail!(
            "{} was made by a newer Muster ({}, database schema version {schema}); this \
             muster {} knows schema versions up to {}: restore it with that version or newer",
            args.file.display(),
            manifest.muster_version,
            env!("CARGO_PKG_VERSION"),
            SqliteStore::SCHEMA_VERSION
        );
    }
    // Opening checks that the key opens the database, and migrates an older schema forward.
    drop(SqliteStore::open(&staged_db).context("checking the restored database")?);

    // Only now is the target touched. A stale WAL beside a replaced database would be
    // replayed into it: remove both sidecars first.
    for stale in ["muster.db-wal", "muster.db-shm"] {
        match std::fs::remove_file(dir.join(stale)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", dir.join(stale).display()))
            }
            _ => {}
        }
    }
    let mut names: Vec<&str> = vec![DB_KEY];
    names.extend(OPTIONAL_FILES);
    // The database last: a target with the new database always has its key beside it.
    // Opening it above checkpoints on close; a WAL left all the same goes with it (without
    // it the database is still whole, at its state before that check).
    names.extend([DB, "muster.db-wal"]);
    for name in names {
        let from = staging.0.join(name);
        if from.is_file() {
            std::fs::rename(&from, dir.join(name))
                .with_context(|| format!("moving {name} into {}", dir.display()))?;
        }
    }
    println!(
        "Restored {} (made {} by Muster {}, schema version {schema}) into {}",
        args.file.display(),
        manifest.created_utc,
        manifest.muster_version,
        dir.display()
    );
    println!(
        "Start it with `muster serve --data-dir {}` (another --dps-host or --hub-host is \
         fine: the built-in hub's references follow its new name)",
        dir.display()
    );
    Ok(())
}

/// Extracts the archive's known files into `into`; returns its manifest.
fn unpack(file: &Path, into: &Path) -> anyhow::Result<Manifest> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(f));
    let mut manifest = None;
    let entries = archive
        .entries()
        .with_context(|| format!("{} is not a Muster backup (tar) file", file.display()))?;
    for entry in entries {
        let mut entry =
            entry.with_context(|| format!("{} is damaged or not a backup", file.display()))?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if !entry.header().entry_type().is_file() {
            bail!("{}: unexpected entry {name}", file.display());
        }
        if name == MANIFEST {
            let m: Manifest = serde_json::from_reader(&mut entry)
                .with_context(|| format!("{}: invalid {MANIFEST}", file.display()))?;
            if m.format != FORMAT {
                bail!(
                    "{}: backup format {} is not one this muster reads ({FORMAT})",
                    file.display(),
                    m.format
                );
            }
            manifest = Some(m);
            continue;
        }
        // Only known names, so an archive can't write outside the staging dir.
        if name != DB && name != DB_KEY && !OPTIONAL_FILES.contains(&name.as_str()) {
            bail!("{}: unexpected entry {name}", file.display());
        }
        let target = into.join(&name);
        let mut out =
            create_private(&target).with_context(|| format!("creating {}", target.display()))?;
        std::io::copy(&mut entry, &mut out)
            .with_context(|| format!("extracting {name} from {}", file.display()))?;
        out.sync_all()?;
    }
    manifest
        .ok_or_else(|| anyhow::anyhow!("{} has no {MANIFEST}: not a Muster backup", file.display()))
}
