//! Property tests for the wire parsers: SAS tokens, ids, connection strings, If-Match and the
//! JSON models. Each property runs a limited number of cases so the suite stays in seconds;
//! the fuzz targets in `fuzz/` explore the same parsers for longer.

use muster_proto::attestation::AttestationType;
use muster_proto::{
    AllocationPolicy, AttestationMechanism, ConnectionString, EnrollmentGroupId, IdScope, IfMatch,
    IndividualEnrollment, InitialTwin, InitialTwinProperties, ProvisioningStatus,
    QuerySpecification, RegistrationId, ReprovisionPolicy, SasError, SasToken,
};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Valid ids by construction: an alphanumeric first character, then the allowed characters,
/// ending in an alphanumeric or `-`.
fn valid_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]([A-Za-z0-9._:-]{0,125}[A-Za-z0-9-])?"
}

/// The DPS id rule, stated independently of `muster_proto::ids`.
fn follows_id_rule(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-._:".contains(c))
        && b[0].is_ascii_alphanumeric()
        && (b[b.len() - 1].is_ascii_alphanumeric() || b[b.len() - 1] == b'-')
}

/// JSON values a few levels deep, with the scalars JSON has (floats that print exactly).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1000i32..1000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("[a-zA-Z_]{1,8}", json_value(), 0..4)
        .prop_map(|m| m.into_iter().collect())
}

fn enrollment() -> impl Strategy<Value = IndividualEnrollment> {
    (
        valid_id(),
        "[A-Za-z0-9+/]{43}=",
        prop::option::of(prop::collection::vec("[a-z]{1,10}\\.hub\\.test", 0..3)),
        prop::option::of(prop_oneof![
            Just(AllocationPolicy::Hashed),
            Just(AllocationPolicy::GeoLatency),
            Just(AllocationPolicy::Static),
            Just(AllocationPolicy::Custom),
        ]),
        prop::option::of(prop_oneof![
            Just(ProvisioningStatus::Enabled),
            Just(ProvisioningStatus::Disabled),
        ]),
        prop::option::of((json_object(), prop::option::of(json_object()))),
        prop::option::of((any::<bool>(), any::<bool>())),
        // `Some(null)` and `None` are the same JSON (an absent field), so no top-level null.
        prop::option::of(json_value().prop_filter("not null", |v| !v.is_null())),
    )
        .prop_map(|(id, key, hubs, policy, status, twin, reprovision, info)| {
            IndividualEnrollment {
                registration_id: RegistrationId::new(id).expect("valid by construction"),
                device_id: None,
                registration_state: None,
                optional_device_information: info,
                attestation: AttestationMechanism::symmetric_key(key.clone(), key),
                capabilities: None,
                iot_hub_host_name: None,
                initial_twin: twin.map(|(tags, desired)| InitialTwin {
                    tags: Some(tags),
                    properties: Some(InitialTwinProperties { desired }),
                }),
                etag: None,
                provisioning_status: status,
                reprovision_policy: reprovision.map(|(update, migrate)| ReprovisionPolicy {
                    update_hub_assignment: update,
                    migrate_device_data: migrate,
                }),
                created_date_time_utc: None,
                last_updated_date_time_utc: None,
                allocation_policy: policy,
                iot_hubs: hubs,
                custom_allocation_definition: None,
                certificate_issuance: None,
            }
        })
}

