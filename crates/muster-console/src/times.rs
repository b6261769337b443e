//! How pages show a timestamp: relative ("3 minutes ago") with the exact UTC time (whole
//! seconds, never 7 fractional digits) for the hover title and `<time datetime>`, and "never"
//! for DPS's zero time `0001-01-01T00:00:00Z`.

use muster_proto::time::Timestamp;

/// A timestamp as a page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    /// "3 minutes ago", "in 2 hours", "never", or the text as given when it is not a time.
    pub relative: String,
    /// "2026-12-03 20:47:15 UTC" ("" for never or not a time).
    pub exact: String,
    /// The `datetime` attribute: RFC 3339 with whole seconds ("" for never or not a time).
    pub machine: String,
}

fn parse(text: &str) -> Option<Timestamp> {
    serde_json::from_value(serde_json::Value::String(text.trim().to_string())).ok()
}

/// `text` (RFC 3339, as the APIs write it) relative to `now` (unix seconds).
pub fn show(text: &str, now: i64) -> Shown {
    let text = text.trim();
    if text.is_empty() {
        return Shown {
            relative: String::new(),
            exact: String::new(),
            machine: String::new(),
        };
    }
    let Some(t) = parse(text) else {
        return Shown {
            relative: text.to_string(),
            exact: String::new(),
            machine: String::new(),
        };
    };
    // DPS writes year 1 for "never happened".
    if t.unix_seconds() <= -62_135_596_800 + 86_400 {
        return Shown {
            relative: "never".into(),
            exact: String::new(),
            machine: String::new(),
        };
    }
    Shown {
        relative: relative(now - t.unix_seconds()),
        exact: t.0.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        machine: t.to_seconds_string(),
    }
}

/// "just now", "5 seconds ago", "3 minutes ago", "in 2 hours", ... for an age in seconds.
fn relative(age: i64) -> String {
    let future = age < 0;
    let s = age.unsigned_abs();
    if s < 5 {
        return "just now".into();
    }
    // Rounded to the nearest unit: 47 hours 59 minutes reads "2 days", not "1 day".
    let (size, unit) = match s {
        0..=59 => (1, "second"),
        60..=3_599 => (60, "minute"),
        3_600..=86_399 => (3_600, "hour"),
        86_400..=2_591_999 => (86_400, "day"),
        2_592_000..=31_535_999 => (2_592_000, "month"),
        _ => (31_536_000, "year"),
    };
    let n = (s + size / 2) / size;
    let plural = if n == 1 { "" } else { "s" };
    if future {
        format!("in {n} {unit}{plural}")
    } else {
        format!("{n} {unit}{plural} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_793_635; // 2025-12-03T20:27:15Z

    #[test]
    fn relative_with_exact_seconds() {
        let s = show("2025-12-03T20:24:15.1256254Z", NOW);
        assert_eq!(s.relative, "3 minutes ago");
        assert_eq!(s.exact, "2025-12-03 20:24:15 UTC");
        assert_eq!(s.machine, "2025-12-03T20:24:15Z");
        assert_eq!(show("2025-12-03T20:27:14Z", NOW).relative, "just now");
        assert_eq!(show("2025-12-03T19:27:15Z", NOW).relative, "1 hour ago");
        assert_eq!(show("2025-11-30T20:27:15Z", NOW).relative, "3 days ago");
        assert_eq!(show("2025-12-03T22:27:15Z", NOW).relative, "in 2 hours");
        assert_eq!(
            show("2025-12-05T20:27:00Z", NOW).relative,
            "in 2 days",
            "rounded"
        );
    }

    #[test]
    fn zero_time_is_never_and_junk_is_kept() {
        let s = show("0001-01-01T00:00:00Z", NOW);
        assert_eq!((s.relative.as_str(), s.exact.as_str()), ("never", ""));
        assert_eq!(show("", NOW).relative, "");
        assert_eq!(show("soon", NOW).relative, "soon");
    }
}
