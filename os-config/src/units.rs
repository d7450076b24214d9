//! Validated value types used in image definitions: sizes, durations, digests, modes, names.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, written in definitions as a human string such as `"512MiB"` or `"2GiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const MIB: u64 = 1 << 20;
    /// The largest size a definition may give (64 TiB): far above any partition Plinth writes,
    /// and low enough that the whole disk layout's sum can never overflow.
    pub const MAX: u64 = 64 << 40;

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `"<number><unit>"` with units B, KiB, MiB, GiB, TiB (binary) or K, M, G, T (also binary).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(format!(
                "invalid size `{text}`: expected a number followed by a unit, like \"512MiB\" or \"2GiB\""
            ));
        }
        let number: u64 = number.parse().map_err(|_| {
            format!(
                "invalid size `{text}`: the largest allowed is {}",
                ByteSize(ByteSize::MAX)
            )
        })?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            other => {
                return Err(format!(
                "invalid size unit `{other}` in `{text}`: allowed units are B, KiB, MiB, GiB, TiB"
            ))
            }
        };
        number
            .checked_mul(factor)
            .filter(|bytes| *bytes <= ByteSize::MAX)
            .map(ByteSize)
            .ok_or_else(|| {
                format!(
                    "invalid size `{text}`: the largest allowed is {}",
                    ByteSize(ByteSize::MAX)
                )
            })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (1u64 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (factor, unit) in units {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ByteSize::parse(&text).map_err(de::Error::custom)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A duration written as `"30s"`, `"5m"`, `"1h"` or `"500ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// The longest duration a definition may give: 365 days (8760h).
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

    /// Parses `"<number><unit>"` with units ms, s, m, h, up to [`Duration::MAX`].
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(format!(
                "invalid duration `{text}`: expected a number and a unit, like \"30s\" or \"5m\""
            ));
        }
        let too_long =
            || format!("invalid duration `{text}`: the longest allowed is 8760h (365 days)");
        let number: u64 = number.parse().map_err(|_| too_long())?;
        let millis = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            other => {
                return Err(format!(
                    "invalid duration unit `{other}` in `{text}`: allowed units are ms, s, m, h"
                ))
            }
        };
        number
            .checked_mul(millis)
            .map(std::time::Duration::from_millis)
            .filter(|d| *d <= Duration::MAX)
            .map(Duration)
            .ok_or_else(too_long)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Duration::parse(&text).map_err(de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format!("{}ms", self.0.as_millis()))
    }
}

/// A lowercase hex SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256(String);

impl Sha256 {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Sha256(text.to_ascii_lowercase()))
        } else {
            Err(format!(
                "invalid sha256 `{text}`: expected 64 hexadecimal digits"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Sha256::parse(&text).map_err(de::Error::custom)
    }
}

impl Serialize for Sha256 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A Unix permission mode written as an octal string, `"0644"` or `"755"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMode(pub u32);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        FileMode::parse(&text).map_err(de::Error::custom)
    }
}

impl FileMode {
    /// Parses octal digits only (no sign, no `0o`), at most `7777`.
    pub fn parse(text: &str) -> Result<FileMode, String> {
        let digits = !text.is_empty() && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
        match u32::from_str_radix(text, 8) {
            Ok(mode) if digits && mode <= 0o7777 => Ok(FileMode(mode)),
            _ => Err(format!(
                "invalid mode `{text}`: expected octal digits 0-7 up to 7777, such as \"0644\" or \"0755\""
            )),
        }
    }
}

impl Serialize for FileMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

/// A name usable in file names, host names and container names: `[a-z0-9][a-z0-9-_.]*`, at most 63 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Name(String);

