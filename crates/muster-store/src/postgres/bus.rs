//! [`crate::bus::Bus`] over PostgreSQL: `NOTIFY muster_bus` carries each message to every node
//! listening, so the nodes need nothing but the database to reach each other.
//!
//! A notification's payload is text, `<origin as 16 hex digits> <topic> <body>`, where the
//! body is the message in base64, or `@<id>` when that would not fit a notification
//! (PostgreSQL's limit is 8000 bytes; [`INLINE_MAX`]): then the message is a row of
//! `muster_bus_spill` (migration 4), written before the notification is sent, and each
//! receiving node reads it by id. Spilled rows are deleted [`SPILL_KEEP_SECS`] after they were
//! written, by whichever node spills next (a node that hears of a row later than that has
//! lost the message, which the bus allows).
//!
//! Sending: one task per node takes [`Bus::publish`]'s queue in order and sends each message
//! on a pooled connection (`SELECT pg_notify(..)`, autocommit); a message that fails to send
//! is dropped with a log line. Receiving: the node's own listening connection
//! (`application_name` `muster-bus`), reconnected every second after it is lost; messages
//! sent while it is down are lost. A node's own messages come back to it and are skipped by
//! origin.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use deadpool_postgres::Pool;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::AsyncMessage;

use super::connect::Target;
use crate::bus::{valid_topic, Bus, BusMessage, PUBLISH_QUEUE, RECEIVE_BUFFER};

/// The notification channel.
pub(super) const CHANNEL: &str = "muster_bus";
/// `application_name` of the listening connection.
pub const BUS_LISTENER_NAME: &str = "muster-bus";
/// Longest notification payload sent as is (PostgreSQL refuses 8000 bytes and more).
pub const INLINE_MAX: usize = 7900;
/// How long a spilled message stays in `muster_bus_spill`.
pub const SPILL_KEEP_SECS: i64 = 60;
/// Wait before reconnecting a lost listening connection.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Spills between two sweeps of old spilled rows.
const SWEEP_EVERY: u64 = 64;

