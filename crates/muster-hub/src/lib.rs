//! The built-in IoT hub: device identities and twins as typed operations (for the
//! provisioning engine and the device endpoints) and as IoT Hub's service REST API (for
//! Microsoft's `azure-iot-hub` Python `IoTHubRegistryManager`, Node `azure-iothub`
//! `Registry`/`Client`, C# `RegistryManager` and the Azure CLI), service-api.md §9.2; and
//! the device endpoint (§10) over MQTT and AMQP: telemetry, twin, cloud-to-device messages,
//! direct methods; and the device HTTPS API (telemetry, cloud-to-device by polling).
//!
//! Layout:
//! - [`registry`] — [`HubRegistry`]: create/update/get/delete/list devices, get/patch/replace
//!   twins, device reported-property patches, the desired-change channel; storage layout and
//!   etags are described there.
//! - [`router`] — the axum routes; `devices.rs` (`/devices`, `/devices/{id}`) and `twins.rs`
//!   (`/twins/{id}`) hold the handlers and their method/right/status tables; `routes.rs` the
//!   admission every route shares.
//! - [`bulk`] — the bulk registry API (`POST /devices`): many creates, updates and deletes
//!   in one store transaction, per-device errors in IoT Hub's shape.
//! - [`model`] — `Device`, `Twin`, authentication types, device id/key/thumbprint rules and
//!   what clients may send (`DeviceInput`, `TwinUpdate`).
//! - [`properties`] — twin collections: validation, merge with `null` deletes, diffs,
//!   `$metadata` and `$version`.
//! - [`device_mqtt`] — one device's MQTT session ([`device_mqtt::serve_connection`]);
//!   `device_mqtt::connect` also holds the device authentication both transports share
//!   (and the HTTPS API reuses), which refuses certificates Muster issued and an operator
//!   revoked ([`HubRegistry`]'s `certificate_revoked`: `muster_store::issued`).
//! - [`device_amqp`] — one device's AMQP connection ([`device_amqp::serve`]): CBS, X.509 and
//!   SASL PLAIN authentication (`cbs.rs`), and the telemetry, cloud-to-device, twin and
//!   method links (`links.rs`), on the same session table and hub operations as MQTT.
//! - [`device_http`] — the device HTTPS API ([`device_http::router`], merged outside the
//!   service audit): `POST /devices/{id}/messages/events`, `GET .../messages/devicebound`,
//!   complete / reject / abandon by lock token; device SAS or X.509 as the MQTT CONNECT.
//! - [`telemetry`] — device-to-cloud messages: storage, retention, REST and Server-Sent Events
//!   (Muster's equivalent of IoT Hub's Event Hubs endpoint).
//! - [`c2d`] — cloud-to-device messages: per-device queue, REST send (Muster's extension;
//!   the Azure SDKs use AMQP), HTTPS receive locks and delivery counts ([`Settlement`]).
//! - [`methods`] — direct methods: [`HubRegistry::invoke_method`] and `POST /twins/{id}/methods`.
//! - `cluster` — several nodes serving one hub ([`HubRegistry::with_bus`]): cloud-to-device
//!   wakes, direct methods, session takeovers and live telemetry over the store's bus.
//! - [`DeviceEndpointLimits`] — retention, queue depths and timeouts (`endpoint.rs` also holds
//!   the table of connected sessions).
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
//! | POST | `/devices[/]` (bulk registry, [`bulk`]) | RegistryWrite | 200 / 400 `BulkRegistryOperationResult` |
//! | GET | `/twins/{id}` | ServiceConnect | 200 Twin |
//! | PATCH | `/twins/{id}` | ServiceConnect | 200 Twin |
//! | PUT | `/twins/{id}` | ServiceConnect | 200 Twin |
//! | POST | `/twins/{id}/methods` | ServiceConnect | 200 `{"status","payload"}` (404 `DeviceNotOnline`, 504 `GatewayTimeout`) |
//! | POST | `/devices/{id}/messages/cloudToDevice` | ServiceConnect | 204 (Muster extension) |
//! | GET | `/devices/{id}/telemetry?after=&limit=` | ServiceConnect | 200 [TelemetryMessage] (Muster extension) |
//! | GET | `/devices/{id}/telemetry/stream` | ServiceConnect | 200 `text/event-stream` (Muster extension) |
//! | GET | `/telemetry/stream` | ServiceConnect | 200 `text/event-stream`, all devices (Muster extension) |
//!
//! The extensions keep off `/devices/{id}/messages/events` and `.../messages/devicebound`:
//! those are IoT Hub's device paths, served by [`device_http`] with device credentials.
//!
//! Every check happens before anything is written; handlers never read the real clock or
//! random source (both are injected into [`HubRegistry`]).

pub mod auth;
pub mod bulk;
pub mod c2d;
mod cluster;
pub mod device_amqp;
pub mod device_http;
pub mod device_mqtt;
mod devices;
mod endpoint;
pub mod error;
pub mod methods;
pub mod model;
pub mod properties;
pub mod registry;
pub mod request;
mod routes;
pub mod telemetry;
mod twins;

use axum::routing::{get, post, put};
use axum::Router;

pub use auth::{default_policies, HubAuthorizer, HubPolicy, HubRight, HubRights};
pub use c2d::{CloudToDeviceInput, CloudToDeviceMessage, Settlement};
pub use endpoint::DeviceEndpointLimits;
pub use error::{HubError, HubErrorCode};
pub use model::{Device, DeviceInput, Twin, TwinUpdate};
pub use registry::{DesiredChange, HubRegistry};
pub use request::IfMatch;
pub use routes::{method_not_allowed, not_found};
pub use telemetry::{BodyEncoding, TelemetryMessage};

/// The hub registry routes. No fallbacks are set, so it can be merged; add
/// [`not_found`] / [`method_not_allowed`] where the final router is assembled.
pub fn router(registry: HubRegistry) -> Router {
    Router::new()
        .route("/devices", get(devices::list).post(bulk::apply))
        .route("/devices/", get(devices::list).post(bulk::apply))
        .route(
            "/devices/{id}",
            put(devices::put).get(devices::get).delete(devices::delete),
        )
        .route(
            "/twins/{id}",
            get(twins::get).patch(twins::patch).put(twins::replace),
        )
        .route("/twins/{id}/methods", post(methods::invoke))
        .route("/devices/{id}/messages/cloudToDevice", post(c2d::send))
        .route("/devices/{id}/telemetry", get(telemetry::list))
        .route(
            "/devices/{id}/telemetry/stream",
            get(telemetry::device_stream),
        )
        .route("/telemetry/stream", get(telemetry::all_stream))
        .with_state(registry)
}
