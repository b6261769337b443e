//! Sign-in, sessions and sign-out.
//!
//! A user signs in with a shared access policy's name and one of its keys. The key is checked
//! against the Authorizer's current policies in constant time and then kept only here, in
//! memory, to mint SAS tokens for the API calls the pages make; the cookie carries a random
//! session id (32 bytes from the injected `Entropy`, base64url) and nothing else:
//! `muster_console=<id>; HttpOnly; Secure; SameSite=Strict; Path=/console`.
//!
//! Sessions expire after [`Limits::idle_secs`] without a request (judged by the injected
//! `Clock`); at most [`Limits::max_sessions`] exist, the longest idle one is dropped first.
//! Sign-out deletes the session.
//!
//! Failed sign-ins are counted per policy name ([`SignInThrottle`]): after
//! [`SignInThrottle::MAX_FAILURES`] in a window the policy's sign-in answers 429 with
//! `Retry-After` until the window ends, without looking at the key, so a key cannot be guessed
//! at speed. Only names of existing policies are counted, which bounds the table.

use std::collections::HashMap;
use std::sync::Mutex;

use askama::Template;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::csrf;
use crate::page::{redirect, render_status, PageCtx};
use crate::Console;

static SIGN_IN_LOCKED_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// The session cookie's name.
pub const COOKIE: &str = "muster_console";
/// The cookie that carries the sign-in form's CSRF token before a session exists.
pub const SIGN_IN_COOKIE: &str = "muster_console_signin";

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Seconds without a request after which a session ends.
    pub idle_secs: i64,
    /// Most sessions at once.
    pub max_sessions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_secs: 30 * 60,
            max_sessions: 1_000,
        }
    }
}

/// A signed-in user. `key` never leaves the server.
#[derive(Clone)]
pub struct Session {
    pub id: String,
    pub policy: String,
    pub key: String,
    pub csrf: String,
    last_seen: i64,
    flash: Option<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Failed sign-ins per policy name, in fixed windows.
#[derive(Default)]
pub struct SignInThrottle {
    failures: Mutex<HashMap<String, (i64, u32)>>,
}

impl SignInThrottle {
    /// Failed attempts a policy may have in one window.
    pub const MAX_FAILURES: u32 = 10;
    /// Window length, seconds.
    pub const WINDOW_SECS: i64 = 60;

    /// `Some(seconds to wait)` while `policy` is locked out at `now`.
    pub fn locked_for(&self, policy: &str, now: i64) -> Option<i64> {
        let table = self.failures.lock().ok()?;
        let (start, n) = *table.get(&policy.to_ascii_lowercase())?;
        let end = start + Self::WINDOW_SECS;
        (n >= Self::MAX_FAILURES && now < end).then_some(end - now)
    }

    /// Counts a failed attempt for `policy` at `now`.
    pub fn failed(&self, policy: &str, now: i64) {
        if let Ok(mut table) = self.failures.lock() {
            let entry = table.entry(policy.to_ascii_lowercase()).or_insert((now, 0));
            if now >= entry.0 + Self::WINDOW_SECS {
                *entry = (now, 0);
            }
            entry.1 = entry.1.saturating_add(1);
        }
    }
}

/// The in-memory session table.
pub struct Sessions {
    limits: Limits,
    table: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn create(&self, policy: String, key: String, id: String, csrf: String, now: i64) {
        let mut t = self.lock();
        t.retain(|_, s| now - s.last_seen <= self.limits.idle_secs);
        while t.len() >= self.limits.max_sessions {
            let oldest = t
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => t.remove(&k),
                None => break,
            };
        }
        t.insert(
            id.clone(),
            Session {
                id,
                policy,
                key,
                csrf,
                last_seen: now,
                flash: None,
            },
        );
    }