proptest! {
    #![proptest_config(config())]

    /// sign → parse → verify: a generated token parses back to its resource, expiry and policy
    /// name, verifies under its key until it expires, and not under another key.
    #[test]
    fn sas_generate_parse_verify(
        resource in ".{0,40}",
        key in prop::collection::vec(any::<u8>(), 0..64),
        other_key in prop::collection::vec(any::<u8>(), 1..64),
        key_name in prop::option::of("[ -~]{0,20}"),
        expiry in 1i64..4_000_000_000,
    ) {
        let token = SasToken::generate(&resource, &key, key_name.as_deref(), expiry);
        let parsed = SasToken::parse(&token).expect("a generated token parses");
        prop_assert_eq!(&parsed.resource, &resource);
        prop_assert_eq!(parsed.expiry, expiry);
        prop_assert_eq!(parsed.key_name.as_deref(), key_name.as_deref().filter(|n| !n.is_empty()));
        prop_assert_eq!(parsed.verify(&key, expiry - 1), Ok(()));
        prop_assert_eq!(parsed.verify(&key, expiry), Err(SasError::Expired { expiry }));
        if other_key != key {
            prop_assert_eq!(parsed.verify(&other_key, expiry - 1), Err(SasError::BadSignature));
        }
    }

    /// Any text: parsing and verifying never panic, and what is not a SAS token says so.
    #[test]
    fn sas_parse_never_panics(text in ".{0,200}", now in any::<i64>()) {
        match SasToken::parse(&text) {
            Ok(t) => {
                let _ = t.verify(b"key", now);
                let _ = t.resource_without_scheme();
            }
            Err(e) => {
                if !text.trim().starts_with("SharedAccessSignature ") {
                    prop_assert_eq!(e, SasError::NotSas);
                }
            }
        }
    }

    /// Ids built to the rule are accepted, keep their spelling and read back from JSON.
    #[test]
    fn valid_ids_accepted(id in valid_id()) {
        let reg = RegistrationId::new(id.clone()).expect("valid by construction");
        prop_assert_eq!(reg.as_str(), id.as_str());
        prop_assert_eq!(reg.key(), id.to_ascii_lowercase());
        let json = serde_json::to_string(&reg).unwrap();
        prop_assert_eq!(serde_json::from_str::<RegistrationId>(&json).unwrap(), reg);
        prop_assert!(EnrollmentGroupId::new(id).is_ok());
    }

    /// Any text is accepted as an id exactly when it follows the rule (mostly near-misses:
    /// allowed characters in every position plus a few that are not).
    #[test]
    fn ids_valid_iff_rule(text in prop_oneof!["[A-Za-z0-9._:\\- /é$]{0,130}", ".{0,20}"]) {
        prop_assert_eq!(RegistrationId::new(text.clone()).is_ok(), follows_id_rule(&text), "{:?}", text);
        prop_assert_eq!(EnrollmentGroupId::new(text.clone()).is_ok(), follows_id_rule(&text));
        let json = serde_json::to_string(&text).unwrap();
        prop_assert_eq!(serde_json::from_str::<RegistrationId>(&json).is_ok(), follows_id_rule(&text));
    }

    /// ID scopes: 3 to 64 ASCII letters and digits.
    #[test]
    fn id_scope_rule(text in prop_oneof!["[A-Za-z0-9]{0,70}", ".{0,10}"]) {
        let rule = (3..=64).contains(&text.len()) && text.bytes().all(|c| c.is_ascii_alphanumeric());
        prop_assert_eq!(IdScope::new(text.clone()).is_ok(), rule, "{:?}", text);
    }

    /// format → parse: any host, policy and key without the separators print and read back.
    #[test]
    fn connection_string_round_trip(
        host in "[A-Za-z0-9.:-]{1,30}",
        name in "[A-Za-z0-9_-]{1,20}",
        key in "[A-Za-z0-9+/]{1,44}={0,2}",
    ) {
        let cs = ConnectionString { host_name: host, key_name: name, key };
        prop_assert_eq!(ConnectionString::parse(&cs.to_string()), Ok(cs));
    }

    /// Any text: parsing never panics; what parses prints back to the same value.
    #[test]
    fn connection_string_any_text(text in prop_oneof![
        ".{0,80}",
        "((HostName|SharedAccessKeyName|SharedAccessKey|x)=[^;]{0,8};?){0,5}",
    ]) {
        if let Ok(cs) = ConnectionString::parse(&text) {
            prop_assert_eq!(ConnectionString::parse(&cs.to_string()), Ok(cs));
        }
    }

    /// If-Match: every client form of the same etag means the same thing.
    #[test]
    fn if_match_client_forms(etag in "[A-Za-z0-9+/=]{1,24}") {
        let want = IfMatch::Etag(etag.clone());
        for form in [etag.clone(), format!("\"{etag}\""), format!("W/\"{etag}\""), format!(" {etag} ")] {
            prop_assert_eq!(IfMatch::parse(&form), want.clone());
        }
        prop_assert!(IfMatch::parse(&etag).matches(&etag));
    }

    /// serialize → deserialize gives the same enrollment, and its JSON form is stable.
    #[test]
    fn enrollment_json_round_trip(e in enrollment()) {
        let json = serde_json::to_string(&e).unwrap();
        let back: IndividualEnrollment = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(serde_json::to_string(&back).unwrap(), json);
        prop_assert_eq!(back, e);
    }

    /// A query specification round-trips.
    #[test]
    fn query_spec_round_trip(query in ".{0,40}") {
        let spec = QuerySpecification { query };
        let back: QuerySpecification = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        prop_assert_eq!(back, spec);
    }

    /// Arbitrary bytes into the enrollment models: an error or a value, never a panic; what
    /// parses re-serializes to JSON that parses to the same value.
    #[test]
    fn models_from_any_json(v in json_value(), kind in any::<bool>()) {
        let text = serde_json::to_string(&v).unwrap();
        if let Ok(e) = serde_json::from_str::<IndividualEnrollment>(&text) {
            let again: IndividualEnrollment = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
            prop_assert_eq!(again, e);
        }
        if kind {
            let _ = serde_json::from_str::<AttestationMechanism>(&text);
            let _ = serde_json::from_str::<AttestationType>(&text);
        }
    }
}
