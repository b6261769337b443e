//! [`PreAuthHold`]: what a connection holds until it has authenticated.
//!
//! The listener gives each connection a slot that counts it as unauthenticated (per source
//! address, so one address cannot take every connection slot). The transports here hand it on
//! and let go of it the moment the device has proved who it is: an MQTT registration session
//! when the registrar accepted a request. What the slot is stays the listener's business.

use std::sync::{Arc, Mutex};

/// Something held while a connection is unauthenticated; released once it has authenticated,
/// or dropped with the connection. Clones share the one slot (so it can ride in an HTTP
/// request's extensions to the WebSocket handler).
#[derive(Clone, Default)]
pub struct PreAuthHold(Arc<Mutex<Option<Box<dyn Send>>>>);

impl PreAuthHold {
    /// Holds `slot` until [`release`](Self::release) or until every clone is dropped.
    pub fn new(slot: impl Send + 'static) -> Self {
        Self(Arc::new(Mutex::new(Some(Box::new(slot)))))
    }

    /// Holds nothing (a connection nobody counts).
    pub fn none() -> Self {
        Self::default()
    }

    /// Lets go of the slot: the connection has authenticated.
    pub fn release(&self) {
        let slot = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(slot);
    }

    /// Moves the slot into a new, unshared hold (this one then holds nothing).
    pub fn take(&self) -> PreAuthHold {
        let slot = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        Self(Arc::new(Mutex::new(slot)))
    }

    /// Whether a slot is still held.
    pub fn is_held(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

impl std::fmt::Debug for PreAuthHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PreAuthHold").field(&self.is_held()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Slot(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn release_and_take_move_or_drop_the_one_slot() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hold = PreAuthHold::new(Slot(dropped.clone()));
        let moved = hold.take();
        assert!(!hold.is_held() && moved.is_held());
        let clone = moved.clone();
        drop(moved);
        assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
        clone.release();
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
        assert!(!clone.is_held());
    }
}
