//! Room grants from a token's `rooms` claim: patterns mapped to an access level.

use std::collections::BTreeMap;

use serde::Deserialize;

/// What a connection may do in its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// Receives the document and presence; its document writes are dropped.
    ReadOnly,
    /// Reads and writes.
    ReadWrite,
}

impl Access {
    /// `"r"` or `"rw"`, as in the claim.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::ReadOnly => "r",
            Access::ReadWrite => "rw",
        }
    }
}

/// One access level as written in a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum Level {
    #[serde(rename = "r")]
    Read,
    #[serde(rename = "rw")]
    ReadWrite,
}

/// The `rooms` claim: `{"acme/*": "rw", "lobby": "r"}`. A pattern ending in `*` matches every
/// room name starting with what comes before the `*`; any other pattern matches one name.
///
/// When several patterns match, the most specific wins: an exact name over any prefix, a longer
/// prefix over a shorter one. So `{"acme/*": "rw", "acme/board": "r"}` makes one room of a tenant
/// read-only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RoomRules(BTreeMap<String, Level>);

impl RoomRules {
    /// The access these rules grant to `room`, or `None` when no pattern matches.
    pub fn access(&self, room: &str) -> Option<Access> {
        if let Some(level) = self.0.get(room) {
            return Some(level.into());
        }
        self.0
            .iter()
            .filter_map(|(pattern, level)| {
                let prefix = pattern.strip_suffix('*')?;
                room.starts_with(prefix).then_some((prefix.len(), *level))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, level)| (&level).into())
    }
}

impl From<&Level> for Access {
    fn from(level: &Level) -> Self {
        match level {
            Level::Read => Access::ReadOnly,
            Level::ReadWrite => Access::ReadWrite,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(json: &str) -> RoomRules {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn exact_names_and_prefixes_match() {
        let r = rules(r#"{"acme/*": "rw", "lobby": "r"}"#);
        assert_eq!(r.access("acme/doc-1"), Some(Access::ReadWrite));
        assert_eq!(r.access("acme/"), Some(Access::ReadWrite));
        assert_eq!(r.access("lobby"), Some(Access::ReadOnly));
        assert_eq!(r.access("lobby2"), None);
        assert_eq!(r.access("acme"), None);
        assert_eq!(r.access("other/acme/x"), None);
    }

    #[test]
    fn the_most_specific_pattern_wins() {
        let r = rules(r#"{"acme/*": "rw", "acme/board": "r", "acme/ro/*": "r", "*": "r"}"#);
        assert_eq!(r.access("acme/board"), Some(Access::ReadOnly));
        assert_eq!(r.access("acme/ro/x"), Some(Access::ReadOnly));
        assert_eq!(r.access("acme/rw"), Some(Access::ReadWrite));
        assert_eq!(r.access("anything"), Some(Access::ReadOnly));
    }

    #[test]
    fn a_star_inside_a_pattern_is_literal() {
        let r = rules(r#"{"a*b": "rw"}"#);
        assert_eq!(r.access("a*b"), Some(Access::ReadWrite));
        assert_eq!(r.access("axb"), None);
    }

    #[test]
    fn unknown_levels_are_rejected() {
        assert!(serde_json::from_str::<RoomRules>(r#"{"x": "admin"}"#).is_err());
        assert!(serde_json::from_str::<RoomRules>(r#"["x"]"#).is_err());
    }

    #[test]
    fn no_rules_grant_nothing() {
        assert_eq!(RoomRules::default().access("x"), None);
    }
}
