//! The console's only CSS and JavaScript (and the site's favicon), embedded in the binary and served with long cache
//! headers (their URLs change only with the binary). The CSP forbids inline code, so every
//! behaviour lives in `static/console.js`: reveal and copy buttons, JSON validation of the
//! initial-twin editor, showing the attestation fields that match the chosen type. Every
//! core flow works without it.

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};

const CSS: &str = include_str!("../static/console.css");
const JS: &str = include_str!("../static/console.js");
const FAVICON: &str = include_str!("../static/favicon.svg");

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    r
}

pub async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

pub async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}

/// The site's icon, served at `/favicon.ico` (browsers go by the content type, not the name).
pub async fn favicon() -> Response {
    asset(FAVICON, "image/svg+xml")
}
