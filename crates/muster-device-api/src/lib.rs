//! Device transports into the registration engine. Each one turns what arrived on the wire
//! into a `muster_registration::RegisterRequest` or `StatusRequest`, calls the
//! [`muster_registration::DeviceRegistrar`], and writes its `DeviceReply` back unchanged.
//! Each also passes the request's api-version (HTTPS `?api-version=`, the MQTT user name, the
//! AMQP links' `com.microsoft:api-version`), which decides whether a `csr` is accepted, and
//! marks a status poll whose body carries a `csr` (refused by the engine).
//!
//! Layout:
//! - [`https`] — `PUT …/register`, `GET …/operations/{id}` (device-protocol.md §2).
//! - [`mqtt`] — MQTT 3.1.1 sessions: CONNECT, SUBSCRIBE, register and poll publishes (§4).
//! - [`amqp`] — AMQP 1.0: the protocol header and SASL, dispatch, the registration session (§5);
//!   the hub's AMQP session builds on [`amqp::Opened`] (`muster_hub::device_amqp`).
//! - [`websocket`] — MQTT and AMQP over WebSocket at `/$iothub/websocket`: the byte stream
//!   both are carried in.
//! - [`pre_auth`] — the listener's slot a connection holds until it has authenticated.

pub mod amqp;
pub mod https;
pub mod mqtt;
pub mod pre_auth;
pub mod websocket;
