//! `HostName=..;SharedAccessKeyName=..;SharedAccessKey=..` (DPS) and the same form for hubs.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    pub host_name: String,
    pub key_name: String,
    /// Base64 key; never printed by `Debug` of higher-level types.
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connection string has no {0}")]
pub struct ConnectionStringError(&'static str);

impl ConnectionString {
    /// Keys are matched case-insensitively, as Python and the CLI do.
    pub fn parse(s: &str) -> Result<Self, ConnectionStringError> {
        let (mut host, mut name, mut key) = (None, None, None);
        for part in s.split(';') {
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "hostname" => host = Some(v.trim().to_string()),
                "sharedaccesskeyname" => name = Some(v.trim().to_string()),
                "sharedaccesskey" => key = Some(v.trim().to_string()),
                _ => {}
            }
        }
        Ok(Self {
            host_name: host
                .filter(|h| !h.is_empty())
                .ok_or(ConnectionStringError("HostName"))?,
            key_name: name
                .filter(|n| !n.is_empty())
                .ok_or(ConnectionStringError("SharedAccessKeyName"))?,
            key: key
                .filter(|k| !k.is_empty())
                .ok_or(ConnectionStringError("SharedAccessKey"))?,
        })
    }
}

impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
            self.host_name, self.key_name, self.key
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = "HostName=127.0.0.2;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=a2V5+/=";
        let c = ConnectionString::parse(s).unwrap();
        assert_eq!(c.key, "a2V5+/=");
        assert_eq!(c.to_string(), s);
        assert!(ConnectionString::parse("hostname=h;sharedaccesskeyname=n").is_err());
    }
}
