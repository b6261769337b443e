//! Muster's web console: server-rendered HTML pages under `/console` on the DPS HTTPS port.
//!
//! The console is a *client* of Muster's own APIs, called in process: every page that reads or
//! changes enrollments, registration records or linked hubs sends a request to the service API's
//! axum router ([`muster_service_api::router`]) with a SAS token minted from the signed-in
//! policy's key, and the built-in hub's pages call the hub's REST router ([`muster_hub::router`])
//! with a token of the hub's `iothubowner` policy. Rights, validation and error codes are
//! therefore exactly the API's; the DPS error body is shown next to the field that caused it.
//!
//! Layout:
//! - [`session`] — sign-in with a shared access policy (name + key), in-memory sessions with
//!   idle expiry, sign-out; the cookie only carries a random id.
//! - [`csrf`] — the per-session token every form carries, the `Origin` check, form parsing
//!   (url-encoded and multipart) behind one guard every POST handler calls first.
//! - [`api`] — the in-process calls into the service API and hub routers; each carries the
//!   [`muster_service_api::audit::FromConsole`] extension, so the audit log records the
//!   console and the signed-in policy as the source of its writes.
//! - [`overview`] — ID scope, endpoints, CA download, counts, registrations per minute, and
//!   the live registration view ([`events`]: the session's Server-Sent Events stream, read by
//!   `console.js`; without JavaScript the section links to the records instead).
//! - [`audit_log`] — the audit log (`GET /audit`), filtered by time, policy and id, paged.
//! - [`enrollments`] — enrollment groups and individual enrollments: list, search, add (TPM:
//!   the EK checked as a `TPM2B_PUBLIC`), details (settings with the IoT Edge toggle, registration records), enable/disable,
//!   delete with cascade (its confirmation counts the records and hub devices it removes).
//! - [`registrations`] — registration records filtered by status, group and hub, paged;
//!   search by registration id or device id (one indexed store lookup); delete a record, or
//!   a record and its hub device.
//! - [`issued_certificates`] — certificates issued for CSRs, filtered by registration, paged;
//!   revoke (with a reason and a confirmation) for policies with RegistrationStatusWrite.
//! - [`linked_hubs`] — link, unlink, weight, apply allocation policy.
//! - [`ca_certificates`] — CA certificates: upload, verification code, verify with a PEM
//!   (proof of possession), delete.
//! - [`access_policies`] — shared access policies: list, create, edit rights, show and
//!   regenerate keys, delete.
//! - [`service_settings`] — the service's default allocation policy.
//! - [`hub_devices`] — the built-in hub's devices, twin and last telemetry messages.
//! - [`device_key`] — derive a device key from a group key.
//! - [`assets`] — the embedded CSS, JavaScript and favicon (no inline scripts or styles: the CSP
//!   forbids them).
//! - [`times`] — timestamps shown relative ("3 minutes ago") with the exact UTC time on
//!   hover, "never" for DPS's zero time.
//! - [`page`] — what every page's layout needs (the signed-in policy's missing rights, which
//!   disable the controls that need them) (the footer shows [`VERSION`]), rendering,
//!   security headers.
//!
//! What it must never do: put a key in a cookie, a URL or a log line; accept a POST without
//! the session's CSRF token; read the real clock or random source (both come from the
//! [`ServiceApi`]).

pub mod access_policies;
pub mod api;
pub mod assets;
pub mod audit_log;
pub mod ca_certificates;
pub mod csrf;
pub mod device_key;
pub mod enrollments;
pub mod events;
pub mod hub_devices;
pub mod issued_certificates;
pub mod linked_hubs;
pub mod overview;
pub mod page;
pub mod registrations;
pub mod service_settings;
pub mod session;
pub mod times;

use std::path::PathBuf;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use muster_hub::HubRegistry;
use muster_service_api::ServiceApi;

/// Removes a device from whichever linked hub holds it: the cascade of a deprovisioning.
/// The server implements it with the registration engine, which holds the linked hubs'
/// credentials (the console never sees them).
#[async_trait::async_trait]
pub trait HubDeviceRemover: Send + Sync {
    /// A device that is not there is not an error.
    async fn remove(&self, hub: &str, device_id: &str) -> Result<(), String>;

    /// Removes a registration record and its hub device, intent first (a crash in between
    /// is finished on the next start). `Ok(None)`: no such record; `Ok(Some(n))`: the record
    /// and `n` hub devices removed.
    async fn deprovision(&self, registration_id: &str) -> Result<Option<usize>, String>;
}

/// Where the console lives on the HTTPS port.
pub const BASE: &str = "/console";

/// The version the console shows: the package version (`CARGO_PKG_VERSION`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the overview shows and what tokens must name.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    pub id_scope: String,
    /// The global device endpoint (`host` or `host:port`).
    pub device_endpoint: String,
    /// The service API base URL.
    pub service_endpoint: String,
    /// The host (optionally `host:port`) service tokens name in `sr`; one the service API's
    /// Authorizer accepts.
    pub service_host: String,
    /// The local CA certificate clients must trust (offered for download).
    pub ca_pem_path: PathBuf,
}

