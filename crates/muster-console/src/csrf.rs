//! CSRF protection and form parsing.
//!
//! Every form carries the session's CSRF token in a hidden `csrf` field (the layout also puts
//! it in `<meta name="csrf-token">` for scripts). [`Console::guard`] is the first thing every
//! POST handler calls: it refuses a request whose `Origin` header is present and names another
//! host, reads the form (url-encoded or multipart), requires a live session and compares the
//! token in constant time. A refusal is a 403 page that says the CSRF check failed. The
//! sign-in form, which has no session yet, uses a token in a short-lived cookie instead
//! (double submit), see `session.rs`.

use std::collections::HashMap;

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::page::{message_page, PageCtx};
use crate::session::Session;
use crate::Console;

/// Largest form body (an X.509 certificate upload fits easily).
pub const MAX_FORM_BYTES: usize = 256 * 1024;

/// A parsed form: each name with its values in order.
#[derive(Debug, Default, Clone)]
pub struct Fields(HashMap<String, Vec<String>>);

impl Fields {
    /// The first value of `name`, or "".
    pub fn get(&self, name: &str) -> &str {
        self.0
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Every value of `name` (checkbox lists).
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0.get(name).cloned().unwrap_or_default()
    }

    /// Whether `name` was sent (a checked checkbox).
    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    fn push(&mut self, name: String, value: String) {
        self.0.entry(name).or_default().push(value);
    }
}

/// Reads a url-encoded or multipart form body.
#[allow(clippy::result_large_err)]
pub async fn read_form(req: Request) -> Result<(HeaderMap, Fields), Response> {
    let headers = req.headers().clone();
    let ct = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut fields = Fields::default();
    if ct.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| bad_form(e.body_text()))?;
        let mut total = 0usize;
        while let Some(field) = mp.next_field().await.map_err(|e| bad_form(e.body_text()))? {
            let name = field.name().unwrap_or("").to_string();
            let bytes = field.bytes().await.map_err(|e| bad_form(e.body_text()))?;
            total += bytes.len();
            if total > MAX_FORM_BYTES {
                return Err(bad_form("the form is too large".into()));
            }
            fields.push(name, String::from_utf8_lossy(&bytes).into_owned());
        }
    } else {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_FORM_BYTES)
            .await
            .map_err(|_| bad_form("the form is too large or could not be read".into()))?;
        for (k, v) in form_urlencoded_pairs(&bytes) {
            fields.push(k, v);
        }
    }
    Ok((headers, fields))
}

/// `application/x-www-form-urlencoded` pairs (`+` is a space, then percent-decoding).
fn form_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &[u8]| {
        let plus: Vec<u8> = s
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        percent_encoding::percent_decode(&plus)
            .decode_utf8_lossy()
            .into_owned()
    };
    body.split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|&b| b == b'=') {
            Some(i) => (decode(&p[..i]), decode(&p[i + 1..])),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn bad_form(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

/// Constant-time comparison of a form token with the expected one; empty never matches.
pub fn tokens_match(expected: &str, given: &str) -> bool {
    !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

/// A present `Origin` must name the host the request was sent to.
#[allow(clippy::result_large_err)]
pub fn check_origin(headers: &HeaderMap) -> Result<(), Response> {
    let Some(origin) = headers.get(http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let same = origin
        .strip_prefix("https://")
        .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host));
    if same {
        Ok(())
    } else {
        Err(refused())
    }
}

/// The 403 page for a failed CSRF check.
pub fn refused() -> Response {
    message_page(
        PageCtx {
            title: "CSRF check failed".into(),
            nav: "",
            csrf: String::new(),
            policy: None,
            flash: None,
            ..PageCtx::default()
        },
        StatusCode::FORBIDDEN,
        "CSRF check failed",
        "The form was refused because the CSRF check failed: it did not carry this session's \
         token or came from another site. Go back, reload the page and try again."
            .into(),
    )
}

impl Console {
    /// What every signed-in POST handler calls first: Origin check, form, session, CSRF token.
    #[allow(clippy::result_large_err)]
    pub async fn guard(&self, req: Request) -> Result<(Session, Fields, HeaderMap), Response> {
        check_origin(req.headers())?;
        let (headers, fields) = read_form(req).await?;
        let Some(s) = self.session(&headers) else {
            // Without a session there is no token to match: the check fails either way.
            return Err(if fields.has("csrf") {
                crate::page::redirect("/console/sign-in")
            } else {
                refused()
            });
        };
        if !tokens_match(&s.csrf, fields.get("csrf")) {
            return Err(refused());
        }
        Ok((s, fields, headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_encoded_forms() {
        let pairs = form_urlencoded_pairs(b"a=1+2&b=%2Fx%3D&c&a=3");
        assert_eq!(
            pairs,
            vec![
                ("a".into(), "1 2".into()),
                ("b".into(), "/x=".into()),
                ("c".into(), "".into()),
                ("a".into(), "3".into())
            ]
        );
    }

    #[test]
    fn origin_must_be_this_host() {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, "127.0.0.1:8443".parse().unwrap());
        assert!(check_origin(&h).is_ok());
        h.insert(
            http::header::ORIGIN,
            "https://127.0.0.1:8443".parse().unwrap(),
        );
        assert!(check_origin(&h).is_ok());
        h.insert(
            http::header::ORIGIN,
            "https://evil.example".parse().unwrap(),
        );
        assert!(check_origin(&h).is_err());
        h.insert(http::header::ORIGIN, "null".parse().unwrap());
        assert!(check_origin(&h).is_err());
    }

    #[test]
    fn tokens_compare() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("", ""));
    }
}
