//! TPM attestation over HTTPS (device-protocol.md §7) with a real software TPM (swtpm, driven
//! by tpm2-tools as a device SDK drives its TPM): the 401 challenge, activation in the TPM, a
//! token HMAC-signed inside the TPM, the hub device, the final blob, every refusal, the
//! issued key's expiry (an injected clock), and re-registration with and without
//! reprovisioning.

mod common;
#[path = "common/swtpm.rs"]
mod swtpm;

use std::net::Ipv4Addr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{config, device_token, now, start, Dps};
use muster_attestation::tpm::registration_id;
use muster_proto::runtime::{Clock, ManualClock, OsEntropy, SystemClock};
use muster_registration::tpm::TPM_KEY_LIFETIME_SECS;
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::Arc;
use swtpm::SwTpm;

const IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 34);

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

/// The challenge for `rid`, taken into the TPM as `name`: returns a token signed with it.
async fn challenge_and_sign(dps: &Dps, tpm: &SwTpm, rid: &str, name: &str) -> String {
    let body = tpm_body(rid, &tpm.endorsement_key(), &tpm.storage_root_key());
    let (s, challenge) = register_unauthenticated(dps, rid, body).await;
    assert_eq!(s, 401, "{challenge}");
    let blob = B64
        .decode(challenge["authenticationKey"].as_str().unwrap())
        .unwrap();
    tpm.import(&blob, name);
    tpm_token(tpm, name, &dps.info.id_scope, rid, now() + 3600)
}

