//! Debian version ordering, as `dpkg --compare-versions` defines it.

use std::cmp::Ordering;

/// Compares two Debian versions (`[epoch:]upstream[-revision]`).
pub fn compare(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| compare_part(ua, ub))
        .then_with(|| compare_part(ra, rb))
}

/// Splits a version into epoch, upstream version and revision.
fn split(version: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match version.split_once(':') {
        Some((epoch, rest)) if epoch.bytes().all(|b| b.is_ascii_digit()) => {
            (epoch.parse().unwrap_or(0), rest)
        }
        _ => (0, version),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

/// Sort weight of one non-digit character: `~` before the end, letters before other symbols.
fn weight(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// dpkg's `verrevcmp`: alternating non-digit and digit runs.
fn compare_part(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let wa = weight(a.get(i).copied().filter(|c| !c.is_ascii_digit()));
            let wb = weight(b.get(j).copied().filter(|c| !c.is_ascii_digit()));
            if wa != wb {
                return wa.cmp(&wb);
            }
            if i < a.len() && !a[i].is_ascii_digit() {
                i += 1;
            }
            if j < b.len() && !b[j].is_ascii_digit() {
                j += 1;
            }
        }
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        let start_i = i;
        let start_j = j;
        while i < a.len() && a[i].is_ascii_digit() {
            i += 1;
        }
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        let (da, db) = (&a[start_i..i], &b[start_j..j]);
        let by_length = da.len().cmp(&db.len());
        if by_length != Ordering::Equal {
            return by_length;
        }
        let by_digits = da.cmp(db);
        if by_digits != Ordering::Equal {
            return by_digits;
        }
    }
    Ordering::Equal
}

/// A version relation in a dependency: `<<`, `<=`, `=`, `>=`, `>>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    Less,
    LessEqual,
    Equal,
    GreaterEqual,
    Greater,
}

impl Relation {
    /// Parses a relation operator; the obsolete `<` and `>` mean `<=` and `>=`.
    pub fn parse(op: &str) -> Option<Relation> {
        Some(match op {
            "<<" => Relation::Less,
            "<=" | "<" => Relation::LessEqual,
            "=" => Relation::Equal,
            ">=" | ">" => Relation::GreaterEqual,
            ">>" => Relation::Greater,
            _ => return None,
        })
    }

    /// Whether `version` stands in this relation to `reference`.
    pub fn holds(self, version: &str, reference: &str) -> bool {
        let ord = compare(version, reference);
        match self {
            Relation::Less => ord == Ordering::Less,
            Relation::LessEqual => ord != Ordering::Greater,
            Relation::Equal => ord == Ordering::Equal,
            Relation::GreaterEqual => ord != Ordering::Less,
            Relation::Greater => ord == Ordering::Greater,
        }
    }

    /// The operator as written in a control file.
    pub fn as_str(self) -> &'static str {
        match self {
            Relation::Less => "<<",
            Relation::LessEqual => "<=",
            Relation::Equal => "=",
            Relation::GreaterEqual => ">=",
            Relation::Greater => ">>",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases checked against `dpkg --compare-versions A lt B`.
    const LESS: &[(&str, &str)] = &[
        ("1.0", "1.1"),
        ("1.0~rc1", "1.0"),
        ("1.0~~", "1.0~"),
        ("1.0~", "1.0"),
        ("1.0", "1.0a"),
        ("1.0a", "1.0+"),
        ("1.0", "1.0-1"),
        ("1.0-1", "1.0-2"),
        ("1.0-9", "1.0-10"),
        ("1:0.1", "2:0.0"),
        ("9.9", "1:0.1"),
        ("2.30-1", "2.31-13+deb11u5"),
        ("20.10.24+dfsg1-1", "20.10.24+dfsg1-1+deb12u1"),
        ("6.1.0-18", "6.1.0-28"),
        ("252.22-1~deb12u1", "252.22-1"),
        ("1.2.3", "1.10"),
        ("0.9", "1.0"),
        ("1.0.0", "1.0.0.1"),
        ("a", "b"),
        ("1.0-1~bpo1", "1.0-1"),
    ];

    #[test]
    fn orders_like_dpkg() {
        for (a, b) in LESS {
            assert_eq!(compare(a, b), Ordering::Less, "{a} < {b}");
            assert_eq!(compare(b, a), Ordering::Greater, "{b} > {a}");
        }
        // Every pair of versions named in these tables, ordered by dpkg itself.
        let mut versions: Vec<&str> = LESS
            .iter()
            .chain(EQUAL)
            .flat_map(|(a, b)| [*a, *b])
            .collect();
        versions.sort_unstable();
        versions.dedup();
        for (i, a) in versions.iter().enumerate() {
            for b in &versions[i..] {
                let dpkg = os_config::oracle::dpkg_compare_versions(a, b);
                assert_eq!(compare(a, b), dpkg, "{a} against {b}, as dpkg orders them");
                assert_eq!(compare(b, a), dpkg.reverse(), "{b} against {a}");
            }
        }
    }

    /// Versions `dpkg --compare-versions A eq B` holds equal.
    const EQUAL: &[(&str, &str)] = &[
        ("1.0", "1.0"),
        ("0:1.0", "1.0"),
        ("1.00", "1.0"),
        ("1.0-0", "1.0-0"),
        ("1.001", "1.1"),
    ];

    #[test]
    fn equal_versions() {
        for (a, b) in EQUAL {
            assert_eq!(compare(a, b), Ordering::Equal, "{a} = {b}");
        }
    }

    #[test]
    fn relations() {
        assert!(Relation::Less.holds("1.0", "1.1"));
        assert!(!Relation::Less.holds("1.1", "1.1"));
        assert!(Relation::LessEqual.holds("1.1", "1.1"));
        assert!(Relation::Equal.holds("0:1.1", "1.1"));
        assert!(Relation::GreaterEqual.holds("1.1~", "1.1~"));
        assert!(!Relation::GreaterEqual.holds("1.1~", "1.1"));
        assert!(Relation::Greater.holds("1:0", "9"));
        assert_eq!(Relation::parse(">"), Some(Relation::GreaterEqual));
        assert_eq!(Relation::parse("!="), None);
    }
}
