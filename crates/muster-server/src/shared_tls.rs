//! One TLS identity for every node of a shared store (PostgreSQL): the local CA and the
//! server certificate `serve` generates when no `--tls-cert` is given are created once and
//! kept in the store (setting `sharedTlsIdentity`; settings are sealed with the sealing key
//! every node shares), so every node serves the same chain and clients trust one CA.
//!
//! [`share`] runs before the data dir's CA and server certificate are loaded: it writes the
//! stored ones into the data dir, where the usual loading takes them up. The first node finds
//! none stored: it stores its own (created if missing) with a create-only write, so of nodes
//! starting together one wins and the others take its identity. A node told other host
//! names than the stored certificate covers issues itself a certificate for them from the
//! shared CA (in its data dir only), as `ServerIdentity::load_or_create` does on one node.

use std::path::Path;

use muster_store::{Collection, Expect, Store, Write, WriteOutcome};
use serde::{Deserialize, Serialize};

use crate::tls::{
    self, LocalCa, ServerIdentity, CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE,
};
use crate::ServerError;

/// The setting holding the shared identity.
pub const SETTING: &str = "sharedTlsIdentity";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SharedIdentity {
    ca_cert: String,
    ca_key: String,
    server_cert: String,
    server_key: String,
}

/// Makes `data_dir` hold the installation's shared CA and server certificate (see the
/// module docs).
pub async fn share(
    store: &dyn Store,
    data_dir: &Path,
    hosts: &[String],
) -> Result<(), ServerError> {
    let shared = match read(store).await? {
        Some(shared) => shared,
        None => {
            let ca = LocalCa::load_or_create(data_dir)?;
            ServerIdentity::load_or_create(data_dir, &ca, hosts)?;
            let mine = SharedIdentity {
                ca_cert: tls::read_pem(&data_dir.join(CA_CERT_FILE))?,
                ca_key: tls::read_pem(&data_dir.join(CA_KEY_FILE))?,
                server_cert: tls::read_pem(&data_dir.join(SERVER_CERT_FILE))?,
                server_key: tls::read_pem(&data_dir.join(SERVER_KEY_FILE))?,
            };
            let body = serde_json::to_value(&mine).map_err(|e| {
                ServerError::Engine(format!("encoding the shared TLS identity: {e}"))
            })?;
            let outcome = store
                .write(vec![Write::put(
                    Collection::Settings,
                    SETTING,
                    Expect::Absent,
                    body,
                )])
                .await?;
            if matches!(outcome.first(), Some(WriteOutcome::Written { .. })) {
                tracing::info!("stored this node's CA and server certificate for the other nodes");
                return Ok(());
            }
            // Another node stored its identity first: take it.
            read(store).await?.ok_or_else(|| {
                ServerError::Engine("the shared TLS identity vanished while it was read".into())
            })?
        }
    };
    let files = [
        (CA_CERT_FILE, &shared.ca_cert, false),
        (CA_KEY_FILE, &shared.ca_key, true),
        (SERVER_CERT_FILE, &shared.server_cert, false),
        (SERVER_KEY_FILE, &shared.server_key, true),
    ];
    for (name, contents, private) in files {
        let path = data_dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(contents.as_str()) {
            continue;
        }
        if private {
            tls::write_private(&path, contents.as_bytes())?;
        } else {
            tls::write_public(&path, contents.as_bytes())?;
        }
    }
    Ok(())
}

async fn read(store: &dyn Store) -> Result<Option<SharedIdentity>, ServerError> {
    match store.get(Collection::Settings, SETTING).await? {
        Some(r) => serde_json::from_value(r.body).map(Some).map_err(|e| {
            ServerError::Engine(format!("the stored shared TLS identity is unreadable: {e}"))
        }),
        None => Ok(None),
    }
}
