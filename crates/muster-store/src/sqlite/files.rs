//! The store's files are the owner's alone: the database, its `-wal` and `-shm` (which
//! SQLite creates with the database file's mode) and the sealing key file are 0600, a
//! directory the store creates is 0700. Files an older Muster left readable by others are
//! restricted on open.

use std::path::{Path, PathBuf};

use crate::StoreError;

/// Creates `dir` and its missing parents, owner-only.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| {
        StoreError::Backend(format!(
            "creating the directory {} for the SQLite database: {e}",
            dir.display()
        ))
    })
}

/// Creates an empty, owner-only database file when there is none, so SQLite (which would
/// create it 0644) opens ours and gives its `-wal` and `-shm` the same mode.
pub(super) fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Backend(format!(
            "creating the SQLite database {}: {e}",
            path.display()
        ))),
    }
}

/// Removes group and other permissions from those of `paths` that exist.
pub(super) fn restrict(paths: &[PathBuf]) -> Result<(), StoreError> {
    #[cfg(unix)]
    for path in paths {
        use std::os::unix::fs::PermissionsExt;
        let mode = match std::fs::metadata(path) {
            Ok(meta) => meta.permissions().mode(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "reading the mode of {}: {e}",
                    path.display()
                )))
            }
        };
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700)).map_err(
                |e| {
                    StoreError::Backend(format!(
                        "making {} readable by its owner only: {e}",
                        path.display()
                    ))
                },
            )?;
            tracing::info!(path = %path.display(), old_mode = format!("{:o}", mode & 0o777), "restricted to the owner");
        }
    }
    #[cfg(not(unix))]
    let _ = paths;
    Ok(())
}
