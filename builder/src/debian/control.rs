//! Debian control-file syntax (deb822): paragraphs of `Field: value` lines, used by `Packages`,
//! `InRelease` and apt's `.sources` files.

/// One paragraph: fields in file order; names compare case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paragraph {
    pub fields: Vec<(String, String)>,
}

impl Paragraph {
    /// The value of a field, continuation lines joined with `\n`, or `None` if absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Splits control text into paragraphs. Comment lines (`#`) are skipped; a continuation line
/// (leading space or tab) extends the previous field; ` .` stands for an empty line.
pub fn parse(text: &str) -> Result<Vec<Paragraph>, String> {
    let mut paragraphs = Vec::new();
    let mut current = Paragraph::default();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            if !current.fields.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let Some((_, value)) = current.fields.last_mut() else {
                return Err(format!(
                    "line {}: continuation line without a field: `{line}`",
                    number + 1
                ));
            };
            let rest = line.trim();
            value.push('\n');
            if rest != "." {
                value.push_str(rest);
            }
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!(
                "line {}: expected `Field: value`, found `{line}`",
                number + 1
            ));
        };
        current
            .fields
            .push((key.trim().to_owned(), value.trim().to_owned()));
    }
    if !current.fields.is_empty() {
        paragraphs.push(current);
    }
    Ok(paragraphs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_fields_and_continuations() {
        let text = "Package: a\nVersion: 1.0\nDescription: short\n long line\n .\n more\n\n\n# note\nPackage: b\ndepends:  c (>= 1)  \n";
        let paragraphs = parse(text).expect("parses");
        assert_eq!(paragraphs.len(), 2);
        assert_eq!(paragraphs[0].get("package"), Some("a"));
        assert_eq!(
            paragraphs[0].get("Description"),
            Some("short\nlong line\n\nmore")
        );
        assert_eq!(paragraphs[1].get("Depends"), Some("c (>= 1)"));
        assert_eq!(paragraphs[1].get("Version"), None);
    }

    #[test]
    fn value_with_colons_and_empty_first_line() {
        let paragraphs =
            parse("SHA256:\n abc 1 main/x\n def 2 main/y\nURIs: http://h:80/d\n").expect("parses");
        assert_eq!(
            paragraphs[0].get("SHA256"),
            Some("\nabc 1 main/x\ndef 2 main/y")
        );
        assert_eq!(paragraphs[0].get("URIs"), Some("http://h:80/d"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse(" orphan\n").is_err());
        assert!(parse("Package a\n").is_err());
    }
}
