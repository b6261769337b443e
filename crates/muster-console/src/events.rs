//! `GET /console/events/registrations`: the live registration stream for the overview, with
//! the session instead of a SAS token. It needs what `GET /events/registrations` needs
//! (RegistrationStatusRead, judged by the API's Authorizer) and shares its subscriber limit.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_proto::AccessRight;

use crate::Console;

pub async fn stream(State(c): State<Console>, headers: HeaderMap) -> Response {
    // An EventSource cannot follow a sign-in redirect usefully: answer 401 instead.
    let Some(s) = c.session(&headers) else {
        return (StatusCode::UNAUTHORIZED, "sign in first").into_response();
    };
    if let Err(f) = c.has_right(&s, AccessRight::RegistrationStatusRead) {
        return (f.status_code(), f.text()).into_response();
    }
    let Some(feed) = c.registration_events() else {
        return (
            StatusCode::NOT_FOUND,
            "this server has no live registration feed",
        )
            .into_response();
    };
    match feed.subscribe() {
        Some(sub) => feed.sse(sub),
        None => {
            let e = muster_service_api::events::too_many_subscribers(feed);
            (StatusCode::TOO_MANY_REQUESTS, e.message).into_response()
        }
    }
}
