//! `str_enum!`: string enums that serialize with DPS's exact spelling and parse
//! case-insensitively (clients send `geolatency`, `updateIfMatchEtag`, ...), with an error that
//! lists the accepted values.

#[macro_export]
#[doc(hidden)]
macro_rules! str_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Case-insensitive parse; the error names the accepted spellings.
            pub fn parse(s: &str) -> Result<Self, String> {
                $(if s.eq_ignore_ascii_case($text) { return Ok($name::$variant); })+
                Err(format!(
                    "unknown {} {:?}; expected one of: {}",
                    $what,
                    s,
                    [$($text),+].join(", ")
                ))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::parse(&s).map_err(serde::de::Error::custom)
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $name::parse(s)
            }
        }
    };
}