/// The console's state, cheap to clone.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    config: ConsoleConfig,
    api: ServiceApi,
    service: Router,
    hub: HubRegistry,
    hub_router: Router,
    remover: Arc<dyn HubDeviceRemover>,
    /// The live registration feed, when the server has one.
    events: std::sync::OnceLock<muster_service_api::events::RegistrationFeed>,
    sessions: session::Sessions,
    sign_ins: session::SignInThrottle,
    stats: overview::StatsCache,
}

impl Console {
    pub fn new(
        config: ConsoleConfig,
        api: ServiceApi,
        hub: HubRegistry,
        remover: Arc<dyn HubDeviceRemover>,
    ) -> Self {
        let service = muster_service_api::router(api.clone());
        let hub_router = hub_auditor(&api, hub.clone()).wrap(muster_hub::router(hub.clone()));
        Self {
            inner: Arc::new(Inner {
                config,
                api,
                service,
                hub,
                hub_router,
                remover,
                events: std::sync::OnceLock::new(),
                sessions: session::Sessions::new(session::Limits::default()),
                sign_ins: session::SignInThrottle::default(),
                stats: overview::StatsCache::default(),
            }),
        }
    }

    /// Lets the overview's live view follow `feed` (set once, before serving).
    pub fn with_registration_events(
        self,
        feed: muster_service_api::events::RegistrationFeed,
    ) -> Self {
        let _ = self.inner.events.set(feed);
        self
    }

    pub(crate) fn registration_events(
        &self,
    ) -> Option<&muster_service_api::events::RegistrationFeed> {
        self.inner.events.get()
    }

    pub fn config(&self) -> &ConsoleConfig {
        &self.inner.config
    }

    pub(crate) fn api(&self) -> &ServiceApi {
        &self.inner.api
    }

    pub(crate) fn sessions(&self) -> &session::Sessions {
        &self.inner.sessions
    }

    pub(crate) fn sign_ins(&self) -> &session::SignInThrottle {
        &self.inner.sign_ins
    }

    pub(crate) fn now_unix(&self) -> i64 {
        self.inner.api.clock.now().unix_seconds()
    }
}

/// The console's routes, all under [`BASE`]. Merge into the HTTPS app.
pub fn router(console: Console) -> Router {
    Router::new()
        .route("/console", get(overview::page))
        .route("/console/", get(overview::page))
        .route("/console/ca.pem", get(overview::ca_pem))
        .route(
            "/console/sign-in",
            get(session::sign_in_page).post(session::sign_in),
        )
        .route("/console/sign-out", post(session::sign_out))
        .route("/console/static/console.css", get(assets::css))
        .route("/console/static/console.js", get(assets::js))
        .route("/console/enrollments", get(enrollments::list))
        .route(
            "/console/enrollments/new",
            get(enrollments::new_page).post(enrollments::create),
        )
        .route(
            "/console/enrollments/{kind}/{id}",
            get(enrollments::details).post(enrollments::save_settings),
        )
        .route(
            "/console/enrollments/{kind}/{id}/status",
            post(enrollments::set_status),
        )
        .route(
            "/console/enrollments/{kind}/{id}/delete",
            post(enrollments::delete),
        )
        .route("/console/registrations", get(registrations::list))
        .route(
            "/console/registrations/{id}/delete",
            post(registrations::delete),
        )
        .route("/console/audit", get(audit_log::list))
        .route("/console/certificates", get(issued_certificates::list))
        .route(
            "/console/certificates/{serial}/revoke",
            post(issued_certificates::revoke),
        )
        .route("/console/events/registrations", get(events::stream))
        .route(
            "/console/linked-hubs",
            get(linked_hubs::list).post(linked_hubs::add),
        )
        .route("/console/linked-hubs/{name}", post(linked_hubs::update))
        .route(
            "/console/linked-hubs/{name}/delete",
            post(linked_hubs::remove),
        )
        .route(
            "/console/ca-certificates",
            get(ca_certificates::list).post(ca_certificates::upload),
        )
        .route(
            "/console/ca-certificates/{name}",
            post(ca_certificates::update),
        )
        .route(
            "/console/access-policies",
            get(access_policies::list).post(access_policies::create),
        )
        .route(
            "/console/access-policies/{name}",
            post(access_policies::update),
        )
        .route(
            "/console/settings",
            get(service_settings::page).post(service_settings::save),
        )
        .route("/console/hub/devices", get(hub_devices::list))
        .route("/console/hub/devices/{id}", get(hub_devices::details))
        .route(
            "/console/device-key",
            get(device_key::page).post(device_key::compute),
        )
        .route(
            "/console/{*rest}",
            get(page::not_found).post(page::not_found),
        )
        .layer(axum::middleware::map_response(page::security_headers))
        .with_state(console)
}

/// Records the built-in hub's registry writes in the audit log; its tokens name hub policies.
/// The server wraps the hub router it serves with it, the console its in-process copy.
pub fn hub_auditor(api: &ServiceApi, hub: HubRegistry) -> muster_service_api::audit::Auditor {
    muster_service_api::audit::Auditor::new(
        api.store.clone(),
        api.clock.clone(),
        api.entropy.clone(),
        Arc::new(move |headers, now| hub.authorizer().identify(headers, now)),
    )
}
