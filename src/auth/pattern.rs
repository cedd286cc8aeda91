//! Channel and client-id patterns from a token's claims: exact names, or a prefix followed by
//! `*` ("any name that starts with this"), so that one token can grant `user:42:*`.

use crate::name::{self, NameError};

/// One pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// Matches this name only.
    Exact(Box<str>),
    /// Matches every name that starts with this prefix (the empty prefix matches all).
    Prefix(Box<str>),
}

/// The patterns of one claim; an empty list matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns(Box<[Pattern]>);

/// A pattern that can never match a valid name, which is almost certainly a mistake in the
/// token issuer's code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern without its trailing `*` is not a valid name or name prefix.
    #[error("pattern {pattern:?}: {reason}")]
    Invalid {
        /// The pattern as written in the token.
        pattern: String,
        /// What is wrong with it.
        reason: NameError,
    },
    /// A `*` somewhere other than at the end.
    #[error("pattern {0:?}: `*` is only allowed at the end")]
    InnerWildcard(String),
}

impl Patterns {
    /// Reads a claim's patterns.
    ///
    /// # Errors
    /// The first pattern that can match no valid name.
    pub fn parse(patterns: &[String]) -> Result<Self, PatternError> {
        patterns
            .iter()
            .map(|pattern| {
                let (stem, wildcard) = match pattern.strip_suffix('*') {
                    Some(prefix) => (prefix, true),
                    None => (pattern.as_str(), false),
                };
                if stem.contains('*') {
                    return Err(PatternError::InnerWildcard(pattern.clone()));
                }
                if !(wildcard && stem.is_empty()) {
                    name::validate(stem).map_err(|reason| PatternError::Invalid {
                        pattern: pattern.clone(),
                        reason,
                    })?;
                }
                Ok(if wildcard {
                    Pattern::Prefix(stem.into())
                } else {
                    Pattern::Exact(stem.into())
                })
            })
            .collect::<Result<Box<[_]>, _>>()
            .map(Self)
    }

    /// Whether any pattern matches `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|pattern| match pattern {
            Pattern::Exact(exact) => **exact == *name,
            Pattern::Prefix(prefix) => name.starts_with(&**prefix),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(list: &[&str]) -> Patterns {
        let list: Vec<String> = list.iter().map(|p| (*p).to_owned()).collect();
        Patterns::parse(&list).unwrap()
    }

    #[test]
    fn exact_and_prefix() {
        let p = patterns(&["news", "user:42:*"]);
        assert!(p.matches("news"));
        assert!(!p.matches("news2"));
        assert!(p.matches("user:42:inbox"));
        assert!(p.matches("user:42:"));
        assert!(!p.matches("user:43:inbox"));
        assert!(!p.matches("user:4"));
    }

    #[test]
    fn star_alone_matches_everything_and_empty_matches_nothing() {
        assert!(patterns(&["*"]).matches("anything"));
        assert!(!patterns(&[]).matches("anything"));
    }

    #[test]
    fn rejects_patterns_that_match_no_valid_name() {
        let bad = |p: &str| Patterns::parse(&[p.to_owned()]).unwrap_err();
        assert!(matches!(bad("a*b"), PatternError::InnerWildcard(_)));
        assert!(matches!(bad("**"), PatternError::InnerWildcard(_)));
        assert!(matches!(bad(""), PatternError::Invalid { .. }));
        assert!(matches!(bad("sp ace*"), PatternError::Invalid { .. }));
    }
}
