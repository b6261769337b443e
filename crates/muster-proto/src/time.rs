//! [`Timestamp`]: a UTC instant written the way DPS writes it (`2023-05-19T23:10:45.1256254Z`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    pub fn from_unix_millis(ms: i64) -> Option<Self> {
        DateTime::from_timestamp_millis(ms).map(Self)
    }

    pub fn unix_seconds(&self) -> i64 {
        self.0.timestamp()
    }

    /// DPS form: seconds with 7 fractional digits (100 ns ticks, as .NET prints them).
    pub fn to_dps_string(&self) -> String {
        use chrono::{Datelike, Timelike};
        let t = &self.0;
        let nanos = t.timestamp_subsec_nanos();
        // Every record, hub device and twin carries several of these, so the common case
        // writes the digits straight into a buffer rather than through `format!` (let alone a
        // strftime pattern parsed per call). Years outside 0..=9999 and leap seconds keep
        // chrono's own rendering.
        let Ok(year) = u32::try_from(t.year()) else {
            return Self::to_dps_string_slow(t, nanos);
        };
        if year > 9999 || nanos >= 1_000_000_000 {
            return Self::to_dps_string_slow(t, nanos);
        }
        // YYYY-MM-DDTHH:MM:SS.fffffffZ
        let mut b = *b"0000-00-00T00:00:00.0000000Z";
        let mut put = |at: usize, width: usize, mut n: u32| {
            for i in (at..at + width).rev() {
                if let Some(d) = b.get_mut(i) {
                    *d = b'0' + (n % 10) as u8;
                }
                n /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, t.month());
        put(8, 2, t.day());
        put(11, 2, t.hour());
        put(14, 2, t.minute());
        put(17, 2, t.second());
        put(20, 7, nanos / 100);
        b.iter().map(|&c| char::from(c)).collect()
    }

    fn to_dps_string_slow(t: &DateTime<Utc>, nanos: u32) -> String {
        let ticks = nanos / 100;
        format!("{}.{ticks:07}Z", t.format("%Y-%m-%dT%H:%M:%S"))
    }

    /// Whole seconds, as X.509 validity dates appear in certificate info.
    pub fn to_seconds_string(&self) -> String {
        self.0.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_dps_string())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| Self(t.with_timezone(&Utc)))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The fast rendering is the strftime one, for any instant chrono can hold.
        #[test]
        fn dps_format_is_the_strftime_format(secs in -62_000_000_000i64..250_000_000_000, nanos in 0u32..1_000_000_000) {
            let t = Timestamp(DateTime::from_timestamp(secs, nanos).unwrap());
            let strftime = format!("{}.{:07}Z", t.0.format("%Y-%m-%dT%H:%M:%S"), nanos / 100);
            proptest::prop_assert_eq!(t.to_dps_string(), strftime);
        }
    }

    #[test]
    fn dps_format_round_trips() {
        let t = Timestamp(
            DateTime::parse_from_rfc3339("2023-05-19T23:10:45.1256254Z")
                .unwrap()
                .with_timezone(&Utc),
        );
        assert_eq!(t.to_dps_string(), "2023-05-19T23:10:45.1256254Z");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        assert_eq!(t.to_seconds_string(), "2023-05-19T23:10:45Z");
    }
}