/// This node's end of the bus; its tasks stop when it is dropped.
pub(super) struct PgBus {
    id: u64,
    queue: mpsc::Sender<(String, Vec<u8>)>,
    received: broadcast::Sender<Arc<BusMessage>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for PgBus {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl PgBus {
    pub(super) fn start(target: &Target, pool: Pool, id: u64) -> PgBus {
        let (queue, outgoing) = mpsc::channel(PUBLISH_QUEUE);
        let (received, _) = broadcast::channel(RECEIVE_BUFFER);
        let sender = tokio::spawn(send_loop(pool.clone(), id, outgoing));
        let listener = tokio::spawn(listen_loop(target.clone(), pool, id, received.clone()));
        PgBus {
            id,
            queue,
            received,
            tasks: vec![sender, listener],
        }
    }
}

impl Bus for PgBus {
    fn node_id(&self) -> u64 {
        self.id
    }

    fn publish(&self, topic: &str, payload: Vec<u8>) {
        if !valid_topic(topic) {
            tracing::warn!(topic, "bus message dropped: invalid topic");
            return;
        }
        if self.queue.try_send((topic.to_string(), payload)).is_err() {
            tracing::warn!(topic, "bus message dropped: the send queue is full");
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<BusMessage>> {
        self.received.subscribe()
    }
}

/// A notification's body: the message itself or the id of its spilled row.
#[derive(Debug, PartialEq, Eq)]
enum Body {
    Inline(Vec<u8>),
    Spilled(i64),
}

fn encode_inline(origin: u64, topic: &str, payload: &[u8]) -> String {
    format!("{origin:016x} {topic} {}", B64.encode(payload))
}

fn encode_spilled(origin: u64, topic: &str, id: i64) -> String {
    format!("{origin:016x} {topic} @{id}")
}

fn decode(text: &str) -> Option<(u64, String, Body)> {
    let mut parts = text.splitn(3, ' ');
    let origin = u64::from_str_radix(parts.next()?, 16).ok()?;
    let topic = parts.next()?.to_string();
    let body = parts.next()?;
    let body = match body.strip_prefix('@') {
        Some(id) => Body::Spilled(id.parse().ok()?),
        None => Body::Inline(B64.decode(body).ok()?),
    };
    Some((origin, topic, body))
}

async fn send_loop(pool: Pool, id: u64, mut outgoing: mpsc::Receiver<(String, Vec<u8>)>) {
    let mut spills = 0u64;
    while let Some((topic, payload)) = outgoing.recv().await {
        if let Err(e) = send_one(&pool, id, &topic, &payload, &mut spills).await {
            tracing::warn!(topic, error = %e, "bus message dropped: sending it failed");
        }
    }
}

async fn send_one(
    pool: &Pool,
    id: u64,
    topic: &str,
    payload: &[u8],
    spills: &mut u64,
) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let mut text = encode_inline(id, topic, payload);
    if text.len() > INLINE_MAX {
        let row = client
            .query_one(
                "INSERT INTO muster_bus_spill (payload) VALUES ($1) RETURNING id",
                &[&payload],
            )
            .await
            .map_err(|e| e.to_string())?;
        text = encode_spilled(id, topic, row.get(0));
        *spills += 1;
        if *spills % SWEEP_EVERY == 1 {
            client
                .execute(
                    "DELETE FROM muster_bus_spill \
                     WHERE created_at < now() - make_interval(secs => $1::BIGINT)",
                    &[&SPILL_KEEP_SECS],
                )
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    client
        .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &text])
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn listen_loop(
    target: Target,
    pool: Pool,
    id: u64,
    received: broadcast::Sender<Arc<BusMessage>>,
) {
    let mut config = target.config.clone();
    config.application_name(BUS_LISTENER_NAME);
    loop {
        match listen(&config, target.tls.clone(), &pool, id, &received).await {
            Ok(()) => {
                tracing::warn!(database = %target.display, "the bus listener's connection closed; reconnecting")
            }
            Err(e) => {
                tracing::warn!(database = %target.display, error = %e, "the bus listener failed; reconnecting")
            }
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

async fn listen(
    config: &tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    pool: &Pool,
    id: u64,
    received: &broadcast::Sender<Arc<BusMessage>>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls).await?;
    let (sender, mut notifications) = mpsc::unbounded_channel();
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
    if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
        driver.abort();
        return Err(e);
    }
    while let Some(text) = notifications.recv().await {
        let Some((origin, topic, body)) = decode(&text) else {
            tracing::debug!("ignored a bus notification that is not Muster's");
            continue;
        };
        if origin == id {
            continue;
        }
        let payload = match body {
            Body::Inline(p) => p,
            Body::Spilled(row) => match fetch_spilled(pool, row).await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    tracing::warn!(topic, row, "bus message lost: its spilled row is gone");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(topic, row, error = %e, "bus message lost: reading its spilled row failed");
                    continue;
                }
            },
        };
        let _ = received.send(Arc::new(BusMessage {
            origin,
            topic,
            payload,
        }));
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

async fn fetch_spilled(pool: &Pool, row: i64) -> Result<Option<Vec<u8>>, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let found = client
        .query_opt(
            "SELECT payload FROM muster_bus_spill WHERE id = $1",
            &[&row],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(found.map(|r| r.get(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_round_trip() {
        let text = encode_inline(0xabc, "hub", b"{\"x\":1}");
        assert_eq!(
            decode(&text),
            Some((0xabc, "hub".into(), Body::Inline(b"{\"x\":1}".to_vec())))
        );
        assert_eq!(
            decode(&encode_spilled(7, "hub", 42)),
            Some((7, "hub".into(), Body::Spilled(42)))
        );
        assert_eq!(decode("not ours"), None);
    }
}
