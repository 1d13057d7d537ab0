//! Human-friendly units in config files: durations (`250ms`, `30s`, `5m`, `1h`, `7d`)
//! and byte sizes (`64KiB`, `32MiB`, `1GiB`, or a plain integer of bytes).

use crate::UnitError;
use serde::{de, Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// A duration written as `500ms`, `30s`, `5m`, `1h`, `7d` or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

/// A byte size written as `512`, `64KiB`, `32MiB`, `1GiB` (also `KB`/`MB`/`GB` as powers of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// The longest duration a setting may hold: ten years. Anything longer is a
/// typo, and would overflow when the gateway adds it to an instant.
pub const MAX_DURATION_SECS: u64 = 315_360_000;

/// `secs` as a duration, unless it is not finite, negative or longer than
/// [`MAX_DURATION_SECS`] (`input` is the value as written, for the error).
fn bounded_secs_f64(secs: f64, input: &str) -> Result<Duration, UnitError> {
    if !secs.is_finite() || secs < 0.0 || secs > MAX_DURATION_SECS as f64 {
        return Err(UnitError::Duration(input.to_string()));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| UnitError::Duration(input.to_string()))
}

/// A whole number of seconds as a duration, unless it is longer than
/// [`MAX_DURATION_SECS`].
fn bounded_secs(secs: u64) -> Result<Duration, UnitError> {
    if secs > MAX_DURATION_SECS {
        return Err(UnitError::Duration(secs.to_string()));
    }
    Ok(Duration::from_secs(secs))
}

pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| UnitError::DurationNumber(s.to_string()))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "us" | "µs" => value / 1_000_000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(UnitError::DurationUnit {
                unit: other.to_string(),
                input: s.to_string(),
            })
        }
    };
    bounded_secs_f64(secs, s)
}

pub fn parse_bytes(s: &str) -> Result<u64, UnitError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: u64 = num
        .parse()
        .map_err(|_| UnitError::SizeNumber(s.to_string()))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(UnitError::SizeUnit {
                unit: other.to_string(),
                input: s.to_string(),
            })
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| UnitError::SizeTooLarge(s.to_string()))
}

struct DurationVisitor;

impl de::Visitor<'_> for DurationVisitor {
    type Value = ConfigDuration;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as 250ms, 30s, 5m or a number of seconds")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        bounded_secs(v).map(ConfigDuration).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        let v = u64::try_from(v).map_err(|_| E::custom("a duration cannot be negative"))?;
        bounded_secs(v).map(ConfigDuration).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        if v.is_finite() && v >= 0.0 {
            bounded_secs_f64(v, &v.to_string())
                .map(ConfigDuration)
                .map_err(E::custom)
        } else {
            Err(E::custom("a duration must be a non-negative number"))
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_duration(v).map(ConfigDuration).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurationVisitor)
    }
}

struct BytesVisitor;

impl de::Visitor<'_> for BytesVisitor {
    type Value = ByteSize;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as 4096, 64KiB or 32MiB")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(ByteSize(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom("a size cannot be negative"))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_bytes(v).map(ByteSize).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BytesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(
            parse_duration("1.5d").unwrap(),
            Duration::from_secs(129_600)
        );
        assert!(parse_duration("3651d").is_err());
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("abc").is_err());
    }

    /// A duration too large for `Duration` (or for an instant plus it) is a
    /// parse error, never a panic, on every path: strings, floats and
    /// whole numbers.
    #[test]
    fn durations_are_bounded() {
        for s in ["99999999999999999999s", "6000000000000000h", "315360001s"] {
            assert!(
                matches!(parse_duration(s), Err(UnitError::Duration(_))),
                "{s}"
            );
        }
        assert_eq!(
            parse_duration("87600h").unwrap(),
            Duration::from_secs(MAX_DURATION_SECS)
        );
        let parse = |yaml: &str| serde_yaml::from_str::<ConfigDuration>(yaml);
        for yaml in [
            "1e20",
            "18446744073709551615",
            "315360001",
            "9223372036854775807",
            "\"99999999999999999999s\"",
            "\"6000000000000000h\"",
            "-1",
            "-1.5",
            ".inf",
            ".nan",
        ] {
            assert!(parse(yaml).is_err(), "{yaml}");
        }
        assert_eq!(
            parse("315360000").unwrap().0,
            Duration::from_secs(MAX_DURATION_SECS)
        );
        assert_eq!(parse("1.5").unwrap().0, Duration::from_millis(1500));
        assert_eq!(parse("30").unwrap().0, Duration::from_secs(30));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_bytes("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert_eq!(parse_bytes("2MB").unwrap(), 2_000_000);
        assert!(parse_bytes("12 apples").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
    }
}
