//! The JSON wire models (`muster_proto` and the hub's device and twin models): any bytes
//! either fail to parse or parse into a value whose JSON form reads back to the same JSON
//! form (the hub's device and twin inputs, which are only read, are parsed with their checks) (what Muster writes, Muster and the SDKs can read). The first byte picks the model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned>(bytes: &[u8]) {
    let Ok(value) = serde_json::from_slice::<T>(bytes) else {
        return;
    };
    let first = serde_json::to_string(&value).expect("a parsed model serializes");
    let again: T = serde_json::from_str(&first).unwrap_or_else(|e| {
        panic!(
            "{} does not read back ({e}): {first}",
            std::any::type_name::<T>()
        )
    });
    let second = serde_json::to_string(&again).expect("a parsed model serializes");
    assert_eq!(first, second, "{}", std::any::type_name::<T>());
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    use muster_proto::*;
    match which % 16 {
        0 => round_trip::<device::DeviceRegistration>(json),
        1 => round_trip::<IndividualEnrollment>(json),
        2 => round_trip::<EnrollmentGroup>(json),
        3 => round_trip::<DeviceRegistrationState>(json),
        4 => round_trip::<BulkEnrollmentOperation>(json),
        5 => round_trip::<BulkEnrollmentGroupOperation>(json),
        6 => round_trip::<QuerySpecification>(json),
        7 => round_trip::<AttestationMechanism>(json),
        8 => round_trip::<InitialTwin>(json),
        9 => round_trip::<ErrorBody>(json),
        10 => round_trip::<device::RegistrationOperationStatus>(json),
        11 => round_trip::<linked_hub::LinkedHubRequest>(json),
        // The hub reads these two from a JSON value with its own checks; they are not written.
        12 => {
            if let Ok(v) = serde_json::from_slice(json) {
                let _ = muster_hub::DeviceInput::from_json(v);
            }
        }
        13 => round_trip::<muster_hub::Twin>(json),
        14 => {
            if let Ok(v) = serde_json::from_slice(json) {
                let _ = muster_hub::TwinUpdate::from_json(&v);
            }
        }
        _ => round_trip::<muster_hub::Device>(json),
    }
});
