//! The kernel command line (`/proc/cmdline`, a boot entry's `options`): split into `key[=value]`
//! arguments by the kernel's own rules, with one rule for repeated keys (the last one wins, as
//! for the kernel's parameters and systemd's `proc_cmdline`).
//!
//! Splitting follows `next_arg()` in the kernel's `lib/cmdline.c`: arguments are separated by
//! whitespace outside double quotes; the key runs to the first `=`; a value that starts with a
//! quote loses it and the argument's closing quote (`msg="a b"` is `msg` = `a b`); an argument
//! that starts with a quote loses it and its closing quote (`"msg=a b"`). Other quotes stay in
//! the text.

/// A parsed kernel command line: every argument in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    args: Vec<(String, Option<String>)>,
}

impl Cmdline {
    /// Splits a command line into its arguments. Never fails: any text is a command line.
    pub fn parse(text: &str) -> Cmdline {
        let mut args = Vec::new();
        let mut rest = text.trim_start_matches(is_space);
        while !rest.is_empty() {
            let (key, value, next) = next_arg(rest);
            if !key.is_empty() {
                args.push((key.to_owned(), value.map(str::to_owned)));
            }
            rest = next.trim_start_matches(is_space);
        }
        Cmdline { args }
    }

    /// Every argument as (key, value) in order; `value` is `None` for a bare `key`.
    pub fn args(&self) -> &[(String, Option<String>)] {
        &self.args
    }

    /// The value of the last `key` argument: `Some("")` for a bare `key` or `key=`, `None` when
    /// `key` is absent.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }

    /// True when `key` appears at all (with or without a value).
    pub fn has(&self, key: &str) -> bool {
        self.args.iter().any(|(k, _)| k == key)
    }
}

/// Writes one argument back as command-line text: `key`, `key=value`, or `key="value"` when the
/// value holds whitespace (the kernel has no escape for a quote inside a quoted value).
pub fn format_arg(key: &str, value: Option<&str>) -> String {
    match value {
        None => key.to_owned(),
        Some(value) if value.contains(is_space) => format!("{key}=\"{value}\""),
        Some(value) => format!("{key}={value}"),
    }
}

/// Prefix of the arguments Plinth reads; the build writes `plinth.slot`, `plinth.version`,
/// `plinth.roothash` and `plinth.verity` itself.
pub const RESERVED_PREFIX: &str = "plinth.";

/// The `plinth.*` arguments an image may add to its own command line: tuning knobs Plinth reads
/// but never writes.
pub const SETTABLE: [&str; 2] = ["plinth.disk-timeout", "plinth.update-stage-delay-ms"];

/// Checks that `text` is one argument an image may add to the kernel command line: a single
/// token (it splits into exactly itself: no whitespace, no control characters, no quotes), and
/// not one of Plinth's own `plinth.*` arguments.
pub fn check_image_arg(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("an empty argument: give `key` or `key=value`".to_owned());
    }
    if let Some(c) = text.chars().find(|c| c.is_control() || is_space(*c)) {
        return Err(format!(
            "`{}` holds {c:?}: each entry must be exactly one kernel argument, without whitespace or control characters (give several entries instead)",
            text.escape_debug()
        ));
    }
    if text.contains('"') {
        return Err(format!(
            "`{text}` holds a quote, which the kernel uses to group words: each entry must be one argument without quotes"
        ));
    }
    let key = text.split_once('=').map_or(text, |(k, _)| k);
    if key.is_empty() {
        return Err(format!("`{text}` has no key before `=`"));
    }
    if key.starts_with(RESERVED_PREFIX) && !SETTABLE.contains(&key) {
        return Err(format!(
            "`{key}` is reserved: Plinth writes its own `{RESERVED_PREFIX}*` arguments (use [image] verity = false instead of plinth.verity=off); an image may only add {}",
            SETTABLE.join(", ")
        ));
    }
    Ok(())
}