async fn tpm_enrollment(dps: &Dps, rid: &str, ek: &[u8], extra: Value) {
    let mut body = json!({"registrationId": rid, "deviceId": rid,
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": B64.encode(ek)}}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (s, e) = dps
        .service(Method::PUT, &format!("/enrollments/{rid}"), Some(body))
        .await;
    assert_eq!(s, 200, "{e}");
}

#[tokio::test]
async fn the_issued_key_expires_and_a_replayed_older_key_is_refused() {
    let tpm = SwTpm::start(IP);
    let ek = tpm.endorsement_key();
    let rid = registration_id(&ek);
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let server = muster_server::Server::start_with(
        config(dir.path(), &IP.to_string()),
        clock.clone(),
        Arc::new(OsEntropy),
    )
    .await
    .unwrap();
    let dps = Dps::new(&server.connection);
    tpm_enrollment(&dps, &rid, &ek, json!({})).await;

    // An EK that is no TPM2B_PUBLIC at all: refused with the EK's code, saying why.
    let mut garbled = tpm_body(&rid, &ek, &tpm.storage_root_key());
    garbled["tpm"]["endorsementKey"] = json!(B64.encode(b"not a public area"));
    let (s, b) = register_unauthenticated(&dps, &rid, garbled).await;
    assert_refused(s, &b, 401013, "the endorsement key is not a TPM2B_PUBLIC");

    // A key activated in the TPM but used after its lifetime: refused.
    let old = challenge_and_sign(&dps, &tpm, &rid, "old").await;
    clock.advance_secs(TPM_KEY_LIFETIME_SECS + 1);
    let (s, _, b) = dps.register(&rid, &old, json!({})).await;
    assert_refused(s, &b, 401014, "expired");
    // A new challenge issues a new key: the old one, replayed, is refused; the new one works.
    let new = challenge_and_sign(&dps, &tpm, &rid, "new").await;
    let (s, _, b) = dps.register(&rid, &old, json!({})).await;
    assert_refused(s, &b, 401015, "not signed with the key issued");
    let (s, _, b) = dps.register(&rid, &new, json!({})).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["status"], "assigned", "{b}");

    // Polls with the token stop working once the key expired too.
    let op = b["operationId"].as_str().unwrap();
    clock.advance_secs(TPM_KEY_LIFETIME_SECS + 1);
    let (s, b) = dps.poll(&rid, op, &new).await;
    assert_refused(s, &b, 401014, "expired");
    server.shutdown().await;
}

#[tokio::test]
async fn re_registration_with_the_same_ek_keeps_or_moves_the_hub_as_the_policy_says() {
    let tpm = SwTpm::start(IP);
    let ek = tpm.endorsement_key();
    let rid = registration_id(&ek);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a_server = start(dirs[0].path(), &IP.to_string(), None).await;
    let b_server = start(dirs[1].path(), &IP.to_string(), Some(dirs[0].path())).await;
    let dps = Dps::new(&a_server.connection);
    let a = a_server.connection.hubs[0].clone();
    let b = b_server.connection.hubs[0].clone();
    let (s, e) = dps
        .service(
            Method::PUT,
            &format!("/linkedHubs/{}", b.host_name),
            Some(json!({"connectionString": b.connection_string})),
        )
        .await;
    assert_eq!(s, 200, "{e}");

    for (update_hub, lands_on) in [(false, &a), (true, &b)] {
        // One enrollment per policy, each with this TPM's EK.
        let rid = format!("{rid}-{}", if update_hub { "moves" } else { "stays" });
        let policy = json!({"updateHubAssignment": update_hub, "migrateDeviceData": false});
        tpm_enrollment(
            &dps,
            &rid,
            &ek,
            json!({"allocationPolicy": "static", "iotHubs": [a.host_name],
                   "reprovisionPolicy": policy}),
        )
        .await;
        let token = challenge_and_sign(&dps, &tpm, &rid, &format!("{rid}-1")).await;
        let (s, _, r) = dps.register(&rid, &token, json!({})).await;
        assert_eq!(s, 202, "{r}");
        assert_eq!(
            r["registrationState"]["assignedHub"],
            json!(a.host_name),
            "{r}"
        );

        // The enrollment now points at hub B; the device registers again with the same EK.
        let (_, mut e) = dps
            .service(Method::GET, &format!("/enrollments/{rid}"), None)
            .await;
        e["iotHubs"] = json!([b.host_name]);
        let r = dps
            .http
            .put(format!(
                "{}/enrollments/{rid}?api-version=2021-10-01",
                dps.info.service_endpoint
            ))
            .header(
                "authorization",
                common::policy_token(&dps.info.service_connection_string),
            )
            .header("if-match", "*")
            .json(&e)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let token = challenge_and_sign(&dps, &tpm, &rid, &format!("{rid}-2")).await;
        let (s, _, r) = dps.register(&rid, &token, json!({})).await;
        assert_eq!(s, 202, "{r}");
        let state = &r["registrationState"];
        assert_eq!(r["status"], "assigned", "{r}");
        assert_eq!(state["assignedHub"], json!(lands_on.host_name), "{r}");
        let want_sub = if update_hub {
            "deviceDataReset"
        } else {
            "initialAssignment"
        };
        assert_eq!(state["substatus"], want_sub, "{r}");

        // The device is on that hub only, with the key its TPM takes in from the answer.
        let (on_a, _) = dps
            .hub_call(&a.connection_string, &format!("/devices/{rid}"))
            .await;
        let (on_b, _) = dps
            .hub_call(&b.connection_string, &format!("/devices/{rid}"))
            .await;
        let expect = if update_hub { (404, 200) } else { (200, 404) };
        assert_eq!((on_a, on_b), expect, "on A, on B");
        let (_, device) = dps
            .hub_call(&lands_on.connection_string, &format!("/devices/{rid}"))
            .await;
        let final_blob = B64
            .decode(state["tpm"]["authenticationKey"].as_str().unwrap())
            .unwrap();
        let name = format!("{rid}-hub");
        tpm.import(&final_blob, &name);
        let hub_key = device["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap();
        let probe = format!("{}/devices/{rid}\n{}", lands_on.host_name, now() + 60);
        assert_eq!(
            tpm.hmac(&name, probe.as_bytes()),
            hmac_sha256(hub_key, &probe)
        );
    }
    a_server.shutdown().await;
    b_server.shutdown().await;
}

/// The device side of SASL `TPM` (device-protocol.md §5.7), as the C and Node SDKs run it,
/// over a TLS stream: returns the stream after the outcome, ready for AMQP, or the outcome
/// code when SASL was refused.
mod sasl_tpm {
    use fe2o3_amqp::frames::sasl::Frame;
    use fe2o3_amqp::types::primitives::Binary;
    use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslResponse};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub async fn write<S: AsyncWrite + Unpin>(s: &mut S, frame: Frame) {
        let body = serde_amqp::to_vec(&frame).unwrap();
        let mut buf = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&[2, 1, 0, 0]);
        buf.extend_from_slice(&body);
        s.write_all(&buf).await.unwrap();
    }

    pub async fn read<S: AsyncRead + Unpin>(s: &mut S) -> Frame {
        let size = s.read_u32().await.unwrap() as usize;
        assert!(size < 512, "SASL frames stay under 512 bytes: {size}");
        let mut frame = vec![0u8; size - 4];
        s.read_exact(&mut frame).await.unwrap();
        assert_eq!(&frame[..2], &[2, 1], "a SASL frame");
        serde_amqp::from_slice(&frame[4..]).unwrap()
    }

    /// Runs SASL `TPM` up to the blob: returns the blob (its segments joined) and how many
    /// segments carried it.
    pub async fn challenge<S: AsyncRead + AsyncWrite + Unpin>(
        s: &mut S,
        scope: &str,
        rid: &str,
        ek: &[u8],
        srk: &[u8],
    ) -> Result<(Vec<u8>, usize), SaslCode> {
        s.write_all(b"AMQP\x03\x01\x00\x00").await.unwrap();
        let mut header = [0u8; 8];
        s.read_exact(&mut header).await.unwrap();
        assert_eq!(&header, b"AMQP\x03\x01\x00\x00");
        let Frame::Mechanisms(m) = read(s).await else {
            panic!("expected sasl-mechanisms")
        };
        assert!(m
            .sasl_server_mechanisms
            .0
            .iter()
            .any(|x| x.as_str() == "TPM"));
        let mut init = vec![0u8];
        init.extend_from_slice(scope.as_bytes());
        init.push(0);
        init.extend_from_slice(rid.as_bytes());
        init.push(0);
        init.extend_from_slice(ek);
        write(
            s,
            Frame::Init(SaslInit {
                mechanism: "TPM".into(),
                initial_response: Some(Binary::from(init)),
                hostname: Some(format!("{scope}/registrations/{rid}")),
            }),
        )
        .await;
        let Frame::Challenge(c) = read(s).await else {
            panic!("expected the first sasl-challenge")
        };
        assert_eq!(c.challenge.as_ref(), &[0u8], "one zero byte");
        let mut response = vec![0u8];
        response.extend_from_slice(srk);
        respond(s, response).await;
        let mut blob = Vec::new();
        let mut segments = 0;
        loop {
            match read(s).await {
                Frame::Challenge(c) => {
                    let ctrl = c.challenge[0];
                    assert_eq!(ctrl & 0x80, 0x80);
                    assert_eq!((ctrl & 0x3f) as usize, segments, "sequence number");
                    blob.extend_from_slice(&c.challenge[1..]);
                    segments += 1;
                    if ctrl & 0x40 != 0 {
                        return Ok((blob, segments));
                    }
                    respond(s, vec![0]).await;
                }
                Frame::Outcome(o) => return Err(o.code),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    pub async fn respond<S: AsyncWrite + Unpin>(s: &mut S, bytes: Vec<u8>) {
        write(
            s,
            Frame::Response(SaslResponse {
                response: Binary::from(bytes),
            }),
        )
        .await;
    }

    /// The last response (the token) and the outcome.
    pub async fn finish<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, token: &str) -> SaslCode {
        let mut response = vec![0u8];
        response.extend_from_slice(token.as_bytes());
        respond(s, response).await;
        match read(s).await {
            Frame::Outcome(o) => o.code,
            other => panic!("expected sasl-outcome, got {other:?}"),
        }
    }
}

async fn amqp_tls(
    dps: &Dps,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let pem = std::fs::read(dps.info.ca_certificate.as_deref().expect("a local CA")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(IP.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn tpm_device_registers_over_amqp_with_the_sasl_tpm_mechanism() {
    use fe2o3_amqp::types::sasl::SaslCode;

    let tpm = SwTpm::start(IP);
    let ek = tpm.endorsement_key();
    let srk = tpm.storage_root_key();
    let rid = registration_id(&ek);
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &IP.to_string(), None).await;
    let dps = Dps::new(&server.connection);
    let scope = dps.info.id_scope.clone();
    let amqp = server.amqp_addrs[0];
    tpm_enrollment(&dps, &rid, &ek, json!({})).await;

    // An EK that is not the enrolled one: SASL ends with `auth` before any blob.
    let mut s = amqp_tls(&dps, amqp).await;
    let refused = sasl_tpm::challenge(&mut s, &scope, &rid, &srk, &srk).await;
    assert_eq!(refused.err(), Some(SaslCode::Auth));

    // The blob arrives in two segments; the TPM activates it and signs the token.
    let mut s = amqp_tls(&dps, amqp).await;
    let (blob, segments) = sasl_tpm::challenge(&mut s, &scope, &rid, &ek, &srk)
        .await
        .expect("a challenge");
    assert_eq!((blob.len(), segments), (766, 2));
    tpm.import(&blob, "amqp");
    let token = tpm_token(&tpm, "amqp", &scope, &rid, now() + 3600);
    assert_eq!(sasl_tpm::finish(&mut s, &token).await, SaslCode::Ok);

    // Then plain AMQP on the same stream: register on the device's links.
    let answer = amqp_register(s, &scope, &rid, tpm_body(&rid, &ek, &srk))
        .await
        .expect("accepted");
    assert_eq!(answer["status"], "assigned", "{answer}");
    assert_eq!(
        answer["registrationState"]["deviceId"],
        json!(rid),
        "{answer}"
    );
    let final_blob = B64
        .decode(
            answer["registrationState"]["tpm"]["authenticationKey"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    tpm.import(&final_blob, "amqp-hub");
    let (hub_name, hub_cs) = dps.hub();
    let (_, device) = dps.hub_call(&hub_cs, &format!("/devices/{rid}")).await;
    let hub_key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    let probe = format!("{hub_name}/devices/{rid}\n{}", now() + 60);
    assert_eq!(
        tpm.hmac("amqp-hub", probe.as_bytes()),
        hmac_sha256(hub_key, &probe)
    );

    // A token signed with another key passes SASL (nothing is verified there) and the
    // request is rejected with the DPS code, as with PLAIN.
    let mut s = amqp_tls(&dps, amqp).await;
    sasl_tpm::challenge(&mut s, &scope, &rid, &ek, &srk)
        .await
        .expect("a challenge");
    let forged = device_token(&scope, &rid, &B64.encode([7u8; 32]), now() + 600);
    assert_eq!(sasl_tpm::finish(&mut s, &forged).await, SaslCode::Ok);
    let refused = amqp_register(s, &scope, &rid, json!({"registrationId": rid}))
        .await
        .expect_err("rejected");
    let error: Value = serde_json::from_str(refused.description.as_deref().unwrap()).unwrap();
    assert_eq!(error["errorCode"], 401015, "{error}");
    server.shutdown().await;
}

/// Registers on the device's links over an AMQP connection opened on `stream` (after SASL):
/// the answer's JSON, or the rejection.
async fn amqp_register<S>(
    stream: S,
    scope: &str,
    rid: &str,
    body: Value,
) -> Result<Value, fe2o3_amqp::types::definitions::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    use fe2o3_amqp::link::delivery::Delivery;
    use fe2o3_amqp::types::messaging::{
        ApplicationProperties, Body, Message, MessageId, Outcome, Properties,
    };
    use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value as AmqpValue};
    use fe2o3_amqp::{Connection, Receiver, Sender, Session};

    let address = format!("{scope}/registrations/{rid}");
    let mut connection = Connection::builder()
        .container_id("tpm-device")
        .hostname(IP.to_string().as_str())
        .open_with_stream(stream)
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut receiver = Receiver::attach(&mut session, "recv", address.as_str())
        .await
        .unwrap();
    let mut sender = Sender::attach(&mut session, "send", address.as_str())
        .await
        .unwrap();
    let mut app = ApplicationProperties::default();
    app.0.insert(
        "iotdps-operation-type".into(),
        SimpleValue::String("iotdps-register".into()),
    );
    let message = Message::builder()
        .properties(Properties {
            correlation_id: Some(MessageId::String("c-1".into())),
            ..Default::default()
        })
        .application_properties(app)
        .data(Binary::from(body.to_string().into_bytes()))
        .build();
    let result = match sender.send(message).await.unwrap() {
        Outcome::Accepted(_) => {
            let delivery: Delivery<Body<AmqpValue>> = receiver.recv().await.unwrap();
            receiver.accept(&delivery).await.unwrap();
            let Body::Data(data) = &delivery.into_message().body else {
                panic!("not a Data body")
            };
            let bytes: Vec<u8> = data.iter().flat_map(|d| d.0.iter().copied()).collect();
            Ok(serde_json::from_slice(&bytes).unwrap())
        }
        Outcome::Rejected(r) => Err(r.error.expect("a rejection says why")),
        other => panic!("unexpected outcome {other:?}"),
    };
    let _ = sender.close().await;
    let _ = receiver.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
    result
}
