//! Errors in image definitions, located by `file:line:col`, with the closest valid key for a typo.
//!
//! Every location comes from the TOML parser: serde's errors carry their span, and a rule that
//! fails after parsing names the [`KeyPath`] of the key it is about, which [`Spans`] resolves
//! through the spans of the parsed document. Nothing is found by searching the text.

use std::fmt;
use std::ops::Range;

use crate::validate::Problem;

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
    /// Deserialises TOML `source` (read from `file`) into `T`, a parse or type error located at
    /// the parser's span of the key or value at fault.
    pub fn from_toml<T: serde::de::DeserializeOwned>(
        file: &str,
        source: &str,
    ) -> Result<T, DefinitionError> {
        toml::from_str(source).map_err(|e| {
            DefinitionError::at(
                file,
                source,
                e.span().map(|s| s.start),
                explain(e.message()),
            )
        })
    }

    /// An error for a `problem` a rule found in the parsed TOML `source` (read from `file`),
    /// located through the parser's spans at the first of its keys the file has (else where the
    /// first key would be) and named `key: message`. A problem with no key is named `unnamed`
    /// when given, else by its message alone.
    pub fn locate(file: &str, source: &str, problem: &Problem, unnamed: Option<&str>) -> Self {
        let spans = Spans::parse(source);
        let offset = problem
            .paths
            .iter()
            .find_map(|p| spans.exact_offset(p))
            .or_else(|| problem.paths.first().and_then(|p| spans.offset(p)));
        let name = problem
            .paths
            .first()
            .map(ToString::to_string)
            .or_else(|| unnamed.map(str::to_owned));
        let message = match name {
            Some(name) => format!("{name}: {}", problem.message),
            None => problem.message.clone(),
        };
        DefinitionError::at(file, source, offset, message)
    }

    /// Builds an error at byte offset `offset` of `source`.
    pub fn at(file: &str, source: &str, offset: Option<usize>, message: String) -> Self {
        DefinitionError {
            file: file.to_owned(),
            location: offset.map(|o| line_col(source, o)),
            message,
        }
    }
}

