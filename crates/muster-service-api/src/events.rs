//! Live registration events: `GET /events/registrations`, a Server-Sent Events stream of
//! every registration the engine answers (outcome, registration id, hub, transport, duration,
//! error code), authorized like `GET /registrations/{id}` (RegistrationStatusRead).
//!
//! [`RegistrationFeed`] is a broadcast channel the server feeds from the engine's answers (no
//! store polling). Each subscriber has a bounded buffer ([`FEED_CAPACITY`]): one that reads too
//! slowly loses the oldest events and gets one `lagged` event saying how many, counted in
//! [`RegistrationFeed::lagged_total`], instead of making the server buffer without bound. At
//! most [`RegistrationFeed::max_subscribers`] streams are open at once; one more is refused
//! with 429.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use muster_proto::{AccessRight, ErrorCode, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::request::QueryParams;
use crate::ServiceApi;

/// Events each subscriber may fall behind before it loses the oldest.
pub const FEED_CAPACITY: usize = 256;
/// Streams open at once unless configured otherwise.
pub const DEFAULT_MAX_SUBSCRIBERS: usize = 32;

/// One registration, as the stream sends it (`event: registration`, JSON data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationEvent {
    /// When the engine answered.
    pub time: Timestamp,
    /// `assigned`, `assigning`, `failed` (a registration refused or failed), as DPS names
    /// registration statuses.
    pub outcome: String,
    pub registration_id: String,
    /// The assigned hub, when there is one.
    pub hub: Option<String>,
    /// `https` or `mqtt` (MQTT over WebSocket included).
    pub transport: String,
    /// From the request to the answer, by the injected clock.
    pub duration_ms: u64,
    /// The DPS error code of a failed registration.
    pub error_code: Option<u64>,
}

/// The broadcast channel between the engine's answers and the streams.
#[derive(Clone)]
pub struct RegistrationFeed {
    sender: broadcast::Sender<Arc<RegistrationEvent>>,
    subscribers: Arc<Semaphore>,
    max_subscribers: usize,
    lagged: Arc<AtomicU64>,
}

impl Default for RegistrationFeed {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_SUBSCRIBERS)
    }
}

/// A subscription: the receiver and the slot it holds until dropped.
pub struct Subscription {
    pub receiver: broadcast::Receiver<Arc<RegistrationEvent>>,
    _slot: OwnedSemaphorePermit,
}

impl RegistrationFeed {
    pub fn new(max_subscribers: usize) -> Self {
        let (sender, _) = broadcast::channel(FEED_CAPACITY);
        Self {
            sender,
            subscribers: Arc::new(Semaphore::new(max_subscribers)),
            max_subscribers,
            lagged: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sends to every subscriber; nobody listening is not an error.
    pub fn publish(&self, event: RegistrationEvent) {
        let _ = self.sender.send(Arc::new(event));
    }

    /// A new subscription, or `None` when [`Self::max_subscribers`] are open.
    pub fn subscribe(&self) -> Option<Subscription> {
        let slot = self.subscribers.clone().try_acquire_owned().ok()?;
        Some(Subscription {
            receiver: self.sender.subscribe(),
            _slot: slot,
        })
    }

    pub fn max_subscribers(&self) -> usize {
        self.max_subscribers
    }

    /// Events lost by slow subscribers since the start, over all subscribers.
    pub fn lagged_total(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }

    /// The SSE response for `subscription`: `registration` events, `lagged` events with
    /// `{"skipped": n}`, keep-alive comments.
    pub fn sse(&self, subscription: Subscription) -> Response {
        let lagged = self.lagged.clone();
        let stream = futures_util::stream::unfold(subscription, move |mut sub| {
            let lagged = lagged.clone();
            async move {
                let event = match sub.receiver.recv().await {
                    Ok(e) => Event::default()
                        .event("registration")
                        .json_data(&*e)
                        .unwrap_or_else(|_| Event::default().comment("unencodable event")),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        lagged.fetch_add(n, Ordering::Relaxed);
                        Event::default()
                            .event("lagged")
                            .data(format!("{{\"skipped\":{n}}}"))
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                Some((Ok::<_, Infallible>(event), sub))
            }
        });
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response()
    }
}

/// The refusal when every subscriber slot is taken.
pub fn too_many_subscribers(feed: &RegistrationFeed) -> ApiError {
    ApiError::new(
        ErrorCode::Throttled,
        format!(
            "{} registration event streams are already open; close one or retry later",
            feed.max_subscribers()
        ),
    )
}

/// `GET /events/registrations` over `feed`. Merge into the app next to [`crate::router`].
pub fn router(api: ServiceApi, feed: RegistrationFeed) -> Router {
    Router::new()
        .route("/events/registrations", get(stream))
        .with_state((api, feed))
}

async fn stream(
    State((api, feed)): State<(ServiceApi, RegistrationFeed)>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::routes::admit(&api, &headers, &params, AccessRight::RegistrationStatusRead)?;
    let subscription = feed
        .subscribe()
        .ok_or_else(|| too_many_subscribers(&feed))?;
    Ok(feed.sse(subscription))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn event(n: usize) -> RegistrationEvent {
        RegistrationEvent {
            time: Timestamp::from_unix_millis(1_800_000_000_000).expect("time"),
            outcome: "assigned".into(),
            registration_id: format!("dev-{n}"),
            hub: Some("hub.local".into()),
            transport: "mqtt".into(),
            duration_ms: 1,
            error_code: None,
        }
    }

    async fn next_text(body: &mut axum::body::Body) -> String {
        let frame = body.frame().await.expect("a frame").expect("no error");
        let data = frame.into_data().expect("a data frame");
        String::from_utf8(data.to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn a_slow_subscriber_gets_one_counted_lagged_event_and_slots_are_limited() {
        let feed = RegistrationFeed::new(1);
        let sub = feed.subscribe().expect("a slot");
        assert!(feed.subscribe().is_none(), "one subscriber at most");
        for n in 0..FEED_CAPACITY + 10 {
            feed.publish(event(n));
        }
        let mut body = feed.sse(sub).into_body();
        let first = next_text(&mut body).await;
        assert!(
            first.starts_with("event: lagged\ndata: {\"skipped\":10}\n"),
            "{first}"
        );
        assert_eq!(feed.lagged_total(), 10);
        let second = next_text(&mut body).await;
        assert!(second.starts_with("event: registration\n"), "{second}");
        assert!(second.contains("\"registrationId\":\"dev-10\""), "{second}");
        drop(body);
        assert!(feed.subscribe().is_some(), "a closed stream frees its slot");
    }
}
