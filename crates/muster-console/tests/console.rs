//! The console driven over HTTPS against a real `muster_server::Server` on loopback: sign-in,
//! CSRF, sign-out, rights enforced by the API, forms re-rendered with the user's values.

use std::sync::Arc;

use muster_proto::{ConnectionString, SasToken};
use muster_server::{Config, ConnectionInfo, Server};
use serde_json::{json, Value};

struct Harness {
    server: Server,
    info: ConnectionInfo,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Config {
        data_dir: dir.path().to_path_buf(),
        dps_host: "127.0.0.1".into(),
        https_port: 0,
        mqtt_port: 0,
        amqp_port: 0,
        ..Config::default()
    })
    .await
    .unwrap();
    let info = server.connection.clone();
    let pem = std::fs::read(info.ca_certificate.as_ref().unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = info.service_endpoint.clone();
    assert_eq!(info.console_url, format!("{base}/console"));
    Harness {
        server,
        info,
        http,
        base,
        _dir: dir,
    }
}

/// A browser-like user: a cookie and the page's CSRF token.
struct User {
    cookie: String,
    csrf: String,
}

fn set_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string()
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)? + i;
    Some(&s[i..j])
}

fn meta_csrf(html: &str) -> String {
    between(html, "<meta name=\"csrf-token\" content=\"", "\"")
        .unwrap()
        .to_string()
}

fn owner(info: &ConnectionInfo) -> (String, String) {
    let cs = ConnectionString::parse(&info.service_connection_string).unwrap();
    (cs.key_name, cs.key)
}

impl Harness {
    async fn post_form(
        &self,
        path: &str,
        cookie: Option<&str>,
        fields: &[(&str, &str)],
    ) -> reqwest::Response {
        let body: String = fields
            .iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send().await.unwrap()
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send().await.unwrap()
    }

    /// Signs in; returns the response of the sign-in POST.
    async fn try_sign_in(&self, policy: &str, key: &str) -> (reqwest::Response, String) {
        let page = self.get("/console/sign-in", None).await;
        assert_eq!(page.status(), 200);
        let pre = cookie_value(&set_cookie(&page, "muster_console_signin").unwrap());
        let html = page.text().await.unwrap();
        let token = between(&html, "name=\"csrf\" value=\"", "\"")
            .unwrap()
            .to_string();
        assert_eq!(token, pre);
        let cookie = format!("muster_console_signin={pre}");
        let r = self
            .post_form(
                "/console/sign-in",
                Some(&cookie),
                &[("csrf", &token), ("policy", policy), ("key", key)],
            )
            .await;
        (r, cookie)
    }

