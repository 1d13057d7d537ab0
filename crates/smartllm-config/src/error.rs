//! Errors of the crate: [`ConfigError`] (every [`ConfigIssue`] found while
//! loading a config directory), and the errors of the value parsers behind
//! it ([`UrlError`] for [`crate::Url::parse`], [`UnitError`] for durations and
//! byte sizes), whose messages end up in a `ConfigIssue`.

use std::fmt;
use std::path::PathBuf;

/// One problem in the config directory, located as precisely as we can:
/// the file, the key path inside it (`providers.openai.base_url`) and the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub file: PathBuf,
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found while loading a config directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        write!(f, "{n} config error{}", if n == 1 { "" } else { "s" })?;
        for issue in &self.issues {
            write!(f, "\n  {issue}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Why [`crate::Url::parse`] refused a URL. Each message starts with the URL
/// as written (quoted) and is reported as is, under the key that held it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{0:?} is not an http:// or https:// URL")]
    Scheme(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?}: credentials in URLs are not supported; use api_key_env or api_key_file")]
    Credentials(String),
    #[error("{0:?}: bad IPv6 host")]
    Ipv6Host(String),
    #[error("{url:?}: bad port {port:?}")]
    Port { url: String, port: String },
    #[error("{0:?}: query strings and fragments are not supported")]
    QueryOrFragment(String),
}

/// Why [`crate::units::parse_duration`] or [`crate::units::parse_bytes`]
/// refused a value (`input` is the value as written, trimmed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid duration {0:?}: expected e.g. 250ms, 30s, 5m, 1h or 7d")]
    DurationNumber(String),
    #[error("invalid duration unit {unit:?} in {input:?}: use ms, s, m, h or d")]
    DurationUnit { unit: String, input: String },
    #[error("invalid duration {0:?}")]
    Duration(String),
    #[error("invalid size {0:?}: expected e.g. 4096, 64KiB or 32MiB")]
    SizeNumber(String),
    #[error("invalid size unit {unit:?} in {input:?}: use B, KiB, MiB or GiB")]
    SizeUnit { unit: String, input: String },
    #[error("size {0:?} is too large")]
    SizeTooLarge(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages are those of the `format!` calls the enums replaced.
    #[test]
    fn messages_are_unchanged() {
        let (s, p, u) = ("ftp://x\"", "x", "parsecs");
        let cases = [
            (
                UrlError::Scheme(s.into()).to_string(),
                format!("{s:?} is not an http:// or https:// URL"),
            ),
            (
                UrlError::NoHost(s.into()).to_string(),
                format!("{s:?} has no host"),
            ),
            (
                UrlError::Credentials(s.into()).to_string(),
                format!(
                    "{s:?}: credentials in URLs are not supported; use api_key_env or api_key_file"
                ),
            ),
            (
                UrlError::Ipv6Host(s.into()).to_string(),
                format!("{s:?}: bad IPv6 host"),
            ),
            (
                UrlError::Port {
                    url: s.into(),
                    port: p.into(),
                }
                .to_string(),
                format!("{s:?}: bad port {p:?}"),
            ),
            (
                UrlError::QueryOrFragment(s.into()).to_string(),
                format!("{s:?}: query strings and fragments are not supported"),
            ),
            (
                UnitError::DurationNumber(s.into()).to_string(),
                format!("invalid duration {s:?}: expected e.g. 250ms, 30s, 5m, 1h or 7d"),
            ),
            (
                UnitError::DurationUnit {
                    unit: u.into(),
                    input: s.into(),
                }
                .to_string(),
                format!("invalid duration unit {u:?} in {s:?}: use ms, s, m, h or d"),
            ),
            (
                UnitError::Duration(s.into()).to_string(),
                format!("invalid duration {s:?}"),
            ),
            (
                UnitError::SizeNumber(s.into()).to_string(),
                format!("invalid size {s:?}: expected e.g. 4096, 64KiB or 32MiB"),
            ),
            (
                UnitError::SizeUnit {
                    unit: u.into(),
                    input: s.into(),
                }
                .to_string(),
                format!("invalid size unit {u:?} in {s:?}: use B, KiB, MiB or GiB"),
            ),
            (
                UnitError::SizeTooLarge(s.into()).to_string(),
                format!("size {s:?} is too large"),
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}
