//! Link addresses and SASL identities of DPS registration over AMQP (device-protocol.md §5.2,
//! §5.3): `{idScope}/registrations/{registrationId}`, which C prefixes with
//! `amqps://{host}/`.

/// The device a registration link or SASL PLAIN identity names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationAddress {
    pub id_scope: String,
    pub registration_id: String,
}

impl RegistrationAddress {
    /// Parses `[amqps://{host}/]{idScope}/registrations/{registrationId}`; `None` for anything
    /// else (an empty part, more path segments, another keyword).
    pub fn parse(address: &str) -> Option<Self> {
        let path = match address.strip_prefix("amqps://") {
            Some(rest) => rest.split_once('/')?.1,
            None => address.strip_prefix('/').unwrap_or(address),
        };
        let mut parts = path.split('/');
        let (Some(scope), Some(keyword), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if scope.is_empty() || id.is_empty() || !keyword.eq_ignore_ascii_case("registrations") {
            return None;
        }
        Some(Self {
            id_scope: scope.to_string(),
            registration_id: id.to_string(),
        })
    }

    /// Whether `other` names the same device (ID scopes and registration ids are
    /// case-insensitive).
    pub fn same_device(&self, other: &Self) -> bool {
        self.id_scope.eq_ignore_ascii_case(&other.id_scope)
            && self
                .registration_id
                .eq_ignore_ascii_case(&other.registration_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_address_forms_name_the_device() {
        let short = RegistrationAddress::parse("0ne00000A0A/registrations/dev-1").unwrap();
        assert_eq!(short.id_scope, "0ne00000A0A");
        assert_eq!(short.registration_id, "dev-1");
        let full =
            RegistrationAddress::parse("amqps://dps.local:5671/0ne00000A0A/registrations/DEV-1")
                .unwrap();
        assert!(full.same_device(&short));
        assert!(
            !RegistrationAddress::parse("0ne00000A0A/registrations/dev-2")
                .unwrap()
                .same_device(&short)
        );
    }

    #[test]
    fn other_addresses_are_refused() {
        for bad in [
            "",
            "$cbs",
            "0ne1/registrations/",
            "/registrations/dev-1",
            "0ne1/devices/dev-1",
            "0ne1/registrations/dev-1/extra",
            "amqps://host-only",
            "hub.local/devices/dev-1/messages/events",
        ] {
            assert_eq!(RegistrationAddress::parse(bad), None, "{bad}");
        }
    }
}
