//! SAS tokens (`muster_proto::sas`): parsing any text never panics, a parsed token verifies
//! without panicking, and a token generated for any resource, key and policy name parses back
//! to the same resource and verifies under that key (and not after expiry).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use muster_proto::SasToken;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    text: &'a str,
    resource: &'a str,
    key: &'a [u8],
    key_name: Option<&'a str>,
    expiry: i64,
    now: i64,
}

fuzz_target!(|input: Input<'_>| {
    if let Ok(token) = SasToken::parse(input.text) {
        let _ = token.resource_without_scheme();
        let _ = token.verify(input.key, input.now);
    }

    let made = SasToken::generate(input.resource, input.key, input.key_name, input.expiry);
    let token = SasToken::parse(&made).expect("a generated token parses");
    assert_eq!(
        token.resource, input.resource,
        "resource round-trip of {made:?}"
    );
    assert_eq!(token.expiry, input.expiry);
    assert_eq!(
        token.key_name.as_deref(),
        input.key_name.filter(|n| !n.is_empty())
    );
    if input.expiry > i64::MIN {
        assert_eq!(
            token.verify(input.key, input.expiry - 1),
            Ok(()),
            "{made:?}"
        );
    }
    assert!(token.verify(input.key, input.expiry).is_err());
});
