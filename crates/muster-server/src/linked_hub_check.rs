//! The check `PUT /linkedHubs/{name}` makes before it links a hub: one registry read (`GET
//! /devices/{id}` of a device id no one uses) with the given connection string. A 404 or a
//! device proves the hub is reachable, its certificate trusted and the policy's key and rights
//! accepted; anything else is what the operator has to fix.

use std::sync::Arc;

use muster_proto::runtime::Clock;
use muster_registration::HubClient;
use muster_service_api::HubCheck;

/// The device id the check reads (absent on any hub, so the answer is a 404).
const PROBE_DEVICE_ID: &str = "muster-link-check";

/// [`HubCheck`] over the hub's registry REST API.
pub struct RegistryRead {
    client: HubClient,
}

impl RegistryRead {
    pub fn new(http: reqwest::Client, clock: Arc<dyn Clock>) -> Self {
        Self {
            client: HubClient::new(http, clock),
        }
    }
}

#[async_trait::async_trait]
impl HubCheck for RegistryRead {
    async fn check(&self, connection_string: &str) -> Result<(), String> {
        self.client
            .get_device(connection_string, PROBE_DEVICE_ID)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
