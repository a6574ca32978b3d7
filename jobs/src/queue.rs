//! Queue names: parsed once at the edge, cheap to clone everywhere after.

use std::{fmt, sync::Arc};

/// The queues every drover build knows. Other names are accepted too (`sleep` jobs may
/// name one), as long as they are valid [`QueueName`]s.
pub const BUILTIN_QUEUES: [&str; 6] = ["backups", "cache-warm", "analytics", "scoring", "default", "noop"];

/// The built-in queues plus `seen` (names that don't parse are skipped), sorted, without
/// duplicates: what every broker's queue listing returns.
pub fn builtin_and(seen: impl IntoIterator<Item = QueueName>) -> Vec<QueueName> {
    let mut all: Vec<QueueName> = BUILTIN_QUEUES
        .iter()
        .map(|q| QueueName::parse(q).expect("built-in queue names are valid"))
        .chain(seen)
        .collect();
    all.sort();
    all.dedup();
    all
}

/// A validated queue name: 1–64 characters of `a-z`, `0-9`, `-`, `_`, starting with a letter
/// or digit. The restriction keeps names safe inside Redis keys (`drover:{name}:…`), AMQP
/// queue names, metric labels and URLs without escaping.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Arc<str>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid queue name {name:?}: {reason}")]
pub struct InvalidQueueName {
    pub name: String,
    pub reason: &'static str,
}

impl QueueName {
    pub fn parse(name: &str) -> Result<Self, InvalidQueueName> {
        let invalid = |reason| InvalidQueueName {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() || name.len() > 64 {
            return Err(invalid("must be 1 to 64 characters long"));
        }
        if !name.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(invalid("must start with a letter or a digit"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(invalid("may contain only a-z, 0-9, '-' and '_'"));
        }
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::str::FromStr for QueueName {
    type Err = InvalidQueueName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for QueueName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for QueueName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_queue_names_are_valid() {
        for q in BUILTIN_QUEUES {
            assert_eq!(QueueName::parse(q).unwrap().as_str(), q);
        }
    }

    #[test]
    fn names_that_would_need_escaping_are_rejected() {
        for bad in ["", "Upper", "a b", "a:b", "{a}", "-lead", &"x".repeat(65)] {
            assert!(QueueName::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