    /// The live session with this id, touched; an expired one is removed.
    fn touch(&self, id: &str, now: i64) -> Option<Session> {
        let mut t = self.lock();
        let expired = t
            .get(id)
            .is_some_and(|s| now - s.last_seen > self.limits.idle_secs);
        if expired {
            t.remove(id);
            return None;
        }
        let s = t.get_mut(id)?;
        s.last_seen = now;
        Some(s.clone())
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// A one-shot message for the next page (Post/Redirect/Get).
    pub fn set_flash(&self, id: &str, message: impl Into<String>) {
        if let Some(s) = self.lock().get_mut(id) {
            s.flash = Some(message.into());
        }
    }

    pub fn take_flash(&self, id: &str) -> Option<String> {
        self.lock().get_mut(id).and_then(|s| s.flash.take())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The value of cookie `name` in the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(name: &str, value: &str, max_age: Option<i64>) -> String {
    let mut c = format!("{name}={value}; HttpOnly; Secure; SameSite=Strict; Path=/console");
    if let Some(a) = max_age {
        c.push_str(&format!("; Max-Age={a}"));
    }
    c
}

impl Console {
    /// The signed-in session of this request, if any.
    pub fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        self.sessions().touch(id, self.now_unix())
    }

    /// The session, or a redirect to the sign-in page.
    #[allow(clippy::result_large_err)]
    pub fn require_session(&self, headers: &HeaderMap) -> Result<Session, Response> {
        self.session(headers)
            .ok_or_else(|| redirect("/console/sign-in"))
    }

    fn random_token(&self) -> String {
        let mut b = [0u8; 32];
        self.api().entropy.fill(&mut b);
        B64URL.encode(b)
    }

    /// The layout data of a signed-in page; takes the session's flash message.
    pub fn page_ctx(&self, s: &Session, title: impl Into<String>, nav: &'static str) -> PageCtx {
        PageCtx {
            title: title.into(),
            nav,
            csrf: s.csrf.clone(),
            policy: Some(s.policy.clone()),
            flash: self.sessions().take_flash(&s.id),
            lacking: muster_proto::AccessRight::ALL
                .iter()
                .copied()
                .filter(|r| self.has_right(s, *r).is_err())
                .collect(),
            now: self.now_unix(),
            denied: None,
        }
    }

    fn policy_exists(&self, name: &str) -> bool {
        self.api()
            .auth
            .policies()
            .iter()
            .any(|p| p.key_name.eq_ignore_ascii_case(name.trim()))
    }

    /// Whether `name` + `key` name a current policy; the key is compared in constant time
    /// with both of its keys.
    fn check_policy(&self, name: &str, key: &str) -> Option<String> {
        let key = key.trim();
        let mut found: Option<String> = None;
        for p in self.api().auth.policies() {
            if !p.key_name.eq_ignore_ascii_case(name.trim()) {
                continue;
            }
            let a = p.primary_key.as_bytes().ct_eq(key.as_bytes());
            let b = p.secondary_key.as_bytes().ct_eq(key.as_bytes());
            if bool::from(a | b) {
                found = Some(p.key_name.clone());
            }
        }
        found
    }
}

#[derive(Template)]
#[template(path = "sign_in.html")]
struct SignInPage {
    page: PageCtx,
    name: String,
    error: Option<String>,
}

#[derive(Deserialize)]
pub struct SignInQuery {
    #[serde(default)]
    signed_out: Option<String>,
}

/// `GET /console/sign-in`: the form, with a fresh pre-session CSRF token in a cookie.
pub async fn sign_in_page(
    State(c): State<Console>,
    Query(q): Query<SignInQuery>,
    headers: HeaderMap,
) -> Response {
    if c.session(&headers).is_some() {
        return redirect("/console");
    }
    let flash = q.signed_out.map(|_| "You are signed out.".to_string());
    sign_in_form(&c, String::new(), None, flash, StatusCode::OK)
}

fn sign_in_form(
    c: &Console,
    name: String,
    error: Option<String>,
    flash: Option<String>,
    status: StatusCode,
) -> Response {
    let token = c.random_token();
    let page = SignInPage {
        page: PageCtx {
            title: "Sign in".into(),
            nav: "",
            csrf: token.clone(),
            policy: None,
            flash,
            ..PageCtx::default()
        },
        name,
        error,
    };
    let mut resp = render_status(status, &page);
    if let Ok(v) = set_cookie(SIGN_IN_COOKIE, &token, None).parse() {
        resp.headers_mut().append(http::header::SET_COOKIE, v);
    }
    resp
}

/// `POST /console/sign-in`.
pub async fn sign_in(State(c): State<Console>, req: Request) -> Response {
    let (headers, fields) = match csrf::read_form(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = csrf::check_origin(&headers) {
        return r;
    }
    let expected = cookie(&headers, SIGN_IN_COOKIE).unwrap_or("");
    if !csrf::tokens_match(expected, fields.get("csrf")) {
        return csrf::refused();
    }
    let name = fields.get("policy").trim().to_string();
    let key = fields.get("key").to_string();
    let now = c.now_unix();
    if let Some(wait) = c.sign_ins().locked_for(&name, now) {
        // Every attempt during a lockout meets it: one line per interval, with the count.
        if let Some(suppressed) = SIGN_IN_LOCKED_LOG.admit() {
            tracing::warn!(policy = %name, suppressed, "console sign-in locked after repeated failures");
        }
        let mut resp = sign_in_form(
            &c,
            name,
            Some(format!(
                "Too many failed sign-ins for this policy; try again in {wait} s."
            )),
            None,
            StatusCode::TOO_MANY_REQUESTS,
        );
        if let Ok(v) = wait.to_string().parse() {
            resp.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        return resp;
    }
    let Some(policy) = c.check_policy(&name, &key) else {
        if c.policy_exists(&name) {
            c.sign_ins().failed(&name, now);
        }
        // A per-request refusal: the lockout above is what an operator needs to see.
        tracing::debug!(policy = %name, "console sign-in refused");
        return sign_in_form(
            &c,
            name,
            Some("That policy name and key do not match a shared access policy.".into()),
            None,
            StatusCode::UNAUTHORIZED,
        );
    };
    let id = c.random_token();
    let token = c.random_token();
    c.sessions().create(
        policy.clone(),
        key.trim().to_string(),
        id.clone(),
        token,
        c.now_unix(),
    );
    tracing::info!(policy = %policy, "console sign-in");
    let mut resp = redirect("/console");
    let h = resp.headers_mut();
    if let Ok(v) = set_cookie(COOKIE, &id, None).parse() {
        h.append(http::header::SET_COOKIE, v);
    }
    if let Ok(v) = set_cookie(SIGN_IN_COOKIE, "", Some(0)).parse() {
        h.append(http::header::SET_COOKIE, v);
    }
    resp
}

/// `POST /console/sign-out`: deletes the session and the cookie.
pub async fn sign_out(State(c): State<Console>, req: Request) -> Response {
    let (s, _, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    c.sessions().remove(&s.id);
    let mut resp = redirect("/console/sign-in?signed_out=1");
    if let Ok(v) = set_cookie(COOKIE, "", Some(0)).parse() {
        resp.headers_mut().append(http::header::SET_COOKIE, v);
    }
    resp
}

/// The response for a page whose right the policy lacks, or any API refusal that is not tied
/// to a form.
pub fn forbidden_page(c: &Console, s: &Session, nav: &'static str, message: String) -> Response {
    crate::page::message_page(
        c.page_ctx(s, "Not allowed", nav),
        StatusCode::FORBIDDEN,
        "Not allowed",
        message,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn repeated_failures_lock_a_policy_for_the_rest_of_its_window() {
        let t = super::SignInThrottle::default();
        let max = super::SignInThrottle::MAX_FAILURES;
        for i in 0..max {
            assert_eq!(t.locked_for("Owner", 100), None, "after {i} failures");
            t.failed("owner", 100 + i64::from(i));
        }
        assert_eq!(t.locked_for("OWNER", 110), Some(50));
        assert_eq!(
            t.locked_for("reader", 110),
            None,
            "other policies are not affected"
        );
        assert_eq!(t.locked_for("owner", 160), None, "the window ended");
        t.failed("owner", 160);
        assert_eq!(
            t.locked_for("owner", 161),
            None,
            "a new window counts from zero"
        );
    }

    use super::*;

    #[test]
    fn sessions_expire_and_are_capped() {
        let s = Sessions::new(Limits {
            idle_secs: 10,
            max_sessions: 2,
        });
        s.create("p".into(), "k".into(), "a".into(), "t".into(), 0);
        assert!(s.touch("a", 5).is_some());
        assert!(s.touch("a", 16).is_none(), "idle for 11 s");
        s.create("p".into(), "k".into(), "a".into(), "t".into(), 20);
        s.create("p".into(), "k".into(), "b".into(), "t".into(), 21);
        s.create("p".into(), "k".into(), "c".into(), "t".into(), 22);
        assert_eq!(s.len(), 2);
        assert!(s.touch("a", 22).is_none(), "the longest idle one went");
        assert!(s.touch("c", 22).is_some());
    }

    #[test]
    fn reads_cookies() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            "x=1; muster_console=abc; y=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "z"), None);
    }
}
