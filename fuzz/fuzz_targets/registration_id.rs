//! Registration ids, enrollment group ids and ID scopes (`muster_proto::ids`): validation
//! never panics and accepts exactly the DPS rule, checked against an independent statement
//! of it: 1 to 128 characters of ASCII letters, digits and `- . _ :`, starting with a letter
//! or digit and ending with a letter, digit or `-`; ID scopes: 3 to 64 ASCII letters and digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use muster_proto::{EnrollmentGroupId, IdScope, RegistrationId};

fn follows_rule(s: &str) -> bool {
    let b = s.as_bytes();
    let allowed = |c: &u8| c.is_ascii_alphanumeric() || b"-._:".contains(c);
    !b.is_empty()
        && b.len() <= 128
        && b.iter().all(allowed)
        && b[0].is_ascii_alphanumeric()
        && (b[b.len() - 1].is_ascii_alphanumeric() || b[b.len() - 1] == b'-')
}

fuzz_target!(|text: &str| {
    let expected = follows_rule(text);
    let reg = RegistrationId::new(text);
    assert_eq!(reg.is_ok(), expected, "registration id {text:?}: {reg:?}");
    assert_eq!(EnrollmentGroupId::new(text).is_ok(), expected);
    if let Ok(id) = reg {
        assert_eq!(id.as_str(), text);
        assert_eq!(id.key(), text.to_ascii_lowercase());
        // The JSON form is the id itself, and it reads back.
        let json = serde_json::to_string(&id).expect("an id serializes");
        let back: RegistrationId = serde_json::from_str(&json).expect("an id reads back");
        assert_eq!(back, id);
    } else {
        let json = serde_json::to_string(text).expect("a string serializes");
        assert!(serde_json::from_str::<RegistrationId>(&json).is_err());
    }
    let scope_rule =
        (3..=64).contains(&text.len()) && text.bytes().all(|c| c.is_ascii_alphanumeric());
    assert_eq!(IdScope::new(text).is_ok(), scope_rule, "ID scope {text:?}");
});
