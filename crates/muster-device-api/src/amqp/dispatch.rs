//! One AMQP port, two services: the DPS (registration) and, later, the built-in hub's device
//! endpoint. As on MQTT (`crate::mqtt::dispatch`), what the device presents first decides:
//! the SASL PLAIN identity when there is one (`{idScope}/registrations/{id}` is the DPS; a hub
//! device signs in as `{deviceId}@sas.{hub}`), else the first link's address
//! (`{idScope}/registrations/{id}` for the DPS; `$cbs` or `/devices/...` for a hub).

use super::address::RegistrationAddress;
use super::sasl::SaslIdentity;

/// Who serves a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Dps,
    Hub,
}

impl Destination {
    pub fn of(sasl: &SaslIdentity, first_link_address: Option<&str>) -> Self {
        if let SaslIdentity::Plain { authcid, .. } = sasl {
            return if RegistrationAddress::parse(authcid).is_some() {
                Destination::Dps
            } else {
                Destination::Hub
            };
        }
        match first_link_address {
            Some(a) if RegistrationAddress::parse(a).is_some() => Destination::Dps,
            Some(_) => Destination::Hub,
            // No address at all: let the DPS session refuse the link with a reason.
            None => Destination::Dps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(authcid: &str) -> SaslIdentity {
        SaslIdentity::Plain {
            authcid: authcid.into(),
            password: "SharedAccessSignature sr=x".into(),
        }
    }

    #[test]
    fn routes_by_sasl_identity_then_link_address() {
        let dps = Some("0ne1/registrations/dev-1");
        assert_eq!(
            Destination::of(&plain("0ne1/registrations/dev-1"), dps),
            Destination::Dps
        );
        assert_eq!(
            Destination::of(&plain("dev-1@sas.hub.local"), Some("$cbs")),
            Destination::Hub
        );
        assert_eq!(Destination::of(&SaslIdentity::None, dps), Destination::Dps);
        assert_eq!(
            Destination::of(
                &SaslIdentity::None,
                Some("amqps://dps.local/0ne1/registrations/dev-1")
            ),
            Destination::Dps
        );
        assert_eq!(
            Destination::of(&SaslIdentity::Anonymous, Some("$cbs")),
            Destination::Hub
        );
        assert_eq!(
            Destination::of(&SaslIdentity::None, Some("/devices/dev-1/messages/events")),
            Destination::Hub
        );
    }
}
