//! The `muster` binary against a real server started in-process on 127.0.0.1 (port 0, a
//! temporary data dir): every command at least once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use muster_client::HubClient;
use muster_server::{Config, ConnectionInfo, Server};
use serde_json::{json, Value};
use sha2::Sha256;

const BIN: &str = env!("CARGO_BIN_EXE_muster");

struct Env {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    dir: tempfile::TempDir,
    info: ConnectionInfo,
}

impl Env {
    fn start() -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().join("data"),
            dps_host: "127.0.0.1".into(),
            https_port: 0,
            mqtt_port: 0,
            amqp_port: 0,
            ..Config::default()
        };
        let server = rt.block_on(Server::start(config)).expect("server starts");
        let info = server.connection.clone();
        Env {
            rt,
            server: Some(server),
            dir,
            info,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).current_dir(self.dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("MUSTER_") {
                c.env_remove(k);
            }
        }
        c.env_remove("RUST_LOG");
        c
    }

    /// Runs a service or device command with `--data-dir`.
    fn run(&self, args: &[&str]) -> Output {
        let dd = self.data_dir();
        let mut all: Vec<&str> = args.to_vec();
        all.push("--data-dir");
        all.push(dd.to_str().expect("utf-8 path"));
        self.command(&all).output().expect("muster runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "muster {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let text = self.ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// A command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "muster {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn hub(&self) -> HubClient {
        HubClient::from_connection_string(
            &self.info.hubs[0].connection_string,
            self.info.ca_certificate.as_deref(),
        )
        .expect("hub client")
    }

    fn hub_has_device(&self, id: &str) -> bool {
        let hub = self.hub();
        match self.rt.block_on(hub.get_device(id)) {
            Ok(d) => d["deviceId"] == id,
            Err(e) if e.is_not_found() => false,
            Err(e) => panic!("hub REST: {e}"),
        }
    }

    fn group_key(&self, group: &str) -> String {
        let g = self.json(&["enrollment-group", "show", group, "--show-keys"]);
        g["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .expect("group key shown with --show-keys")
            .to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

fn hmac_b64(key_b64: &str, msg: &str) -> String {
    let key = B64.decode(key_b64).expect("base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(msg.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

#[test]
fn compute_device_key_matches_hmac_sha256_and_openssl() {
    let key = "c2VjcmV0LWdyb3VwLWtleS1mb3ItbXVzdGVyLWNsaS10ZXN0cw==";
    let id = "factory-7:cam.0042";
    let out = Command::new(BIN)
        .args([
            "compute-device-key",
            "--key",
            key,
            "--registration-id",
            id,
            "-o",
            "table",
        ])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(got, hmac_b64(key, id));
    // echo -n factory-7:cam.0042 | openssl dgst -sha256 -mac HMAC \
    //   -macopt hexkey:$(echo -n $KEY | base64 -d | xxd -p -c256) -binary | base64
    assert_eq!(got, "N40RwpvgkRTf3zSMBXLtUOwCFc39VXxQLlnXdxHD5Ls=");

    let out = Command::new(BIN)
        .args([
            "compute-device-key",
            "--key",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            "--registration-id",
            "my-device-01",
            "--output",
            "json",
        ])
        .output()
        .expect("runs");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v["derivedKey"],
        "JOHsAb4JNdWTiD28P3nwHp6eyIyRvBG156Qxg/6ugAo="
    );

    let out = Command::new(BIN)
        .args([
            "compute-device-key",
            "--key",
            "not base64!",
            "--registration-id",
            "x",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("base64"));
}

#[test]
fn enrollment_commands() {
    let env = Env::start();
    let pk = B64.encode([7u8; 32]);
    let sk = B64.encode([9u8; 32]);
    let created = env.json(&[
        "enrollment",
        "create",
        "--enrollment-id",
        "dev-1",
        "--device-id",
        "device-one",
        "--primary-key",
        &pk,
        "--secondary-key",
        &sk,
        "--initial-twin-tags",
        r#"{"site":"lyon"}"#,
        "--initial-twin-properties",
        r#"{"interval":30}"#,
        "--reprovision-policy",
        "reprovisionandresetdata",
        "--edge-enabled",
        "true",
        "--allocation-policy",
        "hashed",
        "--iot-hubs",
        &env.info.hubs[0].host_name,
    ]);
    assert_eq!(created["registrationId"], "dev-1");
    assert_eq!(created["deviceId"], "device-one");
    assert!(
        created["attestation"]["symmetricKey"]
            .get("primaryKey")
            .is_none(),
        "keys hidden without --show-keys"
    );
    assert_eq!(created["initialTwin"]["tags"]["site"], "lyon");
    assert_eq!(
        created["initialTwin"]["properties"]["desired"]["interval"],
        30
    );
    assert_eq!(created["reprovisionPolicy"]["migrateDeviceData"], false);
    assert_eq!(created["capabilities"]["iotEdge"], true);

    // Exists already: a clear refusal.
    let err = env.fails(&["enrollment", "create", "--enrollment-id", "dev-1"]);
    assert!(err.contains("409201"), "{err}");

    let shown = env.json(&["enrollment", "show", "dev-1", "--show-keys"]);
    assert_eq!(
        shown["attestation"]["symmetricKey"]["primaryKey"],
        pk.as_str()
    );
    let table = env.ok(&["enrollment", "show", "dev-1", "-o", "table"]);
    assert!(
        table.contains("registrationId") && !table.contains(&pk),
        "{table}"
    );

    env.ok(&[
        "enrollment",
        "create",
        "--enrollment-id",
        "dev-2",
        "--provisioning-status",
        "disabled",
    ]);
    let list = env.json(&["enrollment", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    let table = env.ok(&["enrollment", "list", "--top", "1", "-o", "table"]);
    assert_eq!(table.lines().count(), 2, "{table}");

    let updated = env.json(&[
        "enrollment",
        "update",
        "--enrollment-id",
        "dev-1",
        "--provisioning-status",
        "disabled",
        "--reprovision-policy",
        "never",
    ]);
    assert_eq!(updated["provisioningStatus"], "disabled");
    assert_eq!(updated["reprovisionPolicy"]["updateHubAssignment"], false);
    assert_eq!(
        updated["initialTwin"]["tags"]["site"], "lyon",
        "unchanged settings kept"
    );
    let shown = env.json(&["enrollment", "show", "dev-1", "--show-keys"]);
    assert_eq!(
        shown["attestation"]["symmetricKey"]["primaryKey"],
        pk.as_str(),
        "keys kept"
    );

    // Export with keys, delete everything, import, and the keys are back.
    let file = env.dir.path().join("enrollments.ndjson");
    env.ok(&[
        "enrollment",
        "export",
        "--show-keys",
        "--out-file",
        file.to_str().expect("utf-8"),
    ]);
    let text = std::fs::read_to_string(&file).expect("export written");
    assert_eq!(text.lines().count(), 2);
    env.ok(&["enrollment", "delete", "dev-1"]);
    env.ok(&["enrollment", "delete", "dev-2"]);
    let err = env.fails(&["enrollment", "show", "dev-1"]);
    assert!(err.contains("404201"), "{err}");
    let summary = env.json(&[
        "enrollment",
        "import",
        file.to_str().expect("utf-8"),
        "--chunk-size",
        "1",
    ]);
    assert_eq!(summary["succeeded"], 2);
    let shown = env.json(&["enrollment", "show", "dev-1", "--show-keys"]);
    assert_eq!(
        shown["attestation"]["symmetricKey"]["primaryKey"],
        pk.as_str()
    );
    // Importing again in create mode reports per-item failures and exits non-zero.
    let err = env.fails(&["enrollment", "import", file.to_str().expect("utf-8")]);
    assert!(err.contains("2 of 2 items failed"), "{err}");
}

#[test]
fn enrollment_group_commands() {
    let env = Env::start();
    let created = env.json(&[
        "enrollment-group",
        "create",
        "--group-id",
        "line-1",
        "--initial-twin-tags",
        r#"{"line":1}"#,
        "--provisioning-status",
        "enabled",
        "--reprovision-policy",
        "reprovisionandmigratedata",
        "--show-keys",
    ]);
    let key = created["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("generated key shown with --show-keys")
        .to_string();
    assert_eq!(env.group_key("line-1"), key);
    env.ok(&[
        "enrollment-group",
        "create",
        "--group-id",
        "hooked",
        "--webhook-url",
        "https://alloc.example/api",
    ]);
    let hooked = env.json(&["enrollment-group", "show", "hooked"]);
    assert_eq!(hooked["allocationPolicy"], "custom");
    assert_eq!(
        hooked["customAllocationDefinition"]["webhookUrl"],
        "https://alloc.example/api"
    );

    let table = env.ok(&["enrollment-group", "list", "-o", "table"]);
    assert!(
        table.starts_with("GROUP ID") && table.contains("line-1") && table.contains("hooked"),
        "{table}"
    );
    let updated = env.json(&[
        "enrollment-group",
        "update",
        "--group-id",
        "line-1",
        "--iot-hubs",
        &env.info.hubs[0].host_name,
        "--allocation-policy",
        "static",
        "--edge-enabled",
        "false",
    ]);
    assert_eq!(updated["allocationPolicy"], "static");
    assert_eq!(env.group_key("line-1"), key, "update keeps the keys");

    let file = env.dir.path().join("groups.ndjson");
    env.ok(&[
        "enrollment-group",
        "export",
        "--show-keys",
        "--out-file",
        file.to_str().expect("utf-8"),
    ]);
    env.ok(&["enrollment-group", "delete", "line-1"]);
    env.ok(&["enrollment-group", "delete", "hooked"]);
    assert_eq!(env.json(&["enrollment-group", "list"]), json!([]));
    env.ok(&["enrollment-group", "import", file.to_str().expect("utf-8")]);
    assert_eq!(env.group_key("line-1"), key);
    let err = env.fails(&[
        "enrollment-group",
        "update",
        "--group-id",
        "nope",
        "--provisioning-status",
        "disabled",
    ]);
    assert!(err.contains("404202"), "{err}");
}

/// Writes by the CLI are audited with the source `cli`; `muster audit list` shows them in a
/// table and as JSON, filtered by id and policy.
#[test]
fn audit_list_shows_cli_writes() {
    let env = Env::start();
    let pk = B64.encode([7u8; 32]);
    env.ok(&[
        "enrollment",
        "create",
        "--enrollment-id",
        "audited-1",
        "--primary-key",
        &pk,
    ]);
    env.ok(&["enrollment", "delete", "audited-1"]);
    env.ok(&[
        "enrollment",
        "create",
        "--enrollment-id",
        "other-2",
        "--primary-key",
        &pk,
    ]);

    let entries = env.json(&["audit", "list", "--id", "audited-1"]);
    let summary: Vec<Value> = entries
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            json!([
                e["method"],
                e["route"],
                e["id"],
                e["status"],
                e["source"],
                e["policy"]
            ])
        })
        .collect();
    assert_eq!(
        summary,
        [
            json!([
                "PUT",
                "/enrollments/{id}",
                "audited-1",
                200,
                "cli",
                "provisioningserviceowner"
            ]),
            json!([
                "DELETE",
                "/enrollments/{id}",
                "audited-1",
                204,
                "cli",
                "provisioningserviceowner"
            ]),
        ]
    );
    assert!(!entries.to_string().contains(&pk), "no key in the log");
    let table = env.ok(&[
        "audit",
        "list",
        "--policy",
        "provisioningserviceowner",
        "-o",
        "table",
    ]);
    let header = table.lines().next().expect("a header line");
    for column in [
        "TIME", "POLICY", "SOURCE", "METHOD", "ROUTE", "ID", "STATUS", "ERROR",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(table.contains("other-2"), "{table}");
    assert_eq!(table.lines().count(), 4, "header and three writes: {table}");
    let top = env.json(&["audit", "list", "--top", "1"]);
    assert_eq!(top.as_array().map(Vec::len), Some(1));
    let err = env.fails(&["audit", "list", "--since", "yesterday"]);
    assert!(err.contains("'from'"), "{err}");
}

#[test]
fn linked_hub_commands() {
    let env = Env::start();
    let cs = format!(
        "HostName=hub2.example;SharedAccessKeyName=iothubowner;SharedAccessKey={}",
        B64.encode([3u8; 32])
    );
    // hub2.example does not exist: the service's registry read refuses the link...
    let err = env.fails(&["linked-hub", "add", "--hub-connection-string", &cs]);
    assert!(
        err.contains("registry read against hub 'hub2.example' failed") && err.contains("400"),
        "{err}"
    );
    assert!(!err.contains(&B64.encode([3u8; 32])), "no key in errors");
    // ...unless told to skip it.
    let added = env.json(&[
        "linked-hub",
        "add",
        "--hub-connection-string",
        &cs,
        "--allocation-weight",
        "3",
        "--skip-check",
    ]);
    assert_eq!(added["name"], "hub2.example");
    assert_eq!(added["allocationWeight"], 3);
    let err = env.fails(&[
        "linked-hub",
        "add",
        "--hub-connection-string",
        &cs,
        "--skip-check",
    ]);
    assert!(err.contains("already linked"), "{err}");
    let list = env.json(&["linked-hub", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    assert!(!serde_json::to_string(&list)
        .expect("json")
        .contains("SharedAccessKey"));
    let updated = env.json(&[
        "linked-hub",
        "update",
        "hub2.example",
        "--apply-allocation-policy",
        "false",
        "--location",
        "eu-west",
    ]);
    assert_eq!(updated["applyAllocationPolicy"], false);
    assert_eq!(updated["location"], "eu-west");
    env.ok(&["linked-hub", "remove", "hub2.example"]);
    let table = env.ok(&["linked-hub", "list", "-o", "table"]);
    assert!(!table.contains("hub2.example"), "{table}");
    let err = env.fails(&["linked-hub", "remove", &env.info.hubs[0].host_name]);
    assert!(err.contains("built-in"), "{err}");
}

#[test]
fn device_register_and_hub_commands() {
    let env = Env::start();
    env.ok(&["enrollment-group", "create", "--group-id", "g"]);
    let gk = env.group_key("g");
    let r = env.json(&[
        "device",
        "register",
        "--registration-id",
        "dev-https",
        "--group-key",
        &gk,
    ]);
    assert_eq!(r["status"], "assigned");
    assert_eq!(r["assignedHub"], env.info.hubs[0].host_name.as_str());
    let r = env.json(&[
        "device",
        "register",
        "--registration-id",
        "dev-mqtt",
        "--group-key",
        &gk,
        "--transport",
        "mqtt",
        "--payload",
        r#"{"model":"x1"}"#,
    ]);
    assert_eq!(r["status"], "assigned");
    assert_eq!(r["deviceId"], "dev-mqtt");

    // An individual enrollment, registering with its own key and explicit endpoint flags.
    let key = B64.encode([5u8; 32]);
    env.ok(&[
        "enrollment",
        "create",
        "--enrollment-id",
        "solo",
        "--primary-key",
        &key,
    ]);
    let ca = env
        .info
        .ca_certificate
        .as_ref()
        .unwrap()
        .to_str()
        .expect("utf-8")
        .to_string();
    let out = env
        .command(&[
            "device",
            "register",
            "--id-scope",
            &env.info.id_scope,
            "--endpoint",
            &env.info.device_endpoint,
            "--ca-cert",
            &ca,
            "--registration-id",
            "solo",
            "--key",
            &key,
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("assigned"));

    // A wrong key: non-zero, the DPS code and a hint.
    let err = env.fails(&[
        "device",
        "register",
        "--registration-id",
        "x",
        "--key",
        &B64.encode([1u8; 32]),
    ]);
    assert!(err.contains("401005") && err.contains("hint:"), "{err}");
    // No CA: TLS refuses and the hint names --ca-cert.
    let out = env
        .command(&[
            "device",
            "register",
            "--id-scope",
            &env.info.id_scope,
            "--endpoint",
            &env.info.device_endpoint,
            "--registration-id",
            "solo",
            "--key",
            &key,
            "--retries",
            "1",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca-cert"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Hub commands against the built-in hub.
    let devices = env.json(&["hub", "device", "list"]);
    assert_eq!(devices.as_array().map(Vec::len), Some(3));
    let d = env.json(&["hub", "device", "show", "dev-https"]);
    assert_eq!(d["deviceId"], "dev-https");
    assert!(d["authentication"]["symmetricKey"]
        .get("primaryKey")
        .is_none());
    let d = env.json(&["hub", "device", "show", "dev-https", "--show-keys"]);
    assert_eq!(
        d["authentication"]["symmetricKey"]["primaryKey"],
        hmac_b64(&gk, "dev-https").as_str()
    );
    let t = env.json(&[
        "hub",
        "twin",
        "update",
        "dev-https",
        "--tags",
        r#"{"floor":3}"#,
        "--desired",
        r#"{"interval":60}"#,
    ]);
    assert_eq!(t["tags"]["floor"], 3);
    let t = env.json(&["hub", "twin", "show", "dev-https"]);
    assert_eq!(t["properties"]["desired"]["interval"], 60);
    env.ok(&["hub", "device", "delete", "dev-mqtt"]);
    assert!(!env.hub_has_device("dev-mqtt"));
}

/// `muster device register --csr-key`: a symmetric-key device gets a certificate chain that
/// `openssl verify` accepts, connects to the built-in hub with it and sends telemetry.
#[test]
fn device_register_with_a_csr_gets_a_certificate_for_the_hub() {
    let env = Env::start();
    env.ok(&[
        "enrollment-group",
        "create",
        "--group-id",
        "certs",
        "--issue-certificates",
        "true",
        "--certificate-validity-days",
        "7",
    ]);
    let g = env.json(&["enrollment-group", "show", "certs"]);
    assert_eq!(
        g["certificateIssuance"],
        json!({"enabled": true, "validityDays": 7})
    );
    let gk = env.group_key("certs");
    let key = env.dir.path().join("dev.key");
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&key)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain = env.dir.path().join("dev-chain.pem");
    let r = env.json(&[
        "device",
        "register",
        "--registration-id",
        "cert-dev",
        "--group-key",
        &gk,
        "--csr-key",
        key.to_str().expect("utf-8"),
        "--cert-out",
        chain.to_str().expect("utf-8"),
    ]);
    assert_eq!(r["status"], "assigned", "{r}");
    assert_eq!(
        r["issuedCertificateChain"].as_array().map(Vec::len),
        Some(3)
    );
    let ca = env.info.ca_certificate.clone().expect("a local CA");
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(&ca)
        .arg("-untrusted")
        .arg(&chain)
        .arg(&chain)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let chain_pem = std::fs::read_to_string(&chain).expect("chain written");
    let key_pem = std::fs::read_to_string(&key).expect("key");
    let mut conn = env
        .rt
        .block_on(muster_client::HubDeviceConnection::connect_x509(
            &env.info.hubs[0].host_name,
            env.info.mqtt_port,
            "cert-dev",
            &chain_pem,
            &key_pem,
            Some(&ca),
        ))
        .expect("the device connects to the hub with its issued certificate");
    env.rt
        .block_on(conn.send_event(br#"{"t":1}"#, &[]))
        .expect("telemetry sent");
    env.rt.block_on(conn.close());
    // `muster certificate issued`: list, show, revoke; the revoked certificate no longer
    // opens the hub.
    let listed = env.json(&[
        "certificate",
        "issued",
        "list",
        "--registration-id",
        "cert-dev",
    ]);
    let serial = listed[0]["serialNumber"]
        .as_str()
        .expect("a serial")
        .to_string();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let table = env.ok(&["certificate", "issued", "list", "-o", "table"]);
    assert!(
        table.contains("SERIAL") && table.contains(&serial),
        "{table}"
    );
    let shown = env.json(&["certificate", "issued", "show", &serial]);
    assert_eq!(shown["registrationId"], "cert-dev", "{shown}");
    let revoked = env.json(&[
        "certificate",
        "issued",
        "revoke",
        &serial,
        "--reason",
        "lost",
    ]);
    assert_eq!(revoked["revocationReason"], "lost", "{revoked}");
    assert!(env
        .rt
        .block_on(muster_client::HubDeviceConnection::connect_x509(
            &env.info.hubs[0].host_name,
            env.info.mqtt_port,
            "cert-dev",
            &chain_pem,
            &key_pem,
            Some(&ca),
        ))
        .is_err());
    let err = env.fails(&["certificate", "issued", "show", "ABCDEF"]);
    assert!(err.contains("404207"), "{err}");
    // An issuing CA the server does not have is refused when the group is written.
    let err = env.fails(&[
        "enrollment-group",
        "create",
        "--group-id",
        "other-ca",
        "--issue-certificates",
        "true",
        "--issuing-ca",
        "nope",
    ]);
    assert!(err.contains("400015") && err.contains("issuingCa"), "{err}");
    // Without certificateIssuance the CSR is refused with its code.
    env.ok(&["enrollment-group", "create", "--group-id", "plain"]);
    let pk = env.group_key("plain");
    let err = env.fails(&[
        "device",
        "register",
        "--registration-id",
        "plain-dev",
        "--group-key",
        &pk,
        "--csr-key",
        key.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("400022"), "{err}");
}

#[test]
fn registration_commands_and_cascade() {
    let env = Env::start();
    env.ok(&["enrollment-group", "create", "--group-id", "g"]);
    let gk = env.group_key("g");
    for id in ["r1", "r2", "r3", "r4"] {
        env.ok(&[
            "device",
            "register",
            "--registration-id",
            id,
            "--group-key",
            &gk,
        ]);
    }
    let r = env.json(&["registration", "show", "r1"]);
    assert_eq!(r["status"], "assigned");
    let list = env.json(&["registration", "list", "--group-id", "g"]);
    assert_eq!(list.as_array().map(Vec::len), Some(4));
    let table = env.ok(&[
        "registration",
        "list",
        "--group-id",
        "g",
        "--top",
        "2",
        "-o",
        "table",
    ]);
    assert_eq!(table.lines().count(), 3, "{table}");

    // Without --cascade the device stays in its hub.
    env.ok(&["registration", "delete", "r1"]);
    assert!(env.hub_has_device("r1"));
    let err = env.fails(&["registration", "show", "r1"]);
    assert!(err.contains("404203"), "{err}");

    // --cascade removes the record and the hub device.
    assert!(env.hub_has_device("r2"));
    env.ok(&["registration", "delete", "r2", "--cascade"]);
    assert!(!env.hub_has_device("r2"));
    env.fails(&["registration", "show", "r2"]);

    // deprovision --block: gone, and it cannot come back.
    env.ok(&["deprovision", "r3", "--block"]);
    assert!(!env.hub_has_device("r3"));
    let blocked = env.json(&["enrollment", "show", "r3"]);
    assert_eq!(blocked["provisioningStatus"], "disabled");
    let err = env.fails(&[
        "device",
        "register",
        "--registration-id",
        "r3",
        "--group-key",
        &gk,
    ]);
    assert!(err.contains("disabled"), "{err}");
    // r4 can still register again after a plain deprovision.
    env.ok(&["deprovision", "r4"]);
    assert!(!env.hub_has_device("r4"));
    env.ok(&[
        "device",
        "register",
        "--registration-id",
        "r4",
        "--group-key",
        &gk,
    ]);
    assert!(env.hub_has_device("r4"));

    let err = env.fails(&["deprovision", "never-registered"]);
    assert!(err.contains("no registration record"), "{err}");
}

/// Reads `child`'s stdout lines on a thread until `n` arrived or `deadline` passed.
fn read_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(rx: &std::sync::mpsc::Receiver<String>, deadline: Instant) -> Option<String> {
    let left = deadline.checked_duration_since(Instant::now())?;
    rx.recv_timeout(left).ok()
}

#[test]
fn hub_tail_follows_telemetry() {
    let env = Env::start();
    let key = B64.encode([6u8; 32]);
    env.ok(&[
        "enrollment",
        "create",
        "--enrollment-id",
        "tele-1",
        "--primary-key",
        &key,
    ]);
    let r = env.json(&[
        "device",
        "register",
        "--registration-id",
        "tele-1",
        "--key",
        &key,
    ]);
    assert_eq!(r["status"], "assigned", "{r}");
    let device = env.json(&["hub", "device", "show", "tele-1", "--show-keys"]);
    let device_key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("device key shown with --show-keys")
        .to_string();

    // The device connects to the hub over MQTT (TLS) and sends two messages before anyone
    // listens.
    let hub_host = env.info.hubs[0].host_name.clone();
    let mut conn = env
        .rt
        .block_on(muster_client::HubDeviceConnection::connect(
            &hub_host,
            env.info.mqtt_port,
            "tele-1",
            &device_key,
            env.info.ca_certificate.as_deref(),
        ))
        .expect("device connects to the hub");
    for (i, body) in [r#"{"t":21.5}"#, "second"].iter().enumerate() {
        let n = (i + 1).to_string();
        env.rt
            .block_on(conn.send_event(body.as_bytes(), &[("n", &n), ("$.mid", "m-1")]))
            .expect("telemetry sent");
    }

    // `hub tail DEV --from-start -o json` replays those two, then shows the third live.
    let dd = env.data_dir();
    let mut child = env
        .command(&[
            "hub",
            "tail",
            "tele-1",
            "--from-start",
            "-o",
            "json",
            "--data-dir",
            dd.to_str().expect("utf-8"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    let rx = read_lines(&mut child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got: Vec<Value> = Vec::new();
    while got.len() < 3 {
        let Some(line) = next_line(&rx, deadline) else {
            break;
        };
        got.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
        if got.len() == 2 {
            env.rt
                .block_on(conn.send_event(&[0xff, 0x00], &[("n", "3")]))
                .expect("live telemetry sent");
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got.len(), 3, "three messages within 60 s: {got:?}");
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m["deviceId"], "tele-1");
        assert_eq!(m["sequenceNumber"], i as u64 + 1);
        assert_eq!(m["properties"]["n"], (i + 1).to_string());
        assert!(
            m["enqueuedTime"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{m}"
        );
    }
    assert_eq!(got[0]["body"], r#"{"t":21.5}"#);
    assert_eq!(got[0]["systemProperties"]["messageId"], "m-1");
    assert_eq!(got[1]["body"], "second");
    assert_eq!(got[2]["bodyEncoding"], "base64");
    assert_eq!(got[2]["body"], B64.encode([0xff, 0x00]));

    // Lines by default; --after and --count end by themselves.
    let text = env.ok(&["hub", "tail", "tele-1", "--after", "1", "--count", "2"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("tele-1  #2  ") && lines[0].contains("second"),
        "{text}"
    );
    assert!(lines[0].contains(r#"properties={"n":"2"}"#), "{text}");
    assert!(
        lines[1].contains("#3") && lines[1].contains("base64:/wA="),
        "{text}"
    );

    // Every device, live: a message sent after the stream opened.
    let mut child = env
        .command(&[
            "hub",
            "tail",
            "-o",
            "json",
            "--data-dir",
            dd.to_str().expect("utf-8"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    let rx = read_lines(&mut child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = None;
    // The stream may open after a send: keep sending until one arrives.
    while seen.is_none() && Instant::now() < deadline {
        env.rt
            .block_on(conn.send_event(b"all", &[]))
            .expect("telemetry sent");
        seen = next_line(&rx, Instant::now() + Duration::from_millis(500));
    }
    let _ = child.kill();
    let _ = child.wait();
    let m: Value = serde_json::from_str(&seen.expect("a live message within 60 s")).expect("json");
    assert_eq!(
        (m["deviceId"].as_str(), m["body"].as_str()),
        (Some("tele-1"), Some("all"))
    );
    env.rt.block_on(conn.close());

    // --from-start needs a device; a wrong device key is refused with the hub's code.
    let err = env.fails(&["hub", "tail", "--from-start"]);
    assert!(err.contains("DEVICE_ID"), "{err}");
    let err = env.fails(&[
        "hub",
        "tail",
        "--hub-connection-string",
        &format!(
            "HostName={hub_host};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
            B64.encode([1u8; 32])
        ),
    ]);
    assert!(err.contains("401") && err.contains("hint:"), "{err}");
}

fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut rdr = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    rdr.records()
        .map(|r| r.expect("csv row").iter().map(str::to_string).collect())
        .collect()
}

fn complete_rows(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches('\n').count().saturating_sub(1))
        .unwrap_or(0)
}

/// Devices `provision_resumes_and_skips` provisions (twice: one run, one killed run): the
/// acceptance run's 10,000. `MUSTER_PROVISION_TEST_COUNT` overrides it.
const PROVISION_COUNT: u64 = 10_000;

fn provision_count() -> u64 {
    std::env::var("MUSTER_PROVISION_TEST_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PROVISION_COUNT)
}

#[test]
fn provision_resumes_and_skips() {
    let env = Env::start();
    env.ok(&["enrollment-group", "create", "--group-id", "fleet"]);
    let gk = env.group_key("fleet");
    let out = env.dir.path().join("fleet.csv");
    let out_s = out.to_str().expect("utf-8").to_string();
    let n = provision_count();
    let n_s = n.to_string();

    let started = Instant::now();
    let summary = env.json(&[
        "provision",
        "--group-key",
        &gk,
        "--prefix",
        "dev-",
        "--count",
        &n_s,
        "--out",
        &out_s,
    ]);
    eprintln!(
        "provisioned {n} devices in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(summary["assigned"], n);
    let rows = csv_rows(&out);
    assert_eq!(rows.len() as u64, n);
    for r in &rows {
        assert_eq!(r[4], "assigned", "{r:?}");
        assert_eq!(r[1], r[0]);
        assert_eq!(r[2], env.info.hubs[0].host_name);
    }
    for r in rows.iter().step_by(97) {
        assert_eq!(r[3], hmac_b64(&gk, &r[0]));
    }
    let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(ids.len() as u64, n);
    // A rerun registers nothing new.
    let summary = env.json(&[
        "provision",
        "--group-key",
        &gk,
        "--prefix",
        "dev-",
        "--count",
        &n_s,
        "--out",
        &out_s,
    ]);
    assert_eq!(summary["assigned"], 0);
    assert_eq!(summary["skipped"], n);
    assert_eq!(csv_rows(&out).len() as u64, n);

    // Killed halfway, then rerun: all end assigned, each once.
    let out2 = env.dir.path().join("killed.csv");
    let out2_s = out2.to_str().expect("utf-8").to_string();
    let dd = env.data_dir();
    let started = Instant::now();
    let mut child = env
        .command(&[
            "provision",
            "--group-key",
            &gk,
            "--prefix",
            "k-",
            "--count",
            &n_s,
            "--out",
            &out2_s,
            "--data-dir",
            dd.to_str().expect("utf-8"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    // Poll the out file until half the rows are there, then kill.
    let half = (n / 2) as usize;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut tick = env
        .rt
        .block_on(async { tokio::time::interval(Duration::from_millis(20)) });
    while complete_rows(&out2) < half {
        assert!(Instant::now() < deadline, "not halfway in 300 s");
        env.rt.block_on(tick.tick());
    }
    child.kill().expect("kill");
    let _ = child.wait();
    let after_kill = complete_rows(&out2);
    assert!(
        (half..n as usize).contains(&after_kill),
        "killed after {after_kill} rows"
    );
    let summary = env.json(&[
        "provision",
        "--group-key",
        &gk,
        "--prefix",
        "k-",
        "--count",
        &n_s,
        "--out",
        &out2_s,
    ]);
    eprintln!(
        "killed after {after_kill} rows; killed run and rerun took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let skipped = summary["skipped"].as_u64().expect("skipped");
    assert!(skipped >= half as u64, "{summary}");
    assert_eq!(summary["assigned"].as_u64().expect("assigned") + skipped, n);
    let rows = csv_rows(&out2);
    let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(ids.len() as u64, n);
    assert_eq!(rows.len() as u64, n, "no id written twice");
    assert!(rows.iter().all(|r| r[4] == "assigned"));
    // The service agrees: every device has its registration record and its hub device.
    let hub = env.hub();
    let devices = env
        .rt
        .block_on(hub.list_devices(Some(5)))
        .expect("hub devices");
    assert_eq!(devices.len(), 5);
    assert!(env.hub_has_device(&format!("k-{}", n - 1)));

    // --ids FILE, with one id already done and a wrong group key for a failure row.
    let ids_file = env.dir.path().join("ids.txt");
    std::fs::write(&ids_file, "# fleet\nk-0\nnew-1\n\nnew-2\n").expect("write ids");
    let out3 = env.dir.path().join("ids.csv");
    std::fs::copy(&out2, &out3).expect("copy");
    let s = env.json(&[
        "provision",
        "--group-key",
        &gk,
        "--ids",
        ids_file.to_str().expect("utf-8"),
        "--out",
        out3.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        (s["assigned"].as_u64(), s["skipped"].as_u64()),
        (Some(2), Some(1))
    );
    let bad = B64.encode([8u8; 32]);
    let err = env.fails(&[
        "provision",
        "--group-key",
        &bad,
        "--prefix",
        "bad-",
        "--count",
        "2",
        "--retries",
        "1",
        "--out",
        out3.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("did not end assigned"), "{err}");
    let rows = csv_rows(&out3);
    let bad_rows: Vec<_> = rows.iter().filter(|r| r[0].starts_with("bad-")).collect();
    assert_eq!(bad_rows.len(), 2);
    assert!(
        bad_rows
            .iter()
            .all(|r| r[4] == "error" && r[5].contains("401005")),
        "{bad_rows:?}"
    );
}

#[test]
fn completions_and_help() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .expect("runs");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("enrollment-group") && text.contains("provision"),
            "{shell}"
        );
    }
    let out = Command::new(BIN)
        .args(["provision", "--help"])
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Examples:") && help.contains("--concurrency"),
        "{help}"
    );
    assert!(!help.contains("not available yet"), "{help}");
    let out = Command::new(BIN)
        .args(["device", "register", "--help"])
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--cert-key") && !help.contains("not available yet"),
        "{help}"
    );
    // serve keeps its flags.
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--data-dir",
        "--dps-host",
        "--https-port",
        "--mqtt-port",
        "--print-config",
    ] {
        assert!(help.contains(flag), "{flag}");
    }
    assert!(!help.contains("--output"));
}

#[test]
fn errors_are_short_and_actionable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["enrollment", "list"])
        .current_dir(dir.path())
        .env_remove("MUSTER_CONNECTION_STRING")
        .env_remove("MUSTER_DATA_DIR")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--connection-string") && err.lines().count() <= 3,
        "{err}"
    );

    // A server that is not there.
    let cs = format!(
        "HostName=127.0.0.1:9;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={}",
        B64.encode([1u8; 32])
    );
    let out = Command::new(BIN)
        .args(["enrollment-group", "list", "--connection-string", &cs])
        .current_dir(dir.path())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hint:"), "{err}");
    assert!(!err.contains(&B64.encode([1u8; 32])), "no key in errors");
}

#[test]
fn service_commands_take_a_connection_string_from_the_environment() {
    let env = Env::start();
    let ca = env
        .info
        .ca_certificate
        .as_ref()
        .unwrap()
        .to_str()
        .expect("utf-8")
        .to_string();
    let out = env
        .command(&[
            "enrollment-group",
            "create",
            "--group-id",
            "from-env",
            "--ca-cert",
            &ca,
        ])
        .env(
            "MUSTER_CONNECTION_STRING",
            &env.info.service_connection_string,
        )
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env
        .ok(&["enrollment-group", "list", "-o", "table"])
        .contains("from-env"));
}

/// A leaf certificate with CN `cn` and the clientAuth EKU, self-signed or signed by `by`:
/// (certificate PEM, PKCS#8 key PEM).
fn x509_leaf(cn: &str, by: Option<(&rcgen::Certificate, &rcgen::KeyPair)>) -> (String, String) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = match by {
        Some((ca, ca_key)) => p.signed_by(&key, ca, ca_key),
        None => p.self_signed(&key),
    }
    .expect("certificate");
    (cert.pem(), key.serialize_pem())
}

/// Writes a certificate and key pair into `dir`: (certificate path, key path).
fn write_pair(dir: &Path, name: &str, (cert, key): &(String, String)) -> (String, String) {
    let c = dir.join(format!("{name}.pem"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert).expect("write cert");
    std::fs::write(&k, key).expect("write key");
    (
        c.to_str().expect("utf-8").to_string(),
        k.to_str().expect("utf-8").to_string(),
    )
}

#[test]
fn device_register_with_x509_certificates() {
    let env = Env::start();
    let dir = env.dir.path().to_path_buf();

    // An individual enrollment with a self-signed leaf, over HTTPS and MQTT.
    let solo = x509_leaf("x509-solo", None);
    let (solo_cert, solo_key) = write_pair(&dir, "x509-solo", &solo);
    env.ok(&[
        "enrollment",
        "create",
        "--enrollment-id",
        "x509-solo",
        "--attestation-type",
        "x509",
        "--certificate-path",
        &solo_cert,
    ]);
    let e = env.json(&["enrollment", "show", "x509-solo"]);
    assert!(
        e["attestation"]["x509"]["clientCertificates"]["primary"].is_object(),
        "{e}"
    );
    for transport in ["https", "mqtt"] {
        let r = env.json(&[
            "device",
            "register",
            "--registration-id",
            "x509-solo",
            "--cert",
            &solo_cert,
            "--cert-key",
            &solo_key,
            "--transport",
            transport,
        ]);
        assert_eq!(r["status"], "assigned", "{transport}: {r}");
        assert_eq!(r["deviceId"], "x509-solo", "{transport}: {r}");
        assert_eq!(
            r["x509"]["certificateInfo"]["subjectName"], "CN=x509-solo",
            "{transport}: {r}"
        );
    }
    // The registration id defaults to the certificate's CN.
    let r = env.json(&[
        "device",
        "register",
        "--cert",
        &solo_cert,
        "--cert-key",
        &solo_key,
    ]);
    assert_eq!(r["deviceId"], "x509-solo", "{r}");
    let d = env.json(&["hub", "device", "show", "x509-solo"]);
    assert_eq!(d["authentication"]["type"], "selfSigned", "{d}");

    // A group with a root signing certificate; the device sends its leaf.
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "muster test root");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root_key = rcgen::KeyPair::generate().expect("key");
    let root = ca.self_signed(&root_key).expect("root");
    let root_path = dir.join("root.pem");
    std::fs::write(&root_path, root.pem()).expect("write root");
    env.ok(&[
        "enrollment-group",
        "create",
        "--group-id",
        "x509-fleet",
        "--attestation-type",
        "x509",
        "--certificate-path",
        root_path.to_str().expect("utf-8"),
    ]);
    let member = x509_leaf("fleet-001", Some((&root, &root_key)));
    let (member_cert, member_key) = write_pair(&dir, "fleet-001", &member);
    for transport in ["https", "mqtt"] {
        let r = env.json(&[
            "device",
            "register",
            "--registration-id",
            "fleet-001",
            "--cert",
            &member_cert,
            "--cert-key",
            &member_key,
            "--transport",
            transport,
        ]);
        assert_eq!(r["status"], "assigned", "{transport}: {r}");
        assert_eq!(r["x509"]["enrollmentGroupId"], "x509-fleet", "{r}");
    }

    // Another certificate with the enrolled CN: refused with the service's code, both ways.
    let impostor = x509_leaf("x509-solo", None);
    let (imp_cert, imp_key) = write_pair(&dir, "impostor", &impostor);
    for transport in ["https", "mqtt"] {
        let err = env.fails(&[
            "device",
            "register",
            "--registration-id",
            "x509-solo",
            "--cert",
            &imp_cert,
            "--cert-key",
            &imp_key,
            "--transport",
            transport,
        ]);
        assert!(err.contains("401009"), "{transport}: {err}");
    }
    // A certificate whose key is not the certificate's: refused before connecting.
    let err = env.fails(&[
        "device",
        "register",
        "--cert",
        &solo_cert,
        "--cert-key",
        &imp_key,
    ]);
    assert!(err.contains("key"), "{err}");
    // --cert without --cert-key is a usage error.
    let err = env.fails(&["device", "register", "--cert", &solo_cert]);
    assert!(err.contains("--cert-key"), "{err}");
}

/// An X.509 version 1 device certificate, as `openssl x509 -req` without an extension file
/// makes it, registers with `--cert` (rustls's own key check refuses v1 certificates, so
/// muster-client compares the keys itself).
#[test]
fn device_register_with_a_v1_certificate() {
    let env = Env::start();
    let dir = env.dir.path().to_path_buf();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "v1.key",
        "-subj",
        "/CN=x509-v1",
        "-out",
        "v1.csr",
    ]);
    openssl(&[
        "x509", "-req", "-in", "v1.csr", "-key", "v1.key", "-days", "2", "-out", "v1.pem",
    ]);
    let text = openssl(&["x509", "-in", "v1.pem", "-noout", "-text"]);
    assert!(text.contains("Version: 1 (0x0)"), "{text}");
    let cert = dir.join("v1.pem").to_str().expect("utf-8").to_string();
    let key = dir.join("v1.key").to_str().expect("utf-8").to_string();
    env.ok(&[
        "enrollment",
        "create",
        "--enrollment-id",
        "x509-v1",
        "--attestation-type",
        "x509",
        "--certificate-path",
        &cert,
    ]);
    for transport in ["https", "mqtt"] {
        let r = env.json(&[
            "device",
            "register",
            "--cert",
            &cert,
            "--cert-key",
            &key,
            "--transport",
            transport,
        ]);
        assert_eq!(r["status"], "assigned", "{transport}: {r}");
        assert_eq!(
            r["x509"]["certificateInfo"]["version"], 1,
            "{transport}: {r}"
        );
    }
}

/// Runs a command; returns (exit code, stdout, stderr).
fn outcome(env: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    let out = env.run(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A service refusal: exit 1, the DPS error body on stderr with `code`, and `fix` in it.
fn refused(env: &Env, args: &[&str], code: u32, fix: &str) {
    let (status, _, err) = outcome(env, args);
    assert_eq!(status, Some(1), "{args:?}: {err}");
    assert!(
        err.contains(&format!("\"errorCode\":{code}")) && err.contains(fix),
        "{args:?}: expected {code} and '{fix}': {err}"
    );
}

#[test]
fn az_shapes_for_enrollments_groups_and_registrations() {
    let env = Env::start();
    let hub = env.info.hubs[0].host_name.clone();

    // enrollment: az's --eid, --enrollment-id and the positional name the same enrollment.
    env.json(&[
        "enrollment",
        "create",
        "--eid",
        "az-1",
        "--ap",
        "static",
        "--ih",
        &hub,
    ]);
    for form in [
        vec!["--enrollment-id", "az-1"],
        vec!["--eid", "az-1"],
        vec!["az-1"],
    ] {
        let mut args = vec!["enrollment", "show"];
        args.extend(form.iter().copied());
        assert_eq!(env.json(&args)["registrationId"], "az-1", "{form:?}");
    }
    let u = env.json(&["enrollment", "update", "--eid", "az-1", "--ps", "disabled"]);
    assert_eq!(u["provisioningStatus"], "disabled");
    let u = env.json(&["enrollment", "update", "az-1", "--ps", "enabled"]);
    assert_eq!(u["provisioningStatus"], "enabled");
    // Both forms at once, or neither, are usage errors (exit 2).
    assert_eq!(
        outcome(&env, &["enrollment", "show", "az-1", "--eid", "az-1"]).0,
        Some(2)
    );
    assert_eq!(outcome(&env, &["enrollment", "delete"]).0, Some(2));

    // enrollment-group: --gid, --group-id and the positional.
    env.json(&["enrollment-group", "create", "--gid", "az-g"]);
    for form in [
        vec!["--group-id", "az-g"],
        vec!["--gid", "az-g"],
        vec!["az-g"],
    ] {
        let mut args = vec!["enrollment-group", "show"];
        args.extend(form.iter().copied());
        assert_eq!(env.json(&args)["enrollmentGroupId"], "az-g", "{form:?}");
    }
    let u = env.json(&["enrollment-group", "update", "az-g", "--ee", "true"]);
    assert_eq!(u["capabilities"]["iotEdge"], true);
    let u = env.json(&[
        "enrollment-group",
        "update",
        "--gid",
        "az-g",
        "--ee",
        "false",
    ]);
    assert_eq!(u["capabilities"]["iotEdge"], false);

    // compute-device-key reads the group key through the API, and matches the offline form.
    let key = env.group_key("az-g");
    let online = env.json(&[
        "enrollment-group",
        "compute-device-key",
        "--gid",
        "az-g",
        "--rid",
        "az-dev",
    ]);
    assert_eq!(online["derivedKey"], hmac_b64(&key, "az-dev").as_str());
    let offline = env.ok(&[
        "enrollment-group",
        "compute-device-key",
        "--key",
        &key,
        "--rid",
        "az-dev",
        "--query",
        "derivedKey",
        "-o",
        "tsv",
    ]);
    assert_eq!(offline.trim(), hmac_b64(&key, "az-dev"));
    // A group without symmetric keys has none to derive from.
    refused(
        &env,
        &[
            "enrollment-group",
            "compute-device-key",
            "--gid",
            "no-such",
            "--rid",
            "x",
        ],
        404202,
        "no-such",
    );

    // registration: the record of a registered device by --rid or positional, listed by --gid.
    let r = env.json(&[
        "device",
        "register",
        "--registration-id",
        "az-dev",
        "--group-key",
        &key,
    ]);
    assert_eq!(r["status"], "assigned");
    for args in [
        vec!["registration", "show", "--rid", "az-dev"],
        vec!["registration", "show", "--registration-id", "az-dev"],
        vec!["registration", "show", "az-dev"],
        vec![
            "enrollment-group",
            "registration",
            "show",
            "--rid",
            "az-dev",
        ],
    ] {
        assert_eq!(env.json(&args)["registrationId"], "az-dev", "{args:?}");
    }
    let listed = env.json(&["enrollment-group", "registration", "list", "--gid", "az-g"]);
    assert_eq!(listed[0]["registrationId"], "az-dev", "{listed}");
    env.ok(&["registration", "delete", "--rid", "az-dev"]);
    refused(&env, &["registration", "show", "az-dev"], 404203, "az-dev");

    // delete in both forms.
    env.ok(&["enrollment", "delete", "--eid", "az-1"]);
    env.ok(&["enrollment-group", "delete", "az-g"]);
    refused(
        &env,
        &["enrollment", "show", "--eid", "az-1"],
        404201,
        "az-1",
    );
}

#[test]
fn every_output_format_and_query() {
    let env = Env::start();
    env.json(&[
        "enrollment",
        "create",
        "--eid",
        "fmt-1",
        "--did",
        "device-fmt",
    ]);
    env.json(&["enrollment", "create", "--eid", "fmt-2"]);
    let show = |fmt: &str| env.ok(&["enrollment", "show", "fmt-1", "-o", fmt]);

    let json: Value = serde_json::from_str(&show("json")).expect("json");
    assert_eq!(json["deviceId"], "device-fmt");
    let jsonc = show("jsonc");
    assert!(
        jsonc.contains("\x1b[") && jsonc.contains("device-fmt"),
        "{jsonc}"
    );
    let plain: String = {
        // Without the colour codes it is the same JSON.
        let mut s = String::new();
        let mut chars = jsonc.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                for d in chars.by_ref() {
                    if d == 'm' {
                        break;
                    }
                }
            } else {
                s.push(c);
            }
        }
        s
    };
    assert_eq!(serde_json::from_str::<Value>(&plain).expect("jsonc"), json);
    let yaml = show("yaml");
    assert!(
        yaml.contains("registrationId: fmt-1") && yaml.contains("deviceId: device-fmt"),
        "{yaml}"
    );
    let tsv = show("tsv");
    assert_eq!(tsv.lines().count(), 1, "{tsv}");
    assert!(
        tsv.split('\t').any(|c| c == "fmt-1") && tsv.contains("device-fmt"),
        "{tsv}"
    );
    let table = show("table");
    assert!(
        table.starts_with("FIELD") && table.contains("device-fmt"),
        "{table}"
    );
    assert_eq!(show("none"), "");
    // Without -o, a pipe gets JSON (as az prints).
    let default: Value =
        serde_json::from_str(&env.ok(&["enrollment", "show", "fmt-1"])).expect("default is json");
    assert_eq!(default, json);

    // Lists: a table with columns, one tsv line per item.
    let table = env.ok(&["enrollment", "list", "-o", "table"]);
    assert!(
        table.starts_with("REGISTRATION ID") && table.contains("fmt-2"),
        "{table}"
    );
    let ids = env.ok(&[
        "enrollment",
        "list",
        "--query",
        "[].registrationId",
        "-o",
        "tsv",
    ]);
    let mut ids: Vec<&str> = ids.lines().collect();
    ids.sort();
    assert_eq!(ids, ["fmt-1", "fmt-2"]);

    // --query before formatting, in every format.
    let q = [
        "enrollment",
        "list",
        "--query",
        "[?registrationId=='fmt-1'].deviceId",
    ];
    let mut args = q.to_vec();
    args.extend(["-o", "json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&env.ok(&args)).expect("json"),
        json!(["device-fmt"])
    );
    let mut args = q.to_vec();
    args.extend(["-o", "yaml"]);
    assert_eq!(env.ok(&args).trim(), "- device-fmt");
    let mut args = q.to_vec();
    args.extend(["-o", "table"]);
    let t = env.ok(&args);
    assert!(t.starts_with("Result") && t.contains("device-fmt"), "{t}");
    let picked = env.ok(&[
        "enrollment",
        "show",
        "fmt-1",
        "--query",
        "{id: registrationId, status: provisioningStatus}",
        "-o",
        "table",
    ]);
    assert!(
        picked.contains("id") && picked.contains("fmt-1") && picked.contains("enabled"),
        "{picked}"
    );
    let status = env.ok(&[
        "enrollment",
        "show",
        "fmt-1",
        "--query",
        "provisioningStatus",
        "-o",
        "tsv",
    ]);
    assert_eq!(status.trim(), "enabled");

    // An invalid query is a usage error (exit 2) before any request.
    let (code, out, err) = outcome(&env, &["enrollment", "list", "--query", "[?"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty() && err.contains("JMESPath"), "{err}");
    // An unknown format too.
    assert_eq!(
        outcome(&env, &["enrollment", "list", "-o", "xml"]).0,
        Some(2)
    );
}

#[test]
fn policy_certificate_connection_string_and_linked_hub_commands() {
    let env = Env::start();
    let hub = env.info.hubs[0].host_name.clone();

    // policy: create, list, show, update, delete; rights enforced with its connection string.
    let created = env.json(&[
        "policy",
        "create",
        "--pn",
        "reader",
        "--rights",
        "EnrollmentRead",
        "RegistrationStatusRead",
    ]);
    assert_eq!(created["keyName"], "reader");
    assert_eq!(created["rights"], "EnrollmentRead, RegistrationStatusRead");
    assert!(
        created.get("primaryKey").is_none(),
        "keys only with --show-keys"
    );
    refused_hub(
        &env,
        &[
            "policy",
            "create",
            "--pn",
            "reader",
            "--rights",
            "ServiceConfig",
        ],
        "exists",
    );
    let names = env.json(&["policy", "list", "--query", "[].keyName"]);
    assert!(
        names
            .as_array()
            .is_some_and(|n| n.contains(&json!("reader"))),
        "{names}"
    );
    let shown = env.json(&["policy", "show", "reader", "--show-keys"]);
    assert!(shown["primaryKey"].is_string(), "{shown}");
    let cs = env.json(&["connection-string", "show", "--policy-name", "reader"]);
    let cs = cs["connectionString"]
        .as_str()
        .expect("connection string")
        .to_string();
    assert!(cs.contains("SharedAccessKeyName=reader"), "{cs}");
    let secondary = env.json(&[
        "connection-string",
        "show",
        "--pn",
        "reader",
        "--key-type",
        "secondary",
    ]);
    assert!(
        secondary["connectionString"]
            .as_str()
            .is_some_and(|s| s.ends_with(shown["secondaryKey"].as_str().unwrap_or("?"))),
        "{secondary}"
    );
    let all = env.json(&["connection-string", "show", "--show-all"]);
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    // The reader may list but not write.
    env.ok(&["enrollment", "list", "--connection-string", &cs]);
    let (code, _, err) = outcome(
        &env,
        &[
            "enrollment",
            "create",
            "--eid",
            "nope",
            "--connection-string",
            &cs,
        ],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("403"), "{err}");
    let updated = env.json(&[
        "policy",
        "update",
        "--policy-name",
        "reader",
        "-r",
        "EnrollmentRead",
    ]);
    assert_eq!(updated["rights"], "EnrollmentRead");
    refused_hub(
        &env,
        &["policy", "update", "--pn", "ghost", "-r", "EnrollmentRead"],
        "muster policy create",
    );
    refused(
        &env,
        &["policy", "delete", "provisioningserviceowner"],
        400015,
        "can't be deleted",
    );
    env.ok(&["policy", "delete", "--pn", "reader"]);
    refused(&env, &["policy", "show", "reader"], 404000, "reader");

    // certificate: the whole proof-of-possession flow.
    let dir = env.dir.path().to_path_buf();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "AZ Test Root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let root_key = rcgen::KeyPair::generate().expect("key");
    let root = p.self_signed(&root_key).expect("root");
    let root_pem = dir.join("root.pem");
    std::fs::write(&root_pem, root.pem()).expect("write");
    let root_path = root_pem.to_str().expect("utf-8");
    let c = env.json(&[
        "certificate",
        "create",
        "--name",
        "my-root",
        "--path",
        root_path,
    ]);
    assert_eq!(
        (c["name"].as_str(), c["isVerified"].as_bool()),
        (Some("my-root"), Some(false))
    );
    // Refused while unverified, and when the name is unknown.
    refused(
        &env,
        &[
            "enrollment-group",
            "create",
            "--gid",
            "ca-group",
            "--at",
            "x509",
            "--root-ca-name",
            "my-root",
        ],
        400005,
        "not verified",
    );
    refused(
        &env,
        &[
            "enrollment-group",
            "create",
            "--gid",
            "ca-group",
            "--at",
            "x509",
            "--cn",
            "no-root",
        ],
        400005,
        "does not exist",
    );
    let code = env.ok(&[
        "certificate",
        "generate-verification-code",
        "my-root",
        "--query",
        "verificationCode",
        "-o",
        "tsv",
    ]);
    let code = code.trim();
    assert!(code.len() >= 16, "{code}");
    // A proof with the wrong CN is refused.
    let wrong = x509_leaf("not-the-code", Some((&root, &root_key)));
    let (wrong_path, _) = write_pair(&dir, "wrong", &wrong);
    refused(
        &env,
        &[
            "certificate",
            "verify",
            "--name",
            "my-root",
            "--path",
            &wrong_path,
        ],
        400017,
        "",
    );
    let proof = x509_leaf(code, Some((&root, &root_key)));
    let (proof_path, _) = write_pair(&dir, "proof", &proof);
    let v = env.json(&[
        "certificate",
        "verify",
        "--certificate-name",
        "my-root",
        "-p",
        &proof_path,
    ]);
    assert_eq!(v["isVerified"], true, "{v}");
    let g = env.json(&[
        "enrollment-group",
        "create",
        "--gid",
        "ca-group",
        "--at",
        "x509",
        "--root-ca-name",
        "my-root",
    ]);
    assert_eq!(
        g["attestation"]["x509"]["caReferences"]["primary"],
        "my-root"
    );
    let table = env.ok(&["certificate", "list", "-o", "table"]);
    assert!(
        table.starts_with("NAME") && table.contains("my-root") && table.contains("true"),
        "{table}"
    );
    assert_eq!(
        env.json(&["certificate", "show", "my-root"])["info"]["subjectName"],
        "CN=AZ Test Root"
    );
    env.ok(&["enrollment-group", "delete", "ca-group"]);
    env.ok(&["certificate", "delete", "--name", "my-root"]);
    refused(&env, &["certificate", "show", "my-root"], 404206, "my-root");

    // linked-hub: show in both forms; an unreachable hub is refused unless --skip-check.
    assert_eq!(
        env.json(&["linked-hub", "show", "--lh", &hub])["name"],
        hub.as_str()
    );
    assert_eq!(env.json(&["linked-hub", "show", &hub])["builtIn"], true);
    let down = format!(
        "HostName=127.0.0.35:9;SharedAccessKeyName=iothubowner;SharedAccessKey={}",
        B64.encode([5u8; 32])
    );
    refused(
        &env,
        &["linked-hub", "create", "--hub-connection-string", &down],
        400015,
        "--skip-check",
    );
    refused(
        &env,
        &["linked-hub", "show", "127.0.0.35:9"],
        404205,
        "127.0.0.35:9",
    );
    env.json(&[
        "linked-hub",
        "create",
        "--hub-connection-string",
        &down,
        "--skip-check",
        "--aw",
        "2",
    ]);
    assert_eq!(
        env.json(&["linked-hub", "show", "127.0.0.35:9"])["allocationWeight"],
        2
    );

    // Enrollments may name linked hubs only; custom allocation needs its webhook.
    refused(
        &env,
        &[
            "enrollment",
            "create",
            "--eid",
            "lost",
            "--ap",
            "static",
            "--iot-hubs",
            "nohub.example",
        ],
        400016,
        "not a linked hub",
    );
    refused(
        &env,
        &[
            "enrollment-group",
            "create",
            "--gid",
            "lost",
            "--ap",
            "hashed",
            "--ih",
            &hub,
            "nohub.example",
        ],
        400016,
        "nohub.example",
    );
    refused(
        &env,
        &[
            "enrollment-group",
            "create",
            "--gid",
            "lost",
            "--ap",
            "custom",
        ],
        400012,
        "webhookUrl",
    );
    let ok = env.json(&[
        "enrollment",
        "create",
        "--eid",
        "found",
        "--ap",
        "hashed",
        "--ih",
        &hub,
        "127.0.0.35:9",
    ]);
    assert_eq!(ok["iotHubs"], json!([hub, "127.0.0.35:9"]));
    // Nothing half-written by the refusals.
    assert!(env.json(&["enrollment", "list", "--query", "[].registrationId"]) == json!(["found"]));
    assert_eq!(env.json(&["enrollment-group", "list"]), json!([]));
    env.ok(&["linked-hub", "delete", "--linked-hub", "127.0.0.35:9"]);
}

#[test]
fn hub_device_identity_c2d_and_methods() {
    let env = Env::start();
    let d = env.json(&[
        "hub",
        "device-identity",
        "create",
        "-d",
        "hub-dev",
        "--show-keys",
    ]);
    assert_eq!(d["deviceId"], "hub-dev");
    assert!(
        d["authentication"]["symmetricKey"]["primaryKey"].is_string(),
        "{d}"
    );
    let edge = env.json(&["hub", "device-identity", "create", "-d", "hub-edge", "--ee"]);
    assert_eq!(edge["capabilities"]["iotEdge"], true);
    assert!(
        edge["authentication"]["symmetricKey"]
            .get("primaryKey")
            .is_none(),
        "{edge}"
    );
    let ids = env.json(&["hub", "device-identity", "list", "--query", "[].deviceId"]);
    assert!(ids.as_array().is_some_and(|i| i.len() == 2), "{ids}");
    assert_eq!(
        env.json(&["hub", "device-identity", "show", "hub-dev"])["status"],
        "enabled"
    );
    // C2D: queued for the device, read back over the hub's device HTTPS API.
    env.ok(&[
        "hub",
        "c2d-message",
        "send",
        "-d",
        "hub-dev",
        "--data",
        "{\"led\":\"on\"}",
        "--props",
        "kind=cmd;prio=1",
    ]);
    let key = d["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("key")
        .to_string();
    let (body, headers) = receive_c2d(&env, "hub-dev", &key);
    assert_eq!(body, "{\"led\":\"on\"}");
    assert_eq!(
        headers.get("iothub-app-kind").map(String::as_str),
        Some("cmd"),
        "{headers:?}"
    );
    assert_eq!(
        headers.get("iothub-app-prio").map(String::as_str),
        Some("1"),
        "{headers:?}"
    );
    refused_hub(
        &env,
        &["hub", "c2d-message", "send", "-d", "ghost"],
        "DeviceNotFound",
    );
    // A direct method on a device that is not connected: the hub's DeviceNotOnline.
    refused_hub(
        &env,
        &[
            "hub",
            "invoke-device-method",
            "-d",
            "hub-dev",
            "--mn",
            "reboot",
            "--to",
            "1",
        ],
        "DeviceNotOnline",
    );
    env.ok(&["hub", "device-identity", "delete", "hub-edge"]);
}

fn refused_hub(env: &Env, args: &[&str], code: &str) {
    let (status, _, err) = outcome(env, args);
    assert_eq!(status, Some(1), "{args:?}: {err}");
    assert!(err.contains(code), "{args:?}: {err}");
}

/// Receives one cloud-to-device message as the device, over the hub's device HTTPS API:
/// (body, headers).
fn receive_c2d(
    env: &Env,
    device_id: &str,
    key: &str,
) -> (String, std::collections::HashMap<String, String>) {
    let host = env.info.hubs[0].host_name.clone();
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
        + 600;
    let token = muster_proto::SasToken::generate(
        &format!("{host}/devices/{device_id}"),
        &B64.decode(key).expect("base64 key"),
        None,
        expiry,
    );
    let http =
        muster_client::tls::https_client(env.info.ca_certificate.as_deref()).expect("http client");
    env.rt.block_on(async {
        let r = http
            .get(format!(
                "https://{host}/devices/{device_id}/messages/devicebound?api-version=2021-04-12"
            ))
            .header("authorization", token)
            .send()
            .await
            .expect("receive");
        assert_eq!(r.status(), 200, "a message waits");
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect();
        (r.text().await.expect("body"), headers)
    })
}
