//! Connection strings (`muster_proto::connection_string`): parsing never panics, and what
//! parses prints back to a string that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use muster_proto::ConnectionString;

fuzz_target!(|text: &str| {
    if let Ok(parsed) = ConnectionString::parse(text) {
        let printed = parsed.to_string();
        assert_eq!(
            ConnectionString::parse(&printed).as_ref(),
            Ok(&parsed),
            "{printed:?}"
        );
    }
});