/// The path of a key or value in a definition, as the TOML spells it: `container[2].ports[1]`,
/// `update.bless-timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPath {
    segments: Vec<Segment>,
    /// Point at the last key itself rather than its value (for rules about a key's name).
    at_key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl KeyPath {
    /// The path of a top-level key or table.
    pub fn root(key: &str) -> KeyPath {
        KeyPath::default().key(key)
    }

    /// This path with `key` appended.
    pub fn key(&self, key: &str) -> KeyPath {
        let mut path = self.clone();
        path.segments.push(Segment::Key(key.to_owned()));
        path
    }

    /// This path with array element `index` appended.
    pub fn index(&self, index: usize) -> KeyPath {
        let mut path = self.clone();
        path.segments.push(Segment::Index(index));
        path
    }

    /// The top-level key this path starts with (`container` of `container[2].ports`).
    pub fn root_key(&self) -> Option<&str> {
        match self.segments.first() {
            Some(Segment::Key(key)) => Some(key),
            _ => None,
        }
    }

    /// The array index right after the top-level key (`2` of `container[2].ports`).
    pub fn root_index(&self) -> Option<usize> {
        match self.segments.get(1) {
            Some(Segment::Index(index)) => Some(*index),
            _ => None,
        }
    }

    /// This path with the array index after its top-level key replaced by `index`
    /// (`container[2].ports` → `container[0].ports`); unchanged when it has none.
    pub fn with_root_index(&self, index: usize) -> KeyPath {
        let mut path = self.clone();
        if let Some(Segment::Index(i)) = path.segments.get_mut(1) {
            *i = index;
        }
        path
    }

    /// The same path, located at the last key's name instead of its value.
    pub fn at_key(&self) -> KeyPath {
        KeyPath {
            at_key: true,
            ..self.clone()
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The spans of every key and value of a definition's text, from one parse by `toml_edit` (the
/// parser `toml` itself uses).
#[derive(Debug)]
pub struct Spans<'a> {
    document: Option<toml_edit::ImDocument<&'a str>>,
}

/// One place in the parsed document while a [`KeyPath`] is followed.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a toml_edit::Item),
    Value(&'a toml_edit::Value),
    Table(&'a toml_edit::Table),
}

impl<'a> Node<'a> {
    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(item) => item.span(),
            Node::Value(value) => value.span(),
            Node::Table(table) => table.span(),
        }
    }

    /// The key and node of `segment` under this node.
    fn child(self, segment: &Segment) -> Option<(Option<Range<usize>>, Node<'a>)> {
        match segment {
            Segment::Key(key) => {
                let table: &dyn toml_edit::TableLike = match self {
                    Node::Item(item) => item.as_table_like()?,
                    Node::Value(value) => value.as_inline_table()?,
                    Node::Table(table) => table,
                };
                let (key, item) = table.get_key_value(key)?;
                Some((key.span(), Node::Item(item)))
            }
            Segment::Index(index) => match self {
                Node::Item(toml_edit::Item::ArrayOfTables(tables)) => {
                    tables.get(*index).map(|t| (None, Node::Table(t)))
                }
                Node::Item(item) => item
                    .as_array()
                    .and_then(|a| a.get(*index))
                    .map(|v| (None, Node::Value(v))),
                Node::Value(value) => value
                    .as_array()
                    .and_then(|a| a.get(*index))
                    .map(|v| (None, Node::Value(v))),
                Node::Table(_) => None,
            },
        }
    }
}

impl<'a> Spans<'a> {
    /// Parses `source` for its spans. Text `toml` accepted always parses; if it did not, every
    /// lookup finds nothing.
    pub fn parse(source: &'a str) -> Spans<'a> {
        Spans {
            document: toml_edit::ImDocument::parse(source).ok(),
        }
    }

    /// Byte offset of the value at `path` (of its key with [`KeyPath::at_key`]), only when the
    /// file has that very key.
    pub fn exact_offset(&self, path: &KeyPath) -> Option<usize> {
        self.lookup(path)
            .filter(|(found, _)| *found)
            .map(|(_, o)| o)
    }

    /// Byte offset of the value at `path` (of its key with [`KeyPath::at_key`]). A key that the
    /// file leaves to its default is located at the closest enclosing key or table it has.
    pub fn offset(&self, path: &KeyPath) -> Option<usize> {
        self.lookup(path).map(|(_, o)| o)
    }

    /// Whether the whole of `path` was found, and the offset of what was.
    fn lookup(&self, path: &KeyPath) -> Option<(bool, usize)> {
        let document = self.document.as_ref()?;
        let mut node = Node::Table(document.as_table());
        let mut best: Option<usize> = None;
        let last = path.segments.len().saturating_sub(1);
        for (i, segment) in path.segments.iter().enumerate() {
            let Some((key_span, child)) = node.child(segment) else {
                return best.map(|o| (false, o));
            };
            node = child;
            let point = if path.at_key && i == last {
                key_span.or_else(|| child.span())
            } else {
                child.span().or(key_span)
            };
            best = point.map(|r| r.start).or(best);
        }
        best.map(|o| (true, o))
    }
}

/// Decodes a definition file's bytes as UTF-8; invalid bytes are an error at the line and column
/// of the first one.
pub fn decode<'b>(file: &str, bytes: &'b [u8]) -> Result<&'b str, DefinitionError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        // The prefix before the first bad byte is valid UTF-8 by definition of `valid_up_to`.
        let valid = std::str::from_utf8(valid).unwrap_or_default();
        DefinitionError::at(
            file,
            valid,
            Some(valid.len()),
            format!(
                "invalid UTF-8 (byte 0x{:02x}): a definition must be UTF-8 text",
                bytes[e.valid_up_to()]
            ),
        )
    })
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
    fn key_paths_resolve_through_spans_not_text() {
        let src = "# ports = [\"1:1\"]\n[[container]]\nname = \"a\"\n[[container]]\nname = \"b\"\nports = [\"8080:80\", \"9:9\"]\nenv = { \"A=B\" = \"1\" }\n";
        let spans = Spans::parse(src);
        let container = KeyPath::root("container").index(1);
        let at = |path: &KeyPath| spans.offset(path).map(|o| line_col(src, o));
        assert_eq!(at(&container.key("ports").index(1)), Some((6, 21)));
        assert_eq!(at(&container.key("ports")), Some((6, 9)));
        assert_eq!(at(&container.key("env").key("A=B").at_key()), Some((7, 9)));
        // A key left to its default: the enclosing table.
        assert_eq!(at(&container.key("restart")), Some((4, 1)));
        assert_eq!(at(&KeyPath::root("update").key("url")), None);
        assert_eq!(
            container.key("env").key("A=B").to_string(),
            "container[1].env.\"A=B\""
        );
    }

    #[test]
    fn problems_are_located_at_the_first_key_the_file_has() {
        let src = "[update]\nurl = \"https://u\"\nbless-after = \"5m\"\n";
        let update = KeyPath::root("update");
        let problem = Problem {
            paths: vec![update.key("bless-timeout"), update.key("bless-after")],
            message: "must be longer".to_owned(),
        };
        let err = DefinitionError::locate("d.toml", src, &problem, None);
        assert_eq!(err.location, Some((3, 15)), "{err}");
        assert_eq!(err.message, "update.bless-timeout: must be longer");
        let keyless = Problem {
            paths: vec![],
            message: "empty".to_owned(),
        };
        let err = DefinitionError::locate("u.toml", src, &keyless, Some("user data"));
        assert_eq!(err.to_string(), "u.toml: user data: empty");
        let err = DefinitionError::locate("d.toml", src, &keyless, None);
        assert_eq!(err.to_string(), "d.toml: empty");
    }

    #[test]
    fn invalid_utf8_is_located_at_the_first_bad_byte() {
        let err = decode("d.toml", b"a = 1\nb = \"\xc3\xa9\xff\"\n").expect_err("bad byte");
        assert_eq!(err.location, Some((2, 7)), "{err}");
        assert!(err.message.contains("0xff"), "{err}");
        assert_eq!(decode("d.toml", "é".as_bytes()), Ok("é"));
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
