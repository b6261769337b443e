//! `If-Match`, as the DPS and IoT Hub clients send it: bare (Python, Node, CLI), quoted (C#),
//! weak (`W/"..."`), or `*`.

/// A normalised `If-Match`: one pair of quotes and a `W/` prefix removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    None,
    Any,
    Etag(String),
}

impl IfMatch {
    /// From the header's value, if the request had one.
    pub fn from_header(value: Option<&str>) -> Self {
        match value {
            Some(v) => Self::parse(v),
            None => IfMatch::None,
        }
    }

    pub fn parse(v: &str) -> Self {
        let v = v.trim();
        if v.is_empty() {
            return IfMatch::None;
        }
        // `W/` marks a weak etag only before a quoted one (RFC 9110): a bare etag may itself
        // start with `W/` (base64 has `/`), and must keep it.
        let v = match v.strip_prefix("W/") {
            Some(rest) if rest.starts_with('"') => rest,
            _ => v,
        };
        let v = v
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(v);
        if v == "*" {
            IfMatch::Any
        } else {
            IfMatch::Etag(v.to_string())
        }
    }

    /// `None` and `*` match anything; an etag matches itself.
    pub fn matches(&self, etag: &str) -> bool {
        match self {
            IfMatch::None | IfMatch::Any => true,
            IfMatch::Etag(e) => e == etag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_form() {
        assert_eq!(IfMatch::from_header(None), IfMatch::None);
        assert_eq!(IfMatch::parse(""), IfMatch::None);
        assert_eq!(IfMatch::parse("\"*\""), IfMatch::Any);
        assert_eq!(IfMatch::parse("*"), IfMatch::Any);
        assert_eq!(IfMatch::parse("\"abc=\""), IfMatch::Etag("abc=".into()));
        assert_eq!(IfMatch::parse("W/\"abc=\""), IfMatch::Etag("abc=".into()));
        assert_eq!(IfMatch::parse("W/"), IfMatch::Etag("W/".into()));
        assert_eq!(IfMatch::parse("W/abc"), IfMatch::Etag("W/abc".into()));
        assert_eq!(IfMatch::parse("abc="), IfMatch::Etag("abc=".into()));
        assert!(IfMatch::Any.matches("x") && !IfMatch::Etag("y".into()).matches("x"));
    }
}
