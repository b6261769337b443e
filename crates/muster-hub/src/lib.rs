//! The built-in IoT hub's registry: device identities and twins as typed operations (for the
//! provisioning engine and the device endpoints) and as IoT Hub's service REST API (for
//! Microsoft's `azure-iot-hub` Python `IoTHubRegistryManager`, Node `azure-iothub`
//! `Registry`, C# `RegistryManager` and the Azure CLI), service-api.md §9.2.
//!
//! Layout:
//! - [`registry`] — [`HubRegistry`]: create/update/get/delete/list devices, get/patch/replace
//!   twins, device reported-property patches, the desired-change channel; storage layout and
//!   etags are described there.
//! - [`router`] — the axum routes; `devices.rs` (`/devices`, `/devices/{id}`) and `twins.rs`
//!   (`/twins/{id}`) hold the handlers and their method/right/status tables; `routes.rs` the
//!   admission every route shares.
//! - [`model`] — `Device`, `Twin`, authentication types, device id/key/thumbprint rules and
//!   what clients may send (`DeviceInput`, `TwinUpdate`).
//! - [`properties`] — twin collections: validation, merge with `null` deletes, diffs,
//!   `$metadata` and `$version`.
//! - [`auth`] — hub policies (`HubPolicy`, `HubRights`, [`default_policies`]) and SAS checks.
//! - [`request`] — api-version, If-Match, body limit, JSON replies.
//! - [`error`] — [`HubError`], rendered as IoT Hub errors
//!   (`{"Message":"ErrorCode:<code>;<text>","ExceptionMessage":"Tracking ID:..-TimeStamp:.."}`,
//!   header `iothub-errorcode`).
//!
//! REST surface (query `api-version` required: any `YYYY-MM-DD[-preview]` ≥ 2018-06-30; the
//! SDKs send 2021-04-12, the CLI 2024-03-31):
//!
//! | Method | Path | Right (policy permission) | Success |
//! |---|---|---|---|
//! | PUT | `/devices/{id}` | RegistryWrite | 200 Device |
//! | GET | `/devices/{id}` | RegistryRead (or RegistryWrite) | 200 Device |
//! | DELETE | `/devices/{id}` | RegistryWrite | 204 |
//! | GET | `/devices[/]?top=N` | RegistryRead (or RegistryWrite) | 200 [Device] |
//! | GET | `/twins/{id}` | ServiceConnect | 200 Twin |
//! | PATCH | `/twins/{id}` | ServiceConnect | 200 Twin |
//! | PUT | `/twins/{id}` | ServiceConnect | 200 Twin |
//!
//! Every check happens before anything is written; handlers never read the real clock or
//! random source (both are injected into [`HubRegistry`]).

pub mod auth;
mod devices;
pub mod error;
pub mod model;
pub mod properties;
pub mod registry;
pub mod request;
mod routes;
mod twins;

use axum::routing::{get, put};
use axum::Router;

pub use auth::{default_policies, HubAuthorizer, HubPolicy, HubRight, HubRights};
pub use error::{HubError, HubErrorCode};
pub use model::{Device, DeviceInput, Twin, TwinUpdate};
pub use registry::{DesiredChange, HubRegistry};
pub use request::IfMatch;
pub use routes::{method_not_allowed, not_found};

/// The hub registry routes. No fallbacks are set, so it can be merged; add
/// [`not_found`] / [`method_not_allowed`] where the final router is assembled.
pub fn router(registry: HubRegistry) -> Router {
    Router::new()
        .route("/devices", get(devices::list))
        .route("/devices/", get(devices::list))
        .route(
            "/devices/{id}",
            put(devices::put).get(devices::get).delete(devices::delete),
        )
        .route(
            "/twins/{id}",
            get(twins::get).patch(twins::patch).put(twins::replace),
        )
        .with_state(registry)
}
