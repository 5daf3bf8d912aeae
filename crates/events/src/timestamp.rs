//! Event timestamps as Python writes them.
//!
//! Python services emit both naive (`datetime.utcnow().isoformat()`, no offset, meaning UTC) and aware
//! (`…+00:00`, `…Z`) timestamps. We accept both, keep the exact original text so a re-serialised event is
//! byte-identical, and write new timestamps in the aware `+00:00` form, which every Python version's
//! `datetime.fromisoformat` accepts (`Z` only from 3.11 on).

use std::fmt;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timestamp {
    instant: DateTime<Utc>,
    text: String,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::from_instant(Utc::now())
    }

    pub fn from_instant(instant: DateTime<Utc>) -> Self {
        // Python datetimes carry microseconds: keep the instant exactly what the text says.
        let instant = instant.trunc_subsecs(6);
        let text = instant.to_rfc3339_opts(SecondsFormat::Micros, false);
        Self { instant, text }
    }

    /// Parses ISO-8601 with or without offset (`T` or space separator), or a bare date.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let instant = if let Ok(aware) = DateTime::parse_from_rfc3339(trimmed) {
            aware.with_timezone(&Utc)
        } else if let Ok(aware) = DateTime::parse_from_str(trimmed, "%Y-%m-%dT%H:%M:%S%.f%z") {
            // `strftime("%z")` writes the offset without a colon (`+0000`).
            aware.with_timezone(&Utc)
        } else if let Some(naive) = parse_naive(trimmed) {
            naive.and_utc()
        } else {
            return Err(format!("`{text}` is not an ISO-8601 timestamp"));
        };
        Ok(Self {
            instant,
            text: text.to_owned(),
        })
    }

    pub fn instant(&self) -> DateTime<Utc> {
        self.instant
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn epoch_seconds(&self) -> i64 {
        self.instant.timestamp()
    }
}

fn parse_naive(text: &str) -> Option<NaiveDateTime> {
    const FORMATS: [&str; 4] = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ];
    FORMATS
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naive_python_utcnow_is_read_as_utc_and_kept_verbatim() {
        let ts = Timestamp::parse("2025-03-01T12:30:45.123456").unwrap();
        assert_eq!(
            ts.instant().to_rfc3339(),
            "2025-03-01T12:30:45.123456+00:00"
        );
        assert_eq!(
            serde_json::to_string(&ts).unwrap(),
            "\"2025-03-01T12:30:45.123456\""
        );
    }

    #[test]
    fn offset_forms_are_normalised_to_the_same_instant() {
        let z = Timestamp::parse("2025-03-01T12:30:45Z").unwrap();
        let plus = Timestamp::parse("2025-03-01T14:30:45+02:00").unwrap();
        assert_eq!(z.instant(), plus.instant());
        assert_eq!(plus.as_str(), "2025-03-01T14:30:45+02:00");
    }

    #[test]
    fn offsets_without_a_colon_are_accepted() {
        let ts = Timestamp::parse("2025-03-01T14:30:45.5+0200").unwrap();
        assert_eq!(ts.instant().to_rfc3339(), "2025-03-01T12:30:45.500+00:00");
    }

    #[test]
    fn space_separator_and_bare_dates_are_accepted() {
        assert_eq!(
            Timestamp::parse("2025-03-01 12:30:45")
                .unwrap()
                .epoch_seconds(),
            1_740_832_245
        );
        assert_eq!(
            Timestamp::parse("2025-03-01").unwrap().epoch_seconds(),
            1_740_787_200
        );
    }

    #[test]
    fn new_timestamps_use_the_python_compatible_offset_form() {
        let ts = Timestamp::now();
        assert!(ts.as_str().ends_with("+00:00"), "{ts}");
        assert_eq!(Timestamp::parse(ts.as_str()).unwrap(), ts);
    }

    #[test]
    fn garbage_is_rejected_with_the_text() {
        let err = Timestamp::parse("yesterday").unwrap_err();
        assert!(err.contains("yesterday"), "{err}");
    }
}
