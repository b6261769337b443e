//! What every page shares: the layout's data, rendering, redirects, message pages and the
//! security headers on every console response.

use askama::Template;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};

/// The layout's data (`templates/base.html`).
#[derive(Debug, Clone, Default)]
pub struct PageCtx {
    pub title: String,
    /// Which navigation entry is current ("" for none).
    pub nav: &'static str,
    /// The session's CSRF token, for the sign-out form and `<meta name="csrf-token">`.
    pub csrf: String,
    /// The signed-in policy, `None` on the sign-in page.
    pub policy: Option<String>,
    /// A one-shot message from the previous POST.
    pub flash: Option<String>,
    /// The rights the signed-in policy lacks: controls that need one are disabled or hidden
    /// and name it ([`PageCtx::needs`]).
    pub lacking: Vec<muster_proto::AccessRight>,
    /// A refusal for lack of rights (401/403) from the action just tried, shown at the top of
    /// the page, whichever form it came from.
    pub denied: Option<String>,
    /// The injected clock's time (unix seconds) when the page was made, for relative times.
    pub now: i64,
}

impl PageCtx {
    /// The running Muster's version, shown in every page's footer.
    pub fn version(&self) -> &'static str {
        crate::VERSION
    }

    /// Sets [`PageCtx::denied`] when `error` (a [`crate::api::Failure::text`]) is a
    /// 401/403 refusal.
    pub fn deny_if_refused(&mut self, error: Option<&String>) {
        if let Some(e) = error.filter(|e| is_refusal(e)) {
            self.denied = Some(e.clone());
        }
    }

    /// A timestamp as pages show it ([`crate::times`]).
    pub fn time(&self, text: &str) -> crate::times::Shown {
        crate::times::show(text, self.now)
    }

    /// Whether the signed-in policy lacks `right` (an [`muster_proto::AccessRight`] name).
    pub fn lacks(&self, right: &str) -> bool {
        self.lacking.iter().any(|r| r.as_str() == right)
    }

    /// "needs EnrollmentWrite" when the policy lacks `right`, else "": the title and note of
    /// a control the policy cannot use.
    pub fn needs(&self, right: &str) -> String {
        if self.lacks(right) {
            format!("needs {right}")
        } else {
            String::new()
        }
    }

    /// `aria-current="page"` for the current navigation entry.
    pub fn current(&self, nav: &str) -> &'static str {
        if self.nav == nav {
            "page"
        } else {
            "false"
        }
    }
}

/// Whether a [`crate::api::Failure::text`] is an authorization refusal (DPS error codes
/// 401xxx and 403xxx).
pub fn is_refusal(text: &str) -> bool {
    text.contains("(error 401") || text.contains("(error 403")
}

/// A broken template fails every request for its page: one line per interval.
static TEMPLATE_FAILED_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// Renders a template as a 200 HTML page.
pub fn render<T: Template>(t: &T) -> Response {
    render_status(StatusCode::OK, t)
}

pub fn render_status<T: Template>(status: StatusCode, t: &T) -> Response {
    match t.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            if let Some(suppressed) = TEMPLATE_FAILED_LOG.admit() {
                tracing::error!(error = %e, suppressed, "console template failed");
            }
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

/// 303 See Other: the Post/Redirect/Get answer to every successful form.
pub fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage {
    page: PageCtx,
    heading: String,
    message: String,
}

/// A page with a heading and one paragraph (errors, refusals).
pub fn message_page(page: PageCtx, status: StatusCode, heading: &str, message: String) -> Response {
    render_status(
        status,
        &MessagePage {
            page,
            heading: heading.into(),
            message,
        },
    )
}

/// 404 for console paths no route serves.
pub async fn not_found() -> Response {
    message_page(
        PageCtx {
            title: "Not found".into(),
            ..PageCtx::default()
        },
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no console page at this address.".into(),
    )
}

/// Headers on every console response. Pages are never cached (several show keys); the
/// static assets set their own long `Cache-Control` first.
pub async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    if !h.contains_key(http::header::CACHE_CONTROL) {
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
    }
    resp
}

/// Percent-encodes one path segment (ids may hold `:`, `.`, `-`, `_`).
pub fn seg(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// Percent-encodes a query value.
pub fn q(s: &str) -> String {
    seg(s)
}
