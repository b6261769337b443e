//! TPM attestation over HTTPS (device-protocol.md §7) with a real software TPM (swtpm, driven
//! by tpm2-tools as a device SDK drives its TPM): the 401 challenge, activation in the TPM, a
//! token HMAC-signed inside the TPM, the hub device, the final blob, and every refusal.

mod common;
#[path = "common/swtpm.rs"]
mod swtpm;

use std::net::Ipv4Addr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{device_token, now, start, Dps};
use muster_attestation::tpm::registration_id;
use reqwest::Method;
use serde_json::{json, Value};
use swtpm::SwTpm;

const IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 33);

/// A token signed inside the TPM with the key imported as `key`, C style (`%2f`).
fn tpm_token(tpm: &SwTpm, key: &str, scope: &str, rid: &str, expiry: i64) -> String {
    let sr = format!("{scope}%2fregistrations%2f{rid}");
    let sig = B64.encode(tpm.hmac(key, format!("{sr}\n{expiry}").as_bytes()));
    let sig = sig
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn=registration")
}

fn hmac_sha256(key_b64: &str, data: &str) -> Vec<u8> {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(&B64.decode(key_b64).unwrap()).unwrap();
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// PUT register without any Authorization header (the first TPM request).
async fn register_unauthenticated(dps: &Dps, rid: &str, body: Value) -> (u16, Value) {
    let r = dps
        .http
        .put(format!(
            "https://{}/{}/registrations/{rid}/register?api-version=2021-06-01",
            dps.info.device_endpoint, dps.info.id_scope
        ))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn tpm_body(rid: &str, ek: &[u8], srk: &[u8]) -> Value {
    json!({"registrationId": rid,
           "tpm": {"endorsementKey": B64.encode(ek), "storageRootKey": B64.encode(srk)}})
}

fn assert_refused(status: u16, body: &Value, code: u64, says: &str) {
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["errorCode"], code, "{body}");
    assert!(body["trackingId"].is_string() && body["timestampUtc"].is_string());
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{message}");
}

#[tokio::test]
async fn tpm_device_registers_over_https_with_a_key_activated_in_its_tpm() {
    let tpm = SwTpm::start(IP);
    let ek = tpm.endorsement_key();
    let srk = tpm.storage_root_key();
    let rid = registration_id(&ek);

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &IP.to_string(), None).await;
    let dps = Dps::new(&server.connection);
    let scope = dps.info.id_scope.clone();
    let (s, e) = dps
        .service(
            Method::PUT,
            &format!("/enrollments/{rid}"),
            Some(json!({"registrationId": rid, "deviceId": "tpm-device",
                "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(&ek)}}})),
        )
        .await;
    assert_eq!(s, 200, "{e}");

    // Refusals before any key was issued: another EK (here the SRK's), and a token.
    let (s, b) = register_unauthenticated(&dps, &rid, tpm_body(&rid, &srk, &srk)).await;
    assert_refused(s, &b, 401013, "not the one enrolled");
    let forged = device_token(&scope, &rid, &B64.encode([7u8; 32]), now() + 600);
    let (s, _, b) = dps.register(&rid, &forged, json!({})).await;
    assert_refused(s, &b, 401014, "no TPM key was issued");

    // The challenge: 401 with the blob and the key name, no status.
    let (s, challenge) = register_unauthenticated(&dps, &rid, tpm_body(&rid, &ek, &srk)).await;
    assert_eq!(s, 401, "{challenge}");
    assert_eq!(challenge["keyName"], "registration");
    assert!(challenge.get("status").is_none());
    let blob = B64
        .decode(challenge["authenticationKey"].as_str().unwrap())
        .unwrap();
    assert_eq!(blob.len(), 766);

    // A token signed with any other key is refused.
    let (s, _, b) = dps.register(&rid, &forged, json!({})).await;
    assert_refused(s, &b, 401015, "TPM challenge");

    // The TPM activates the blob; the token it signs registers the device.
    tpm.import(&blob, "dps");
    let token = tpm_token(&tpm, "dps", &scope, &rid, now() + 3600);
    let (s, _, body) = dps.register(&rid, &token, tpm_body(&rid, &ek, &srk)).await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(body["status"], "assigned", "{body}");
    let state = &body["registrationState"];
    assert_eq!(state["deviceId"], "tpm-device");
    assert!(state.get("symmetricKey").is_none(), "{state}");
    let (hub_name, hub_cs) = dps.hub();
    assert_eq!(state["assignedHub"], json!(hub_name));

    // The final blob gives the TPM the hub device's key: an HMAC inside the TPM with it
    // matches one with the hub's primary key.
    let final_blob = B64
        .decode(state["tpm"]["authenticationKey"].as_str().unwrap())
        .unwrap();
    tpm.import(&final_blob, "hub");
    let (s, device) = dps.hub_call(&hub_cs, "/devices/tpm-device").await;
    assert_eq!(s, 200, "{device}");
    assert_eq!(device["authentication"]["type"], "sas");
    let hub_key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let probe = format!("{hub_name}/devices/tpm-device\n{}", now() + 60);
    assert_eq!(
        tpm.hmac("hub", probe.as_bytes()),
        hmac_sha256(&hub_key, &probe)
    );

    // Polling with the TPM-signed token answers the same, with a blob again.
    let op = body["operationId"].as_str().unwrap();
    let (s, polled) = dps.poll(&rid, op, &token).await;
    assert_eq!(s, 200, "{polled}");
    assert!(polled["registrationState"]["tpm"]["authenticationKey"].is_string());

    // Asking again while the key is current wraps the same key (whoever sends the EK cannot
    // retire the device's key): the token signed before still works.
    let (s, challenge) = register_unauthenticated(&dps, &rid, tpm_body(&rid, &ek, &srk)).await;
    assert_eq!(s, 401);
    let (s, _, b) = dps.register(&rid, &token, json!({})).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["status"], "assigned", "{b}");

    // Registering again with the same EK (and no tpm object, as iot-identity-service does),
    // signed by the key from the second challenge: the same hub, device and key.
    let blob = B64
        .decode(challenge["authenticationKey"].as_str().unwrap())
        .unwrap();
    tpm.import(&blob, "dps1");
    let token = tpm_token(&tpm, "dps1", &scope, &rid, now() + 3600);
    let (s, _, again) = dps.register(&rid, &token, json!({})).await;
    assert_eq!(s, 202, "{again}");
    assert_eq!(again["status"], "assigned", "{again}");
    assert_eq!(again["registrationState"]["assignedHub"], json!(hub_name));
    assert_eq!(again["registrationState"]["deviceId"], "tpm-device");
    let final_blob = B64
        .decode(
            again["registrationState"]["tpm"]["authenticationKey"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    tpm.import(&final_blob, "hub1");
    let (_, device) = dps.hub_call(&hub_cs, "/devices/tpm-device").await;
    let new_hub_key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    assert_eq!(new_hub_key, hub_key);
    assert_eq!(
        tpm.hmac("hub1", probe.as_bytes()),
        hmac_sha256(new_hub_key, &probe)
    );

    // The enrollment re-created with another EK (here the SRK's key) does not accept the key
    // issued for the old one.
    let (s, e) = dps
        .service(Method::DELETE, &format!("/enrollments/{rid}"), None)
        .await;
    assert!(s == 204 || s == 200, "{e}");
    let (s, e) = dps
        .service(
            Method::PUT,
            &format!("/enrollments/{rid}"),
            Some(json!({"registrationId": rid,
                "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(&srk)}}})),
        )
        .await;
    assert_eq!(s, 200, "{e}");
    let (s, _, b) = dps.register(&rid, &token, json!({})).await;
    assert_refused(s, &b, 401014, "another endorsement key");

    // A disabled enrollment: the device authenticates and is told it is disabled.
    let (s, e) = dps
        .service(Method::DELETE, &format!("/enrollments/{rid}"), None)
        .await;
    assert!(s == 204 || s == 200, "{e}");
    let (s, e) = dps
        .service(
            Method::PUT,
            &format!("/enrollments/{rid}"),
            Some(json!({"registrationId": rid, "deviceId": "tpm-device",
                "provisioningStatus": "disabled",
                "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(&ek)}}})),
        )
        .await;
    assert!(s == 200, "{e}");
    let (s, challenge) = register_unauthenticated(&dps, &rid, tpm_body(&rid, &ek, &srk)).await;
    assert_eq!(s, 401);
    let blob = B64
        .decode(challenge["authenticationKey"].as_str().unwrap())
        .unwrap();
    tpm.import(&blob, "dps2");
    let token = tpm_token(&tpm, "dps2", &scope, &rid, now() + 3600);
    let (s, _, body) = dps.register(&rid, &token, json!({})).await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(body["status"], "disabled", "{body}");

    // No TPM enrollment for this id: the challenge is refused.
    let other = "not-enrolled";
    let (s, b) = register_unauthenticated(&dps, other, tpm_body(other, &ek, &srk)).await;
    assert_refused(s, &b, 401005, "no TPM individual enrollment");

    server.shutdown().await;
}