    async fn sign_in(&self, policy: &str, key: &str) -> User {
        let (r, _) = self.try_sign_in(policy, key).await;
        assert_eq!(r.status(), 303);
        assert_eq!(r.headers()["location"], "/console");
        let sc = set_cookie(&r, "muster_console").unwrap();
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/console"] {
            assert!(sc.contains(attr), "{sc}");
        }
        let cookie = format!("muster_console={}", cookie_value(&sc));
        let page = self.get("/console", Some(&cookie)).await;
        assert_eq!(page.status(), 200);
        let html = page.text().await.unwrap();
        assert!(html.contains("<h1>Overview</h1>"), "{html}");
        User {
            csrf: meta_csrf(&html),
            cookie,
        }
    }

    /// A service API token for the owner policy.
    fn owner_token(&self) -> String {
        let cs = ConnectionString::parse(&self.info.service_connection_string).unwrap();
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD
            .decode(&cs.key)
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        SasToken::generate(&cs.host_name, &key, Some(&cs.key_name), now + 600)
    }

    async fn api_get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}?api-version=2021-10-01", self.base))
            .header("authorization", self.owner_token())
            .send()
            .await
            .unwrap()
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn wrong_key_cannot_sign_in_and_sessions_end_at_sign_out() {
    let h = start().await;
    let (name, key) = owner(&h.info);

    // Unsigned: every page sends you to sign in.
    let r = h.get("/console", None).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/console/sign-in");

    // A wrong key (the secondary key of nothing, a truncated key, another policy's name).
    for (p, k) in [
        (
            name.as_str(),
            "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktMDA=",
        ),
        (name.as_str(), &key[..key.len() - 2]),
        ("nobody", key.as_str()),
        (name.as_str(), ""),
    ] {
        let (r, _) = h.try_sign_in(p, k).await;
        assert_eq!(r.status(), 401, "{p}");
        assert!(set_cookie(&r, "muster_console").is_none());
        let html = r.text().await.unwrap();
        assert!(
            html.contains("do not match a shared access policy"),
            "{html}"
        );
        // The name is kept, the key is not echoed.
        assert!(html.contains(&format!("value=\"{p}\"")));
        assert!(!html.contains(&key));
    }

    // The sign-in form itself needs its CSRF token.
    let (_, cookie) = h.try_sign_in(&name, &key).await;
    let r = h
        .post_form(
            "/console/sign-in",
            Some(&cookie),
            &[("policy", &name), ("key", &key)],
        )
        .await;
    assert_eq!(r.status(), 403);

    let user = h.sign_in(&name, &key).await;
    let r = h.get("/console", Some(&user.cookie)).await;
    assert_eq!(r.status(), 200);
    for (header, want) in [
        (
            "content-security-policy",
            "default-src 'self'; frame-ancestors 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
    ] {
        let got = r.headers()[header].to_str().unwrap();
        assert!(got.starts_with(want), "{header}: {got}");
    }
    let html = r.text().await.unwrap();
    assert!(html.contains(&h.info.id_scope));
    assert!(!html.contains(&key), "the key never reaches a page");

    // Sign-out without the token is refused and keeps the session.
    let r = h
        .post_form("/console/sign-out", Some(&user.cookie), &[])
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(h.get("/console", Some(&user.cookie)).await.status(), 200);

    let r = h
        .post_form(
            "/console/sign-out",
            Some(&user.cookie),
            &[("csrf", &user.csrf)],
        )
        .await;
    assert_eq!(r.status(), 303);
    let r = h.get("/console", Some(&user.cookie)).await;
    assert_eq!(r.status(), 303, "the old cookie no longer works");
    assert_eq!(r.headers()["location"], "/console/sign-in");
    h.server.shutdown().await;
}

#[tokio::test]
async fn posts_without_the_csrf_token_or_from_another_origin_are_refused() {
    let h = start().await;
    let (name, key) = owner(&h.info);
    let user = h.sign_in(&name, &key).await;
    let fields = |csrf: &'static str| {
        vec![
            ("csrf", csrf),
            ("kind", "groups"),
            ("id", "csrf-victim"),
            ("attestation", "symmetricKey"),
            ("auto_keys", "1"),
            ("allocation_policy", "hashed"),
            ("reprovision", "reprovisionAndMigrate"),
            ("enabled", "1"),
            ("initial_twin", "{}"),
        ]
    };
    // No token, a wrong token.
    for f in [fields(""), fields("bm90LXRoZS10b2tlbg")] {
        let f: Vec<(&str, &str)> = f.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        let r = h
            .post_form("/console/enrollments/new", Some(&user.cookie), &f)
            .await;
        assert_eq!(r.status(), 403);
        assert!(r.text().await.unwrap().contains("CSRF check failed"));
    }
    // The right token from another origin.
    let mut f = fields("x");
    f[0].1 = &user.csrf;
    let body: String = f
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&");
    let r = h
        .http
        .post(format!("{}/console/enrollments/new", h.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", &user.cookie)
        .header("origin", "https://evil.example")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        h.api_get("/enrollmentGroups/csrf-victim").await.status(),
        404,
        "nothing was created"
    );
    // The same form with the token is accepted.
    let r = h
        .http
        .post(format!("{}/console/enrollments/new", h.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", &user.cookie)
        .header("origin", &h.base)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        "/console/enrollments/groups/csrf-victim"
    );
    let created: Value = h
        .api_get("/enrollmentGroups/csrf-victim")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(created["attestation"]["type"], "symmetricKey");
    // Its details show the generated keys behind the reveal.
    let html = h
        .get(
            "/console/enrollments/groups/csrf-victim",
            Some(&user.cookie),
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("Created enrollment group &#39;csrf-victim&#39;."),
        "{html}"
    );
    let primary = between(&html, "<code id=\"primary-key\">", "</code>").unwrap();
    assert_eq!(primary.len(), 88, "64 random bytes, base64: {primary}");
    h.server.shutdown().await;
}

#[tokio::test]
async fn a_read_only_policy_cannot_create_and_failed_forms_keep_their_values() {
    let h = start().await;
    let (name, key) = owner(&h.info);
    // A read-only policy, created through the API.
    let r = h
        .http
        .put(format!(
            "{}/accessPolicies/reader?api-version=2021-10-01",
            h.base
        ))
        .header("authorization", h.owner_token())
        .json(&json!({"rights": "EnrollmentRead, RegistrationStatusRead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let reader_key = r.json::<Value>().await.unwrap()["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();

    let reader = h.sign_in("reader", &reader_key).await;
    let form = |csrf: &str, id: &str, twin: &str| -> Vec<(String, String)> {
        [
            ("csrf", csrf),
            ("kind", "groups"),
            ("id", id),
            ("attestation", "symmetricKey"),
            ("auto_keys", "1"),
            ("allocation_policy", "hashed"),
            ("reprovision", "reprovisionAndReset"),
            ("initial_twin", twin),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let post = |cookie: String, f: Vec<(String, String)>| {
        let h = &h;
        async move {
            let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            h.post_form("/console/enrollments/new", Some(&cookie), &f)
                .await
        }
    };
    let r = post(
        reader.cookie.clone(),
        form(&reader.csrf, "line-7", r#"{"tags":{"site":"lyon"}}"#),
    )
    .await;
    assert_eq!(r.status(), 403);
    let html = r.text().await.unwrap();
    assert!(
        html.contains(
            "does not have the EnrollmentWrite right this operation needs (error 403001)"
        ),
        "{html}"
    );
    assert!(html.contains("value=\"line-7\""), "the id is kept");
    assert!(
        html.contains("&quot;site&quot;:&quot;lyon&quot;") || html.contains("&#34;site&#34;"),
        "{html}"
    );
    assert!(html.contains("value=\"reprovisionAndReset\" selected"));
    // Reading works for the reader; the hub pages need ServiceConfig.
    let r = h.get("/console/enrollments", Some(&reader.cookie)).await;
    let status = r.status();
    let html = r.text().await.unwrap();
    assert_eq!(status, 200, "{html}");
    let r = h.get("/console/hub/devices", Some(&reader.cookie)).await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("ServiceConfig"));
    let r = h.get("/console/linked-hubs", Some(&reader.cookie)).await;
    assert_eq!(r.status(), 403);
    // Issued certificates: the reader lists them, but gets no revoke column and its revoke
    // is refused by the API's rights.
    let r = h.get("/console/certificates", Some(&reader.cookie)).await;
    let status = r.status();
    let html = r.text().await.unwrap();
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("<h1>Issued certificates</h1>"), "{html}");
    assert!(!html.contains("<th scope=\"col\">Revoke</th>"), "{html}");
    let r = h
        .post_form(
            "/console/certificates/ABCDEF/revoke",
            Some(&reader.cookie),
            &[("csrf", reader.csrf.as_str()), ("reason", "x")],
        )
        .await;
    let status = r.status();
    let html = r.text().await.unwrap();
    assert_eq!(status, 403, "{html}");
    assert!(html.contains("RegistrationStatusWrite"), "{html}");

    // The owner: a twin that is not JSON is caught before the API, a bad id by the API.
    let owner = h.sign_in(&name, &key).await;
    // A list page answers with the status of the API's refusal: a malformed group id is a 400.
    let r = h
        .get(
            "/console/registrations?group=bad%20group%21",
            Some(&owner.cookie),
        )
        .await;
    let status = r.status();
    let html = r.text().await.unwrap();
    assert_eq!(status, 400, "{html}");
    let r = post(
        owner.cookie.clone(),
        form(&owner.csrf, "line-8", r#"{"tags": {"site": "#),
    )
    .await;
    assert_eq!(r.status(), 400);
    let html = r.text().await.unwrap();
    assert!(
        html.contains("The initial twin is not valid JSON"),
        "{html}"
    );
    assert!(html.contains("value=\"line-8\""));
    assert!(
        html.contains("{&quot;tags&quot;: {&quot;site&quot;: ") || html.contains("{&#34;tags&#34;"),
        "{html}"
    );
    let r = post(owner.cookie.clone(), form(&owner.csrf, "bad id!", "{}")).await;
    assert_eq!(r.status(), 400);
    let html = r.text().await.unwrap();
    assert!(html.contains("(error 400003)"), "{html}");
    assert!(
        html.contains("aria-describedby=\"id-error\""),
        "shown at the id field"
    );
    assert!(html.contains("value=\"bad id!\""));
    assert_eq!(h.api_get("/enrollmentGroups/line-8").await.status(), 404);
    // The owner may revoke: the column is there; an unknown serial is the API's 404207.
    let r = h.get("/console/certificates", Some(&owner.cookie)).await;
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("<th scope=\"col\">Revoke</th>"));
    let r = h
        .post_form(
            "/console/certificates/ABCDEF/revoke",
            Some(&owner.cookie),
            &[("csrf", owner.csrf.as_str())],
        )
        .await;
    let status = r.status();
    let html = r.text().await.unwrap();
    assert_eq!(status, 404, "{html}");
    assert!(html.contains("404207"), "{html}");
    h.server.shutdown().await;
}

/// Delete with cascade removes devices from every linked hub, not only the built-in one: a
/// second server's hub, linked by connection string, loses the device the group put there.
#[tokio::test]
async fn cascade_delete_reaches_devices_on_other_linked_hubs() {
    let h = start().await;
    // A second server sharing the first one's CA, so the first one's engine trusts its hub.
    let dir_b = tempfile::tempdir().unwrap();
    let a_dir = h
        .info
        .ca_certificate
        .as_ref()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(a_dir.join(f), dir_b.path().join(f)).unwrap();
    }
    let b = Server::start(Config {
        data_dir: dir_b.path().to_path_buf(),
        dps_host: "127.0.0.1".into(),
        https_port: 0,
        mqtt_port: 0,
        amqp_port: 0,
        ..Config::default()
    })
    .await
    .unwrap();
    let hub_b = b.connection.hubs[0].clone();
    let api = |method: reqwest::Method, path: &str| {
        h.http
            .request(method, format!("{}{path}?api-version=2021-10-01", h.base))
            .header("authorization", h.owner_token())
    };
    let r = api(
        reqwest::Method::PUT,
        &format!("/linkedHubs/{}", hub_b.host_name),
    )
    .json(&json!({"connectionString": hub_b.connection_string}))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let r = api(reqwest::Method::PUT, "/enrollmentGroups/far-away")
        .json(&json!({
            "enrollmentGroupId": "far-away",
            "attestation": {"type": "symmetricKey"},
            "allocationPolicy": "hashed",
            "iotHubs": [hub_b.host_name],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let group: Value = r.json().await.unwrap();
    let group_key = group["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();

    // A device registers and lands on the second server's hub.
    let rid = "far-device";
    let device_key = muster_attestation::symmetric_key::derive_device_key(&group_key, rid).unwrap();
    use base64::Engine;
    let key_bytes = base64::engine::general_purpose::STANDARD
        .decode(device_key)
        .unwrap();
    let token = SasToken::generate(
        &format!("{}/registrations/{rid}", h.info.id_scope),
        &key_bytes,
        Some("registration"),
        4_000_000_000,
    );
    let r = h
        .http
        .put(format!(
            "https://{}/{}/registrations/{rid}/register?api-version=2021-06-01",
            h.info.device_endpoint, h.info.id_scope
        ))
        .header("authorization", token)
        .json(&json!({"registrationId": rid}))
        .send()
        .await
        .unwrap();
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["status"], "assigned", "{answer}");
    assert_eq!(answer["registrationState"]["assignedHub"], hub_b.host_name);
    let hub_device = || async {
        let cs = ConnectionString::parse(&hub_b.connection_string).unwrap();
        let key = base64::engine::general_purpose::STANDARD
            .decode(&cs.key)
            .unwrap();
        h.http
            .get(format!(
                "https://{}/devices/{rid}?api-version=2021-04-12",
                cs.host_name
            ))
            .header(
                "authorization",
                SasToken::generate(&cs.host_name, &key, Some(&cs.key_name), 4_000_000_000),
            )
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(hub_device().await, 200);

    // The console deletes the group with cascade: record and remote device are gone.
    let (name, key) = owner(&h.info);
    let user = h.sign_in(&name, &key).await;
    let r = h
        .post_form(
            "/console/enrollments/groups/far-away/delete",
            Some(&user.cookie),
            &[("csrf", &user.csrf), ("cascade", "1")],
        )
        .await;
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    assert_eq!(hub_device().await, 404, "the device left the far hub");
    let r = api(reqwest::Method::GET, &format!("/registrations/{rid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the record is gone");
    // The cascade is in the audit log: the device's deprovisioning and the group's deletion.
    let log: Value = h.api_get("/audit").await.json().await.unwrap();
    let by_console: Vec<Value> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["source"] == "console")
        .map(|e| json!([e["method"], e["route"], e["id"], e["status"]]))
        .collect();
    assert!(
        by_console.contains(&json!(["POST", "/deprovisions/{id}", rid, 200])),
        "{log}"
    );
    assert!(
        by_console.contains(&json!([
            "DELETE",
            "/enrollmentGroups/{id}",
            "far-away",
            204
        ])),
        "{log}"
    );
    b.shutdown().await;
    h.server.shutdown().await;
}

/// Guessing keys is slowed down: after ten wrong keys for one policy, even the right key gets
/// 429 with Retry-After for the rest of the minute; another policy is unaffected.
#[tokio::test]
async fn repeated_wrong_keys_lock_the_policy_for_a_while() {
    let h = start().await;
    let (name, key) = owner(&h.info);
    for _ in 0..10 {
        let (r, _) = h
            .try_sign_in(&name, "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktMDA=")
            .await;
        assert_eq!(r.status(), 401);
    }
    let (r, _) = h.try_sign_in(&name, &key).await;
    assert_eq!(r.status(), 429);
    let wait: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(set_cookie(&r, "muster_console").is_none());
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("Too many failed sign-ins for this policy"));

    // Another policy still signs in.
    let created = h
        .http
        .put(format!(
            "{}/accessPolicies/reader?api-version=2021-10-01",
            h.base
        ))
        .header("authorization", h.owner_token())
        .json(&json!({"rights": "EnrollmentRead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let body: Value = created.json().await.unwrap();
    let reader_key = body["primaryKey"].as_str().unwrap().to_string();
    h.sign_in("reader", &reader_key).await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn console_writes_are_audited_and_the_audit_page_and_live_view_render() {
    let h = start().await;
    let (name, key) = owner(&h.info);
    let user = h.sign_in(&name, &key).await;
    let r = h
        .post_form(
            "/console/enrollments/new",
            Some(&user.cookie),
            &[
                ("csrf", &user.csrf),
                ("kind", "groups"),
                ("id", "audited-line"),
                ("attestation", "symmetricKey"),
                ("auto_keys", "1"),
                ("allocation_policy", "hashed"),
                ("reprovision", "reprovisionAndReset"),
                ("initial_twin", ""),
            ],
        )
        .await;
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());

    // The API's log names the console and the signed-in policy.
    let log: Value = h.api_get("/audit").await.json().await.unwrap();
    let entry = log
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "audited-line")
        .unwrap_or_else(|| panic!("no entry for the group: {log}"));
    assert_eq!(entry["source"], "console");
    assert_eq!(entry["policy"], json!(name));
    assert_eq!(entry["route"], "/enrollmentGroups/{id}");
    assert_eq!(entry["method"], "PUT");

    // The page shows it, filtered by id.
    let page = h
        .get("/console/audit?id=audited-line", Some(&user.cookie))
        .await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("<h1>Audit log</h1>"), "{html}");
    assert!(html.contains("aria-current=\"page\">Audit log"), "{html}");
    let table = between(&html, "<table id=\"audit-entries\">", "</table>").unwrap();
    assert!(
        table.contains("<code>/enrollmentGroups/{id}</code>"),
        "{table}"
    );
    assert!(table.contains("<td>console</td>"), "{table}");
    let none = h
        .get("/console/audit?id=no-such-id", Some(&user.cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(none.contains("No audit entry matches."), "{none}");
    let bad = h.get("/console/audit?from=soon", Some(&user.cookie)).await;
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("RFC 3339"));
    assert_eq!(
        h.get("/console/audit", None).await.status(),
        303,
        "signed out: to the sign-in page"
    );

    // The overview's live view: a stream for the session, and words for browsers without JS.
    let overview = h
        .get("/console", Some(&user.cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(overview.contains("id=\"live-registrations\""), "{overview}");
    assert!(overview.contains("class=\"no-js\""), "{overview}");
    let stream = h
        .get("/console/events/registrations", Some(&user.cookie))
        .await;
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    drop(stream);
    assert_eq!(
        h.get("/console/events/registrations", None).await.status(),
        401
    );
    h.server.shutdown().await;
}

/// The hub device page reads telemetry through the hub's telemetry extension
/// (`GET /devices/{id}/telemetry`): a message the device posted over the hub's device HTTPS
/// API shows up there.
#[tokio::test]
async fn hub_device_page_shows_telemetry_posted_over_https() {
    use base64::Engine;
    let h = start().await;
    let hub = h.info.hubs[0].clone();
    let cs = ConnectionString::parse(&hub.connection_string).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let service = SasToken::generate(
        &cs.host_name,
        &b64.decode(&cs.key).unwrap(),
        Some(&cs.key_name),
        4_000_000_000,
    );
    let r = h
        .http
        .put(format!(
            "https://{}/devices/page-dev?api-version=2021-04-12",
            cs.host_name
        ))
        .header("authorization", &service)
        .json(&json!({"deviceId": "page-dev"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let device: Value = r.json().await.unwrap();
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    let host = cs.host_name.split(':').next().unwrap();
    let token = SasToken::generate(
        &format!("{host}/devices/page-dev"),
        &b64.decode(key).unwrap(),
        None,
        4_000_000_000,
    );
    let r = h
        .http
        .post(format!(
            "https://{}/devices/page-dev/messages/events?api-version=2021-04-12",
            cs.host_name
        ))
        .header("authorization", token)
        .body("wind-speed-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    let (name, owner_key) = owner(&h.info);
    let user = h.sign_in(&name, &owner_key).await;
    let r = h
        .get("/console/hub/devices/page-dev", Some(&user.cookie))
        .await;
    let status = r.status();
    let html = r.text().await.unwrap();
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("wind-speed-42"), "{html}");
}

/// A read-only policy's refused write is shown at the top of the page (above the heading),
/// its controls are disabled naming the right, a registration record it tries to delete
/// stays, and the signed-in owner cannot delete or re-key its own policy from its session.
#[tokio::test]
async fn refusals_show_at_the_top_and_read_only_controls_name_the_missing_right() {
    let h = start().await;
    let (name, key) = owner(&h.info);
    let put = |path: String, body: Value| {
        let h = &h;
        async move {
            let r = h
                .http
                .put(format!("{}{path}?api-version=2021-10-01", h.base))
                .header("authorization", h.owner_token())
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let reader_key = put(
        "/accessPolicies/reader".into(),
        json!({"rights": "EnrollmentRead, RegistrationStatusRead"}),
    )
    .await["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    put(
        "/enrollmentGroups/line-9".into(),
        json!({"enrollmentGroupId": "line-9", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let reader = h.sign_in("reader", &reader_key).await;

    // The details page: Save, Disable and Delete disabled, naming EnrollmentWrite.
    let html = h
        .get("/console/enrollments/groups/line-9", Some(&reader.cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("disabled title=\"needs EnrollmentWrite\" aria-describedby=\"write-needs\">Save settings"),
        "{html}"
    );
    assert!(html.contains("Changing this enrollment group needs EnrollmentWrite"));
    assert!(html.contains("0 registration records and 0 devices in their IoT hubs"));

    // Posted anyway: 403, and the refusal is the first thing in <main>.
    let r = h
        .post_form(
            "/console/enrollments/groups/line-9/status",
            Some(&reader.cookie),
            &[("csrf", &reader.csrf), ("status", "disabled")],
        )
        .await;
    assert_eq!(r.status(), 403);
    let html = r.text().await.unwrap();
    let denied = html.find("id=\"denied\"").expect("the refusal banner");
    assert!(denied < html.find("<h1>").unwrap(), "above the heading");
    assert!(html[denied..].contains("EnrollmentWrite"), "{html}");

    // Deleting a registration record needs RegistrationStatusWrite: refused, nothing goes.
    let r = h
        .post_form(
            "/console/registrations/dev-1/delete",
            Some(&reader.cookie),
            &[
                ("csrf", &reader.csrf),
                ("device", "1"),
                ("back", "https://evil.example/"),
            ],
        )
        .await;
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        "/console/registrations",
        "no off-site return"
    );
    let html = h
        .get("/console/registrations", Some(&reader.cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains("RegistrationStatusWrite"), "{html}");
    assert!(html.contains("Deleting records needs RegistrationStatusWrite"));

    // The owner's session can't delete or re-key the owner policy it signs with.
    let owner_user = h.sign_in(&name, &key).await;
    for action in ["delete", "regenerate"] {
        let r = h
            .post_form(
                &format!("/console/access-policies/{name}"),
                Some(&owner_user.cookie),
                &[
                    ("csrf", &owner_user.csrf),
                    ("action", action),
                    ("key", "primary"),
                ],
            )
            .await;
        assert_eq!(r.status(), 409, "{action}");
        assert!(r.text().await.unwrap().contains("you are signed in with"));
    }
    let r = h.api_get(&format!("/accessPolicies/{name}")).await;
    assert_eq!(r.status(), 200, "the owner policy is still there");
    h.server.shutdown().await;
}
