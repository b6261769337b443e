//! `Connection: close` on a response whose request body was not read to its end.
//!
//! A handler that refuses a request early (a bad token, say) answers before it reads the
//! body. hyper then cannot reuse the connection and closes it once the response is written,
//! but the response did not say so: a client that puts the connection back in its pool may
//! send its next request into the closing socket and see "connection reset" instead of an
//! answer (Python's requests did, under load, for the request after a refused query). Saying
//! `Connection: close` tells the client to open a new connection instead.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};

pub async fn close_when_body_unread(req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let finished = Arc::new(AtomicBool::new(false));
    let req = req.map(|inner| {
        Body::new(Tracked {
            inner,
            finished: finished.clone(),
        })
    });
    let mut response = next.run(req).await;
    // An upgrade (WebSocket) has no body and keeps its connection by design.
    if !finished.load(Ordering::Acquire)
        && response.status() != axum::http::StatusCode::SWITCHING_PROTOCOLS
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that notes when it has been read to its end.
struct Tracked {
    inner: Body,
    finished: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.finished.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt;

    fn app() -> Router {
        Router::new()
            .route(
                "/refuse",
                post(|| async { axum::http::StatusCode::UNAUTHORIZED }),
            )
            .route(
                "/read",
                post(|body: Bytes| async move { body.len().to_string() }),
            )
            .layer(axum::middleware::from_fn(close_when_body_unread))
    }

    async fn connection_header(path: &str, body: &'static str) -> Option<String> {
        let req = Request::post(path).body(Body::from(body)).unwrap();
        let res = app().oneshot(req).await.unwrap();
        res.headers()
            .get(header::CONNECTION)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn an_unread_body_closes_the_connection_and_a_read_one_keeps_it() {
        assert_eq!(
            connection_header("/refuse", "{\"x\":1}").await.as_deref(),
            Some("close")
        );
        assert_eq!(connection_header("/read", "{\"x\":1}").await, None);
        // No body: nothing left unread.
        assert_eq!(connection_header("/refuse", "").await, None);
    }
}
