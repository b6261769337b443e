//! A record body as the `records.body` column holds it.
//!
//! Bodies of secret collections are sealed bytes (`Sealer::seal_bytes`), kept as a `BLOB`;
//! every other body is JSON text. A database from before migration 3 kept sealed bodies as
//! base64 text (`sealed:v1:…`); those still read, and migration 3 rewrites them as bytes.
//! SQLite keeps a value's type per row, so the column's declared `TEXT` does not matter.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::sealing::Sealer;
use crate::{Collection, StoreError};

pub(super) enum StoredBody {
    /// JSON, or a version 1 sealed body (text).
    Text(String),
    /// A sealed body (bytes).
    Sealed(Vec<u8>),
}

impl StoredBody {
    /// What to store for the JSON `text` of record `collection/key`: sealed bytes for a
    /// secret collection, the text itself otherwise.
    pub(super) fn seal(
        sealer: &Sealer,
        collection: Collection,
        key: &str,
        text: String,
    ) -> Result<Self, StoreError> {
        if collection.is_secret() {
            sealer
                .seal_bytes(collection, key, text.as_bytes())
                .map(StoredBody::Sealed)
        } else {
            Ok(StoredBody::Text(text))
        }
    }

    /// The body as JSON.
    pub(super) fn open(
        &self,
        sealer: &Sealer,
        collection: Collection,
        key: &str,
    ) -> Result<serde_json::Value, StoreError> {
        let corrupt = |e: serde_json::Error| StoreError::Corrupt {
            collection: collection.as_str(),
            key: key.to_string(),
            reason: format!("body is not valid JSON: {e}"),
        };
        match self {
            StoredBody::Sealed(bytes) => {
                let plain = sealer.open_bytes(collection, key, bytes)?;
                serde_json::from_slice(&plain).map_err(corrupt)
            }
            StoredBody::Text(text) => {
                let text = sealer.open_body(collection, key, text)?;
                serde_json::from_str(&text).map_err(corrupt)
            }
        }
    }
}

impl FromSql for StoredBody {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value {
            ValueRef::Text(text) => std::str::from_utf8(text)
                .map(|t| StoredBody::Text(t.to_owned()))
                .map_err(|e| FromSqlError::Other(Box::new(e))),
            ValueRef::Blob(bytes) => Ok(StoredBody::Sealed(bytes.to_vec())),
            _ => Err(FromSqlError::InvalidType),
        }
    }
}

impl ToSql for StoredBody {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            StoredBody::Text(text) => ValueRef::Text(text.as_bytes()),
            StoredBody::Sealed(bytes) => ValueRef::Blob(bytes),
        }))
    }
}
