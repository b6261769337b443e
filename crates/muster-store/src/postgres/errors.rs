//! PostgreSQL errors as [`StoreError`]s: what may work again later (the server unreachable or
//! shutting down, a full disk, a read-only standby, a deadlock or lock timeout) is
//! [`StoreError::Unavailable`], everything else a backend error. Messages carry the server's
//! words and SQLSTATE, never a record body or the URL's password.

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use crate::{StoreError, Unavailability};

/// A database error with context (what was being done; never a body).
pub(super) fn pg_err(context: &str, error: &tokio_postgres::Error) -> StoreError {
    let detail = format!("{context}: {}", describe(error));
    match unavailability(error) {
        Some(cause) => StoreError::Unavailable { cause, detail },
        None => StoreError::Backend(detail),
    }
}

/// A failure to get a pooled connection.
pub(super) fn pool_err(context: &str, error: PoolError) -> StoreError {
    match error {
        PoolError::Backend(e) => pg_err(context, &e),
        PoolError::Timeout(_) => StoreError::Unavailable {
            cause: Unavailability::Unreachable,
            detail: format!(
                "{context}: no database connection became free or could be opened in time"
            ),
        },
        PoolError::Closed => StoreError::Closed,
        other => StoreError::Backend(format!("{context}: {other}")),
    }
}

fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            // The top-level text is generic ("error communicating with the server"): add the
            // cause (the I/O or TLS error).
            match std::error::Error::source(error) {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            }
        }
    }
}

/// Which errors mean "not now" rather than "wrong".
fn unavailability(error: &tokio_postgres::Error) -> Option<Unavailability> {
    if let Some(code) = error.code() {
        let class = &code.code()[..2.min(code.code().len())];
        return Some(match code {
            c if *c == SqlState::DISK_FULL => Unavailability::DiskFull,
            c if *c == SqlState::READ_ONLY_SQL_TRANSACTION => Unavailability::ReadOnly,
            c if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::LOCK_NOT_AVAILABLE =>
            {
                Unavailability::Locked
            }
            c if *c == SqlState::IO_ERROR => Unavailability::Io,
            c if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || *c == SqlState::OUT_OF_MEMORY =>
            {
                Unavailability::Unreachable
            }
            _ if class == "08" => Unavailability::Unreachable,
            _ => return None,
        });
    }
    // No SQLSTATE: the connection itself failed (refused, reset, closed, timed out, TLS).
    let io = std::iter::successors(std::error::Error::source(error), |e| e.source())
        .any(|e| e.is::<std::io::Error>());
    (error.is_closed() || io).then_some(Unavailability::Unreachable)
}

/// Whether retrying the whole transaction at once may succeed (a deadlock or serialization
/// failure between concurrent batches).
pub(super) fn is_retryable_conflict(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Unavailable {
            cause: Unavailability::Locked,
            ..
        }
    )
}
