//! [`Bus`]: messages between the Muster nodes that share one store, for what lives in a
//! node's memory rather than in the store (a device's session, a waiting direct-method call,
//! the live telemetry and registration streams).
//!
//! A message is a topic (a short ASCII name, no spaces) and opaque bytes; what they mean
//! belongs to the callers (the hub's `cluster` module, the server's registration events).
//! [`Bus::publish`] never waits: the message is queued and sent in order by a task of its
//! own, so a device's telemetry or a method answer does not wait for a database round trip.
//! A subscriber gets the messages of every *other* node, in the order each node sent them.
//!
//! Guarantees (both implementations): at most once. A message is lost when the queue is full
//! ([`PUBLISH_QUEUE`]), when the subscriber falls more than [`RECEIVE_BUFFER`] messages
//! behind, or (PostgreSQL) while a node's listening connection is down. Callers use it only
//! for what can be lost or is kept elsewhere too: a cloud-to-device message is in the store
//! and the bus only says "device X has mail"; a method call times out; a stream viewer may
//! miss an event.
//!
//! Implementations:
//! - [`MemoryBus`] — nodes in one process ([`MemoryBus::node`]), for tests of several nodes
//!   on one SQLite file;
//! - `postgres::bus` (feature `postgres`) — PostgreSQL `LISTEN`/`NOTIFY` on the channel
//!   `muster_bus`, with payloads too large for a notification in the table `muster_bus_spill`.
//!
//! A store that one node uses alone (SQLite) has no bus ([`crate::Store::bus`] is `None`):
//! everything stays in the process, as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::broadcast;

/// Messages a node may have queued and not yet sent; more are dropped (and logged).
pub const PUBLISH_QUEUE: usize = 4096;
/// Messages a subscriber may fall behind before it loses the oldest.
pub const RECEIVE_BUFFER: usize = 4096;

/// One message from another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusMessage {
    /// The sending node's id (random per process start).
    pub origin: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Messages between the nodes that share a store (see the module doc).
pub trait Bus: Send + Sync {
    /// This node's id, as other nodes see it in [`BusMessage::origin`].
    fn node_id(&self) -> u64;
    /// Queues `payload` for every other node; never waits. `topic` is a short ASCII name
    /// without spaces.
    fn publish(&self, topic: &str, payload: Vec<u8>);
    /// The messages of every other node from now on.
    fn subscribe(&self) -> broadcast::Receiver<Arc<BusMessage>>;
}

/// Whether `topic` can travel on a bus (checked by the implementations).
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 64 && topic.bytes().all(|b| b.is_ascii_graphic())
}

/// Nodes in one process: every [`MemoryBus::node`] gets the messages the others publish.
#[derive(Clone)]
pub struct MemoryBus {
    sender: broadcast::Sender<Arc<BusMessage>>,
    next_id: Arc<AtomicU64>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        let (sender, _) = broadcast::channel(RECEIVE_BUFFER);
        Self {
            sender,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl MemoryBus {
    /// A new node on this bus.
    pub fn node(&self) -> Arc<dyn Bus> {
        Arc::new(MemoryNode {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            bus: self.clone(),
        })
    }
}

struct MemoryNode {
    id: u64,
    bus: MemoryBus,
}

impl Bus for MemoryNode {
    fn node_id(&self) -> u64 {
        self.id
    }

    fn publish(&self, topic: &str, payload: Vec<u8>) {
        if !valid_topic(topic) {
            tracing::warn!(topic, "bus message dropped: invalid topic");
            return;
        }
        let _ = self.bus.sender.send(Arc::new(BusMessage {
            origin: self.id,
            topic: topic.to_string(),
            payload,
        }));
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<BusMessage>> {
        own_filtered(self.id, self.bus.sender.subscribe())
    }
}

/// A receiver of `all`'s messages without those `node` sent itself.
pub(crate) fn own_filtered(
    node: u64,
    mut all: broadcast::Receiver<Arc<BusMessage>>,
) -> broadcast::Receiver<Arc<BusMessage>> {
    let (tx, rx) = broadcast::channel(RECEIVE_BUFFER);
    tokio::spawn(async move {
        loop {
            match all.recv().await {
                Ok(m) if m.origin == node => {}
                Ok(m) => {
                    if tx.send(m).is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "bus subscriber fell behind; messages lost");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_memory_node_hears_the_others_but_not_itself() {
        let bus = MemoryBus::default();
        let (a, b) = (bus.node(), bus.node());
        assert_ne!(a.node_id(), b.node_id());
        let mut at_a = a.subscribe();
        let mut at_b = b.subscribe();
        a.publish("t", b"from a".to_vec());
        b.publish("t", b"from b".to_vec());
        let got = at_b.recv().await.unwrap();
        assert_eq!(
            (got.origin, got.payload.as_slice()),
            (a.node_id(), &b"from a"[..])
        );
        let got = at_a.recv().await.unwrap();
        assert_eq!(
            (got.origin, got.payload.as_slice()),
            (b.node_id(), &b"from b"[..])
        );
        assert!(at_a.try_recv().is_err());
    }

    #[test]
    fn topics_are_short_words() {
        assert!(valid_topic("hub"));
        assert!(!valid_topic(""));
        assert!(!valid_topic("a b"));
        assert!(!valid_topic(&"x".repeat(65)));
    }
}
