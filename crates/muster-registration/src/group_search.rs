//! The search through every symmetric-key group for a device whose group is not known, and the
//! bound on what such searches may cost the server.
//!
//! A group device signs with `HMAC(group key, registration id)` and names no group, so a
//! registration id that no record ties to a group (a first registration, or a forged token)
//! can only be matched by trying each group: two HMACs per group and key, whatever the keys'
//! preparation saves. Nothing in the token narrows the search, so its cost grows with the
//! number of groups, and it is paid before the device has proved anything.
//!
//! What bounds it:
//! - up to [`INLINE_GROUPS`] groups the search runs inline (a few microseconds);
//! - beyond, at most `max_running` searches run at once, each on a blocking thread so the
//!   async workers keep serving devices whose group is known, and at most `max_waiting` wait
//!   for a turn; any more are refused at once with 429 and `retry-after` (SDKs retry), so a
//!   flood of forged tokens costs at most `max_running` cores and a bounded queue;
//! - groups the store holds beyond the cache are read only by an admitted search.
//!
//! What spares searches (both before the bound, a few tries at most): the groups that matched
//! a search recently are tried first ([`GroupSet::recent_signing`]: rollouts go group by
//! group), and a token a full search refused is refused again without one until the groups
//! change ([`GroupSet::was_refused`]).
//!
//! It must never let an unadmitted request read the groups, or hash more of them than
//! [`RECENT_GROUPS`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use muster_proto::{ErrorCode, SasToken};
use muster_store::Store;
use tokio::sync::Semaphore;

pub use crate::group_cache::Found;
use crate::group_cache::GroupCache;
#[cfg(doc)]
use crate::group_cache::{GroupSet, RECENT_GROUPS};
use crate::DeviceFailure;

/// Searches through at most this many symmetric-key groups run inline, unbounded: they cost
/// less than handing them to a thread.
pub const INLINE_GROUPS: usize = 32;

/// The bound on searches through every group.
pub struct GroupSearch {
    running: Arc<Semaphore>,
    /// Searches admitted: running or waiting for a turn.
    admitted: AtomicUsize,
    max_admitted: usize,
}

impl Default for GroupSearch {
    /// Half the cores search at most (at least one), and four searches per core may wait.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let running = (cores / 2).max(1);
        Self::new(running, running * 4)
    }
}

/// Gives back an admission however the request ends (answered, or dropped while waiting).
struct Admission<'a>(&'a AtomicUsize);

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl GroupSearch {
    pub fn new(max_running: usize, max_waiting: usize) -> Self {
        Self {
            running: Arc::new(Semaphore::new(max_running.max(1))),
            admitted: AtomicUsize::new(0),
            max_admitted: max_running.max(1) + max_waiting,
        }
    }

    /// The first group, in id order, whose derived key signed `token`, trying every group.
    /// `Throttled` when the bound is reached.
    pub async fn find(
        &self,
        groups: &GroupCache,
        store: &dyn Store,
        registration_id: &str,
        token: &SasToken,
        messages: &[String],
    ) -> Result<Option<Found>, DeviceFailure> {
        let mut loaded = groups.cached_set(store);
        if loaded.is_none() && groups.would_cache(store) {
            // A cold cache (after a start or a write to the groups) that will keep what it
            // reads: fill it outside the bound, so a burst of first registrations is not
            // refused while it fills. Only groups too many to cache are read under the bound.
            loaded = Some(groups.set(store).await?);
        }
        if let Some(set) = &loaded {
            if set.symmetric_count() <= INLINE_GROUPS {
                return Ok(set.first_signing(registration_id, token, messages));
            }
            // Both cost a few tries at most, so they run before the bound.
            if set.was_refused(registration_id, token) {
                return Ok(None);
            }
            if let Some(found) = set.recent_signing(registration_id, token, messages) {
                return Ok(Some(found));
            }
        }
        let _admission = self.admit()?;
        let _turn = self.running.clone().acquire_owned().await.map_err(|e| {
            DeviceFailure::internal("waiting for a turn to search the enrollment groups", e)
        })?;
        // Beyond the cache this lists every group: under the bound.
        let set = match loaded {
            Some(set) => set,
            None => groups.set(store).await?,
        };
        if set.symmetric_count() <= INLINE_GROUPS {
            return Ok(set.first_signing(registration_id, token, messages));
        }
        let (id, token, messages) = (
            registration_id.to_string(),
            token.clone(),
            messages.to_vec(),
        );
        tokio::task::spawn_blocking(move || {
            let found = set.first_signing(&id, &token, &messages);
            if found.is_none() {
                set.note_refused(&id, &token);
            }
            found
        })
        .await
        .map_err(|e| DeviceFailure::internal("searching the enrollment groups", e))
    }

    /// Takes every turn and waiting place until the returned guard drops: any search is then
    /// refused, so a test can tell a search from a lookup by id.
    #[cfg(test)]
    pub(crate) fn occupy(&self) -> impl Drop + '_ {
        struct Occupied<'a> {
            admitted: &'a AtomicUsize,
            places: usize,
            _turns: tokio::sync::OwnedSemaphorePermit,
        }
        impl Drop for Occupied<'_> {
            fn drop(&mut self) {
                self.admitted.fetch_sub(self.places, Ordering::AcqRel);
            }
        }
        self.admitted.fetch_add(self.max_admitted, Ordering::AcqRel);
        let permits = u32::try_from(self.running.available_permits()).unwrap_or(u32::MAX);
        let permit = self
            .running
            .clone()
            .try_acquire_many_owned(permits)
            .expect("no search runs in the test");
        Occupied {
            admitted: &self.admitted,
            places: self.max_admitted,
            _turns: permit,
        }
    }

    fn admit(&self) -> Result<Admission<'_>, DeviceFailure> {
        let before = self.admitted.fetch_add(1, Ordering::AcqRel);
        let admission = Admission(&self.admitted);
        if before >= self.max_admitted {
            return Err(DeviceFailure::new(
                ErrorCode::Throttled,
                "too many registrations of devices whose enrollment group is not yet known are \
                 being checked; retry after the indicated time",
            ));
        }
        Ok(admission)
    }
}