/// The kernel's `isspace()` (space, `\t`, `\n`, `\v`, `\f`, `\r`).
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// One argument from the start of `text` (which starts with a non-space): its key, its value and
/// the text after it, as the kernel's `next_arg()` does.
fn next_arg(text: &str) -> (&str, Option<&str>, &str) {
    let quoted = text.starts_with('"');
    let word = if quoted { &text[1..] } else { text };
    let bytes = word.as_bytes();
    let mut in_quote = quoted;
    let mut equals = None;
    let mut end = bytes.len();
    for (i, &b) in bytes.iter().enumerate() {
        if is_space(char::from(b)) && !in_quote {
            end = i;
            break;
        }
        if equals.is_none() && b == b'=' {
            equals = Some(i);
        }
        if b == b'"' {
            in_quote = !in_quote;
        }
    }
    // Every index used below is at an ASCII byte (`=`, `"`, whitespace) or the end, so slicing
    // never splits a UTF-8 character.
    let rest = if end < bytes.len() {
        &word[end + 1..]
    } else {
        ""
    };
    let closing_quote = end > 0 && bytes[end - 1] == b'"';
    match equals {
        None => {
            let key_end = if quoted && closing_quote {
                end - 1
            } else {
                end
            };
            (&word[..key_end], None, rest)
        }
        Some(eq) => {
            let mut start = eq + 1;
            let mut stop = end;
            let value_quoted = bytes.get(start) == Some(&b'"') && start < end;
            if value_quoted {
                start += 1;
            }
            if (value_quoted || quoted) && closing_quote {
                stop = end - 1;
            }
            let stop = stop.max(start);
            (&word[..eq], Some(&word[start..stop]), rest)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Vec<(String, Option<String>)> {
        Cmdline::parse(text).args().to_vec()
    }

    fn arg(key: &str, value: Option<&str>) -> (String, Option<String>) {
        (key.to_owned(), value.map(str::to_owned))
    }

    #[test]
    fn splits_like_the_kernel() {
        /// A command line and the arguments it splits into.
        type Case<'a> = (&'a str, &'a [(&'a str, Option<&'a str>)]);
        let cases: &[Case] = &[
            ("", &[]),
            ("  \n", &[]),
            (
                "BOOT_IMAGE=/vmlinuz quiet console=ttyS0\n",
                &[
                    ("BOOT_IMAGE", Some("/vmlinuz")),
                    ("quiet", None),
                    ("console", Some("ttyS0")),
                ],
            ),
            ("msg=\"a b\" x", &[("msg", Some("a b")), ("x", None)]),
            ("\"msg=a b\" x", &[("msg", Some("a b")), ("x", None)]),
            ("\"flag with space\"", &[("flag with space", None)]),
            ("k=", &[("k", Some(""))]),
            ("k=\"\"", &[("k", Some(""))]),
            ("k=\"", &[("k", Some(""))]),
            ("k=a=b", &[("k", Some("a=b"))]),
            // Quotes inside a value stay; they still group words.
            ("k=a\"b c\"d e", &[("k", Some("a\"b c\"d")), ("e", None)]),
            ("a\tb", &[("a", None), ("b", None)]),
            (
                "k=\"unterminated value",
                &[("k", Some("unterminated value"))],
            ),
            ("=x y", &[("y", None)]),
            ("k=é ü", &[("k", Some("é")), ("ü", None)]),
        ];
        for (text, expected) in cases {
            let expected: Vec<_> = expected.iter().map(|(k, v)| arg(k, *v)).collect();
            assert_eq!(split(text), expected, "{text:?}");
        }
    }

    #[test]
    fn arguments_format_back_to_what_splits_the_same() {
        for text in ["quiet", "console=ttyS0", "msg=\"a b\"", "k="] {
            let line = Cmdline::parse(text);
            let (key, value) = &line.args()[0];
            let formatted = format_arg(key, value.as_deref());
            assert_eq!(formatted, text);
            assert_eq!(Cmdline::parse(&formatted), line);
        }
        assert_eq!(format_arg("msg", Some("a b")), "msg=\"a b\"");
    }

    #[test]
    fn image_arguments_are_single_unreserved_tokens() {
        let ok = ["quiet", "console=ttyS0", "plinth.disk-timeout=30", "k="];
        for arg in ok {
            assert_eq!(check_image_arg(arg), Ok(()), "{arg}");
            assert_eq!(Cmdline::parse(arg).args().len(), 1, "{arg}");
        }
        let bad = [
            ("plinth.verity=off", "reserved"),
            ("plinth.roothash=00", "reserved"),
            ("plinth.slot", "reserved"),
            ("a b", "exactly one kernel argument"),
            ("a\nplinth.verity=off", "exactly one kernel argument"),
            ("a\u{7}", "control"),
            ("msg=\"x", "quote"),
            ("", "empty"),
            ("=x", "no key"),
        ];
        for (arg, want) in bad {
            let err = check_image_arg(arg).expect_err(arg);
            assert!(err.contains(want), "{arg:?}: {err}");
        }
    }

    #[test]
    fn the_last_value_wins() {
        let line = Cmdline::parse("plinth.slot=a console=ttyS0 plinth.slot=b quiet plinth.slotx=c");
        assert_eq!(line.value("plinth.slot"), Some("b"));
        assert_eq!(line.value("console"), Some("ttyS0"));
        assert_eq!(line.value("quiet"), Some(""));
        assert_eq!(line.value("plinth.roothash"), None);
        assert!(line.has("quiet"));
        assert!(!line.has("plinth"));
    }

    #[test]
    fn values_are_found_by_whole_key() {
        let line = Cmdline::parse("console=ttyS0 plinth.slot=b plinth.version=2 plinth.slotx=c\n");
        assert_eq!(line.value("plinth.slot"), Some("b"));
        assert_eq!(line.value("plinth.version"), Some("2"));
        assert_eq!(line.value("plinth.roothash"), None);
    }
}