impl Name {
    pub fn parse(text: &str) -> Result<Self, String> {
        let ok_first = text
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let ok_rest = text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if ok_first && ok_rest && text.len() <= 63 {
            Ok(Name(text.to_owned()))
        } else {
            Err(format!(
                "invalid name `{text}`: use 1 to 63 lowercase letters, digits, `-`, `_` or `.`, starting with a letter or digit"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Name::parse(&text).map_err(de::Error::custom)
    }
}

/// An OS version: dot-separated decimal numbers, `"1"`, `"1.4"`, `"2026.11.3"`. Ordered numerically,
/// which is what updates compare.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    text: String,
    parts: Vec<u64>,
}

impl Version {
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Option<Vec<u64>> = text
            .split('.')
            .map(|p| {
                if p.is_empty() || p.len() > 9 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    None
                } else {
                    p.parse().ok()
                }
            })
            .collect();
        match parts {
            Some(parts) if parts.len() <= 4 => Ok(Version {
                text: text.to_owned(),
                parts,
            }),
            _ => Err(format!(
                "invalid version `{text}`: expected 1 to 4 dot-separated numbers, like \"1.2.0\""
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let len = self.parts.len().max(other.parts.len());
        let get = |v: &Version, i: usize| v.parts.get(i).copied().unwrap_or(0);
        (0..len)
            .map(|i| get(self, i).cmp(&get(other, i)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Version::parse(&text).map_err(de::Error::custom)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// A UTC calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl CivilTime {
    /// The proleptic Gregorian date and time of `unix_seconds` (Howard Hinnant's civil-from-days).
    pub fn from_unix(unix_seconds: u64) -> CivilTime {
        let days = (unix_seconds / 86_400) as i64;
        let rem = (unix_seconds % 86_400) as u32;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        CivilTime {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        let cases = [
            ("512MiB", Some(512 << 20)),
            ("2GiB", Some(2 << 30)),
            ("4096", Some(4096)),
            ("1K", Some(1024)),
            ("12 MiB", Some(12 << 20)),
            ("MiB", None),
            ("3 parsecs", None),
        ];
        for (text, want) in cases {
            assert_eq!(ByteSize::parse(text).ok().map(|s| s.0), want, "{text}");
        }
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
    }

    #[test]
    fn versions_order_numerically() {
        let v = |s| Version::parse(s).expect("valid version");
        assert!(v("1.10") > v("1.9"));
        assert!(v("2") > v("1.99.99"));
        assert_eq!(v("1.0"), v("1.0"));
        assert_eq!(v("1.0").cmp(&v("1")), std::cmp::Ordering::Equal);
        assert!(Version::parse("1.x").is_err());
        assert!(Version::parse("").is_err());
    }

    #[test]
    fn names_are_restricted() {
        assert!(Name::parse("web-1").is_ok());
        assert!(Name::parse("Web").is_err());
        assert!(Name::parse("-x").is_err());
        assert!(Name::parse("").is_err());
    }

    #[test]
    fn civil_time_of_known_instants() {
        let t = CivilTime::from_unix(951_782_400 + 3_723);
        assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
        assert_eq!((t.hour, t.minute, t.second), (1, 2, 3));
        assert_eq!(CivilTime::from_unix(0).year, 1970);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(Duration::parse("30s").map(|d| d.0.as_secs()), Ok(30));
        assert_eq!(Duration::parse("5m").map(|d| d.0.as_secs()), Ok(300));
        assert!(Duration::parse("5 minutes").is_err());
        assert!(Duration::parse("+5s").is_err());
    }

    #[test]
    fn sizes_and_durations_have_stated_maxima() {
        assert_eq!(Duration::parse("8760h").map(|d| d.0), Ok(Duration::MAX));
        for text in ["8761h", "5124095576031h", "99999999999999999999s"] {
            let err = Duration::parse(text).expect_err(text);
            assert!(err.contains("8760h (365 days)"), "{text}: {err}");
        }
        assert_eq!(ByteSize::parse("64TiB").map(|s| s.0), Ok(ByteSize::MAX));
        for text in ["65TiB", "16000000TiB", "99999999999999999999"] {
            let err = ByteSize::parse(text).expect_err(text);
            assert!(err.contains("largest allowed is 64TiB"), "{text}: {err}");
        }
    }

    #[test]
    fn modes_are_octal_digits_only() {
        assert_eq!(FileMode::parse("0644"), Ok(FileMode(0o644)));
        assert_eq!(FileMode::parse("7777"), Ok(FileMode(0o7777)));
        for text in ["+644", "", "0o644", "10000", "0888", " 644"] {
            assert!(FileMode::parse(text).is_err(), "{text}");
        }
    }
}
