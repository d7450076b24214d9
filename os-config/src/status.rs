//! The `PLINTH-STATUS` console line: `PLINTH-STATUS <event> key=value…`, printed by `plinth-init`
//! and `plinth-update` and read by the tests and serial-console readers.
//!
//! One escaping rule: a value that is empty or holds whitespace, `"`, `=`, `\` or a control
//! character is written in double quotes, with `\"`, `\\`, `\n`, `\r`, `\t` and `\u{…}` (other
//! control characters) escaped, so the line stays one line and [`parse`] gives back the exact
//! value. Other values are written as they are.

use std::fmt::Write as _;

/// The word every status line starts with.
pub const PREFIX: &str = "PLINTH-STATUS";

/// One parsed status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The event name (`container-running`).
    pub event: String,
    /// The fields in order.
    pub fields: Vec<(String, String)>,
}

impl Status {
    /// The value of field `key` (the last one, should a key repeat).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Formats `PLINTH-STATUS <event> key=value…` (no newline).
pub fn format(event: &str, fields: &[(&str, &str)]) -> String {
    let mut line = format!("{PREFIX} {event}");
    for (key, value) in fields {
        let _ = write!(line, " {key}=");
        write_value(&mut line, value);
    }
    line
}

/// True when `value` must be quoted.
fn needs_quotes(value: &str) -> bool {
    value.is_empty()
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '\\'))
}

fn write_value(line: &mut String, value: &str) {
    if !needs_quotes(value) {
        line.push_str(value);
        return;
    }
    line.push('"');
    for c in value.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(line, "\\u{{{:x}}}", u32::from(c));
            }
            c => line.push(c),
        }
    }
    line.push('"');
}

/// Reads the status line in `line`, which may carry a prefix (a console timestamp,
/// `plinth-init: `) and a line end. `None` when it holds no `PLINTH-STATUS <event>`. A word
/// without `=` is skipped; an unterminated quoted value runs to the end of the line.
pub fn parse(line: &str) -> Option<Status> {
    let start = line.find(&format!("{PREFIX} "))?;
    let rest = line[start + PREFIX.len() + 1..].trim_end();
    let (event, mut rest) = rest.split_once(' ').unwrap_or((rest, ""));
    if event.is_empty() {
        return None;
    }
    let mut fields = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let Some(eq) = rest[..word_end].find('=') else {
            rest = &rest[word_end..];
            continue;
        };
        let key = rest[..eq].to_owned();
        let after = &rest[eq + 1..];
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => read_quoted(quoted),
            None => {
                let end = after.find(char::is_whitespace).unwrap_or(after.len());
                (after[..end].to_owned(), &after[end..])
            }
        };
        fields.push((key, value));
        rest = next;
    }
    Some(Status {
        event: event.to_owned(),
        fields,
    })
}

/// Reads a quoted value after its opening quote: the value and the text after the closing quote.
fn read_quoted(text: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (value, &text[i + 1..]),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, 'r')) => value.push('\r'),
                Some((_, 't')) => value.push('\t'),
                Some((at, 'u')) => {
                    let code = text[at + 1..]
                        .strip_prefix('{')
                        .and_then(|s| s.split_once('}'))
                        .and_then(|(hex, _)| u32::from_str_radix(hex, 16).ok())
                        .and_then(char::from_u32);
                    match code {
                        Some(c) => {
                            value.push(c);
                            // Skip `{hex}`.
                            for (_, c) in chars.by_ref() {
                                if c == '}' {
                                    break;
                                }
                            }
                        }
                        None => value.push('u'),
                    }
                }
                Some((_, c)) => value.push(c),
                None => {}
            },
            c => value.push(c),
        }
    }
    (value, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_only_when_needed() {
        /// An event, its fields and the line they make.
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("stage1-start", &[], "PLINTH-STATUS stage1-start"),
            ("engine-ready", &[], "PLINTH-STATUS engine-ready"),
            (
                "root-mounted",
                &[("device", "/dev/dm-0"), ("verity", "yes")],
                "PLINTH-STATUS root-mounted device=/dev/dm-0 verity=yes",
            ),
            (
                "boot-failed",
                &[("error", "no \"state\" here"), ("x", "")],
                "PLINTH-STATUS boot-failed error=\"no \\\"state\\\" here\" x=\"\"",
            ),
            (
                "x",
                &[("a", "b"), ("r", "say \"hi\"\n")],
                "PLINTH-STATUS x a=b r=\"say \\\"hi\\\"\\n\"",
            ),
            (
                "y",
                &[("k", "a=b"), ("p", "C:\\x"), ("t", "a\tb\r\u{1b}[0m")],
                "PLINTH-STATUS y k=\"a=b\" p=\"C:\\\\x\" t=\"a\\tb\\r\\u{1b}[0m\"",
            ),
        ];
        for (event, fields, expected) in cases {
            assert_eq!(format(event, fields), *expected);
        }
    }

    #[test]
    fn every_value_round_trips() {
        let values = [
            "plain",
            "",
            "two words",
            "line one\nline two",
            "quote \" and backslash \\ at the end \\",
            "\\n is not a newline",
            "key=value",
            "tab\there, cr\r, bell\u{7}, c1\u{85}, nbsp\u{a0}",
            "ünïcödé ✓",
            "\"",
            "\\u{41}",
        ];
        for value in values {
            let line = format("event", &[("v", value), ("after", "x")]);
            assert!(!line.contains('\n'), "{line:?}");
            let status = parse(&line).expect(&line);
            assert_eq!(status.event, "event");
            assert_eq!(status.get("v"), Some(value), "{line}");
            assert_eq!(status.get("after"), Some("x"), "{line}");
        }
    }

    #[test]
    fn reads_lines_as_the_console_shows_them() {
        let status =
            parse("[  3.1] plinth-init: PLINTH-STATUS container-running name=web id=abc\r\n")
                .expect("status line");
        assert_eq!(status.event, "container-running");
        assert_eq!(
            status.fields,
            [
                ("name".to_owned(), "web".to_owned()),
                ("id".to_owned(), "abc".to_owned())
            ]
        );
        let status = parse(
            "PLINTH-STATUS boot-state slot=b state=\"trying 2/3\" reason=\"a \\\"b\\\" c\" v=1",
        )
        .expect("status line");
        assert_eq!(status.get("state"), Some("trying 2/3"));
        assert_eq!(status.get("reason"), Some("a \"b\" c"));
        assert_eq!(status.get("v"), Some("1"));
        assert_eq!(parse("plinth-init: no status here"), None);
        assert_eq!(parse("PLINTH-STATUS "), None);
        let odd = parse("PLINTH-STATUS e junk k=v r=\"open").expect("status line");
        assert_eq!(odd.get("k"), Some("v"));
        assert_eq!(odd.get("r"), Some("open"));
        assert_eq!(odd.get("junk"), None);
    }
}
