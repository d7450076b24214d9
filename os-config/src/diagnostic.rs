//! Errors in image definitions, located by `file:line:col`, with the closest valid key for a typo.

use std::fmt;

/// A definition that could not be accepted, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionError {
    /// The file name as the user gave it.
    pub file: String,
    /// 1-based line and column, when the error points at a place in the file.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, col)) => write!(f, "{}:{line}:{col}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl DefinitionError {
    /// Builds an error at byte offset `offset` of `source`.
    pub fn at(file: &str, source: &str, offset: Option<usize>, message: String) -> Self {
        DefinitionError {
            file: file.to_owned(),
            location: offset.map(|o| line_col(source, o)),
            message,
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `source`.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = source[line_start..offset].chars().count() + 1;
    (line, col)
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" into a message naming the
/// closest allowed key; other messages are returned as they are.
pub fn explain(message: &str) -> String {
    let message = message.trim_end();
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let Some((unknown, allowed)) = rest.split_once('`') else {
        return message.to_owned();
    };
    let allowed: Vec<&str> = allowed
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    let closest = allowed
        .iter()
        .map(|a| (strsim::damerau_levenshtein(unknown, a), *a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 3))
        .min();
    let list = allowed
        .iter()
        .map(|a| format!("`{a}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match closest {
        Some((_, a)) => format!("unknown key `{unknown}`: did you mean `{a}`? (allowed: {list})"),
        None if allowed.is_empty() => format!("unknown key `{unknown}`: no keys are allowed here"),
        None => format!("unknown key `{unknown}` (allowed: {list})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 9), (2, 4));
    }

    #[test]
    fn unknown_field_names_the_closest_key() {
        let msg = explain("unknown field `kernal`, expected one of `image`, `kernel`, `disk`");
        assert!(msg.contains("did you mean `kernel`?"), "{msg}");
        let msg = explain("unknown field `zzzzzz`, expected one of `image`, `kernel`");
        assert!(!msg.contains("did you mean"), "{msg}");
        assert!(msg.contains("`image`, `kernel`"), "{msg}");
        assert_eq!(explain("invalid type"), "invalid type");
    }
}
