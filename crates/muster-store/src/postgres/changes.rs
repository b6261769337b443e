//! [`crate::Store::changes`] across nodes: a counter per cacheable collection that moves on
//! this node's writes and on every other node's, told through PostgreSQL's `LISTEN`/`NOTIFY`.
//!
//! Only the configuration collections in [`CACHEABLE`] are counted (enrollment groups, linked
//! hubs, settings, CA certificates): they change rarely and are read on every registration,
//! so callers keep what they decoded of them. A transaction that writes one of them sends
//! `NOTIFY muster_changes, '<collection>'` (delivered when it commits, to every listening
//! node) and bumps this node's counter before it commits. Writes to other collections
//! (registrations, operations, hub devices: the registration path) send nothing, so they pay
//! nothing for it: PostgreSQL serializes the commits of notifying transactions.
//!
//! Guarantees:
//! - on the node that wrote, the counter moves before the writer hears the commit, as with
//!   SQLite;
//! - on another node, it moves once the notification arrives, normally within milliseconds of
//!   the commit; in between that node may still answer from what it had cached;
//! - while this node's listening connection is down, notifications may be missed, so
//!   [`Changes::get`] answers `None` (callers keep nothing) until it is back; reconnecting
//!   moves every counter, so nothing cached before the outage is trusted after it.
//!
//! The listening connection is the node's own (not pooled), named `muster-changes`
//! (`application_name`), and reconnects every [`RECONNECT_DELAY`] after it is lost. The task
//! ends when the store is dropped.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::AsyncMessage;

use super::connect::Target;
use crate::Collection;

/// The collections whose changes are counted across nodes.
pub(super) const CACHEABLE: [Collection; 4] = [
    Collection::EnrollmentGroups,
    Collection::LinkedHubs,
    Collection::Settings,
    Collection::CaCertificates,
];

/// The notification channel.
pub(super) const CHANNEL: &str = "muster_changes";

/// `application_name` of the listening connection.
pub const LISTENER_NAME: &str = "muster-changes";

/// Wait before reconnecting a lost listening connection.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// The counters this node keeps.
#[derive(Default)]
pub(super) struct Changes {
    counters: [AtomicU64; CACHEABLE.len()],
    listening: AtomicBool,
}

impl Changes {
    fn slot(collection: Collection) -> Option<usize> {
        CACHEABLE.iter().position(|c| *c == collection)
    }

    /// Whether writes to `collection` are counted (and must be notified).
    pub(super) fn counts(collection: Collection) -> bool {
        Self::slot(collection).is_some()
    }

    /// The counter of `collection`; `None` for a collection not counted, or while
    /// notifications from other nodes may be missed.
    pub(super) fn get(&self, collection: Collection) -> Option<u64> {
        let slot = Self::slot(collection)?;
        if !self.listening.load(Ordering::SeqCst) {
            return None;
        }
        Some(self.counters[slot].load(Ordering::SeqCst))
    }

    /// Moves the counter of `collection` (a write may commit, or has committed elsewhere).
    pub(super) fn bump(&self, collection: Collection) {
        if let Some(slot) = Self::slot(collection) {
            self.counters[slot].fetch_add(1, Ordering::SeqCst);
        }
    }

    fn bump_named(&self, name: &str) {
        match CACHEABLE.iter().find(|c| c.as_str() == name) {
            Some(collection) => self.bump(*collection),
            // From a newer Muster, or not ours: trust nothing cached.
            None => self.bump_all(),
        }
    }

    fn bump_all(&self) {
        for counter in &self.counters {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Starts the task that listens for other nodes' changes; abort the handle to stop it.
pub(super) fn spawn_listener(
    target: &Target,
    changes: Arc<Changes>,
) -> tokio::task::JoinHandle<()> {
    let mut config = target.config.clone();
    config.application_name(LISTENER_NAME);
    let tls = target.tls.clone();
    let database = target.display.clone();
    tokio::spawn(async move {
        loop {
            match listen(&config, tls.clone(), &changes).await {
                Ok(()) => {
                    tracing::warn!(database = %database, "the change listener's connection closed; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(database = %database, error = %e, "the change listener failed; reconnecting")
                }
            }
            changes.listening.store(false, Ordering::SeqCst);
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
    })
}

/// One listening connection, until it fails or closes.
async fn listen(
    config: &tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    changes: &Changes,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls).await?;
    let (sender, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    // The connection must be polled for the LISTEN to be answered and notifications to come.
    let driver = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if sender.send(n.payload().to_owned()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    let listened = client.batch_execute(&format!("LISTEN {CHANNEL}")).await;
    if let Err(e) = listened {
        driver.abort();
        return Err(e);
    }
    // Notifications sent while nobody listened are lost: trust nothing cached before now.
    changes.bump_all();
    changes.listening.store(true, Ordering::SeqCst);
    while let Some(name) = notifications.recv().await {
        changes.bump_named(&name);
    }
    changes.listening.store(false, Ordering::SeqCst);
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}
