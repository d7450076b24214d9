//! Every rule of `Definition::parse`, one row each: a definition that breaks it, the `line:col`
//! of the key or value at fault (found through the parser's spans, never by searching the text),
//! and a fragment of the message saying what is allowed.

use os_config::manifest::SecretKey;
use os_config::Definition;

const HEAD: &str = "[image]\nname = \"demo\"\nversion = \"1.0\"\n";

/// A trusted key that parses.
fn key() -> String {
    SecretKey::from_seed([9; 32]).public().to_string()
}

/// `[update]` with a valid url and key, then `extra`.
fn update(extra: &str) -> String {
    format!(
        "[update]\nurl = \"http://10.0.2.2:8000/r\"\nkeys = [\"{}\"]\n{extra}",
        key()
    )
}

/// `[[container]]` named `name` with image busybox, then `extra`.
fn container(name: &str, extra: &str) -> String {
    format!("[[container]]\nname = \"{name}\"\nimage = \"busybox:1.36\"\n{extra}")
}

/// (body after HEAD, expected line:col, message fragment)
fn cases() -> Vec<(String, (usize, usize), &'static str)> {
    let c = |name, extra| container(name, extra);
    vec![
        // Locations that text search got wrong.
        (
            "# packages = [\"x\"] was tried\n[debian]\npackages = [\"ok-1\", \"x\"]\n".into(),
            (6, 21),
            "not a Debian package name",
        ),
        (
            "[disk]\n# state = \"1MiB\" would be too small\nstate = \"1MiB\"\n".into(),
            (6, 9),
            "at least 64MiB",
        ),
        // [kernel] cmdline
        ("[kernel]\ncmdline = [\"quiet\", \"plinth.verity=off\"]\n".into(), (5, 21), "reserved"),
        ("[kernel]\ncmdline = [\"plinth.roothash=00\"]\n".into(), (5, 12), "reserved"),
        ("[kernel]\ncmdline = [\"a b\"]\n".into(), (5, 12), "exactly one kernel argument"),
        ("[kernel]\ncmdline = [\"a\\nb\"]\n".into(), (5, 12), "exactly one kernel argument"),
        ("[kernel]\ncmdline = ['k=\"x']\n".into(), (5, 12), "quote"),
        // Durations and sizes.
        (
            update("strategy = \"window\"\nwindow = { start = \"02:00\", length = \"5124095576031h\" }\n"),
            (8, 38),
            "8760h (365 days)",
        ),
        ("[disk]\nroot = \"16000000TiB\"\n".into(), (5, 8), "largest allowed is 64TiB"),
        (
            "[disk]\nroot = \"8TiB\"\nstate = \"8TiB\"\n".into(),
            (5, 8),
            "at most 16TiB",
        ),
        // [[file]] paths.
        ("[[file]]\npath = \"/etc\"\ncontent = \"\"\n".into(), (5, 8), "directory every image has"),
        ("[[file]]\npath = \"/usr/bin\"\ncontent = \"\"\n".into(), (5, 8), "directory every image has"),
        ("[[file]]\npath = \"/\"\ncontent = \"\"\n".into(), (5, 8), "directory every image has"),
        ("[[file]]\npath = \"/var/lib/x\"\ncontent = \"\"\n".into(), (5, 8), "mounted over"),
        ("[[file]]\npath = \"/run/x\"\ncontent = \"\"\n".into(), (5, 8), "mounted over"),
        ("[[file]]\npath = \"/etc/a\\u0000b\"\ncontent = \"\"\n".into(), (5, 8), "control"),
        ("[[file]]\npath = \"/etc/a\\nb\"\ncontent = \"\"\n".into(), (5, 8), "control"),
        ("[[file]]\npath = \"//etc/motd\"\ncontent = \"\"\n".into(), (5, 8), "write `/etc/motd`"),
        (
            "[[file]]\npath = \"/etc/motd\"\ncontent = \"\"\n[[file]]\npath = \"/etc/motd\"\ncontent = \"\"\n".into(),
            (8, 8),
            "same file as file[0].path",
        ),
        (
            "[[file]]\npath = \"/usr/bin/x\"\ncontent = \"\"\n[[file]]\npath = \"/bin/x\"\ncontent = \"\"\n".into(),
            (8, 8),
            "same file",
        ),
        (
            "[[file]]\npath = \"/etc/a\"\ncontent = \"\"\n[[file]]\npath = \"/etc/a/b\"\ncontent = \"\"\n".into(),
            (8, 8),
            "folder of the other",
        ),
        ("[[file]]\npath = \"/etc/hostname\"\ncontent = \"x\"\n".into(), (5, 8), "[image] hostname"),
        (
            "[[file]]\npath = \"/etc/x\"\nsource = { url = \"http://h/x\", sha256 = \"".to_owned()
                + &"0".repeat(64)
                + "\" }\n",
            (6, 18),
            "use `path`",
        ),
        ("[[file]]\npath = \"/etc/x\"\nmode = \"+644\"\ncontent = \"\"\n".into(), (6, 8), "octal digits"),
        // [update]
        ("[update]\nurl = \"http://10.0.2.2/r\"\n".into(), (4, 1), "at least one trusted key"),
        ("[update]\nurl = \"http://10.0.2.2/r\"\nkeys = []\n".into(), (6, 8), "at least one trusted key"),
        ("[update]\nurl = \"http://10.0.2.2/r\"\nkeys = [\"ed25519:00\"]\n".into(), (6, 9), "64 hex digits"),
        (
            format!("[update]\nurl = \"http://\"\nkeys = [\"{}\"]\n", key()),
            (5, 7),
            "has no host",
        ),
        (
            format!("[update]\nurl = \"http://h:99999/\"\nkeys = [\"{}\"]\n", key()),
            (5, 7),
            "1-65535",
        ),
        (update("interval = \"0s\"\n"), (7, 12), "at least 10s"),
        (
            update("strategy = \"window\"\nwindow = { start = \"+2:00\", length = \"1h\" }\n"),
            (8, 20),
            "HH:MM",
        ),
        (update("bless-after = \"20m\"\n"), (7, 15), "longer than bless-after"),
        (update("bless-timeout = \"1s\"\n"), (7, 17), "longer than bless-after"),
        // Names and values.
        (c("a", "build = { packages = [\"Busy Box\"] }\n"), (7, 23), "not a Debian package name"),
        ("[kernel]\nmodules = [\"../../../etc/passwd\"]\n".into(), (5, 12), "not a kernel module name"),
        ("[kernel]\ninclude-modules = [\"xfs\", \"a/b\"]\n".into(), (5, 27), "not a kernel module name"),
        ("[kernel]\nplatforms = [\"qemu\", \"vmware\"]\n".into(), (5, 22), "`qemu`, `aws`, `gcp`, `azure`, `metal`"),
        ("[kernel]\nplatforms = [\"aws\", \"aws\"]\n".into(), (5, 21), "listed twice"),
        ("[debian]\nsuite = \"..\"\n".into(), (5, 9), "not a Debian suite name"),
        ("[debian]\ncomponents = [\"main\", \"non free\"]\n".into(), (5, 23), "component"),
        ("[[container]]\nname = \"a\"\nimage = \"\"\n".into(), (6, 9), "not an image reference"),
        ("[[container]]\nname = \"a\"\nimage = \"UPPER CASE::bad ref\"\n".into(), (6, 9), "not an image reference"),
        (c("a", "env = { \"A=B\" = \"1\" }\n"), (7, 9), "environment variable name"),
        (c("a", "env = { \"\" = \"1\" }\n"), (7, 9), "environment variable name"),
        ("[network]\nmode = \"static\"\naddress = \"not-an-ip\"\n".into(), (6, 11), "prefix length"),
        ("[network]\nmode = \"static\"\naddress = \"10.0.2.15/24\"\ngateway = \"10.0.2\"\n".into(), (7, 11), "IPv4"),
        ("[network]\nmode = \"static\"\naddress = \"10.0.2.15/24\"\ndns = [\"x\"]\n".into(), (7, 8), "IPv4"),
        ("[image]\nhostname = \"my_host\"\n".into(), (4, 12), "host name"),
        ("[[container]]\nname = \"a\"\nimage = \"busybox\"\nports = [\"+8080:+80\"]\n".into(), (7, 10), "digits 1-65535"),
        (
            c("a", "ports = [\"8080:80\"]\n") + &c("b", "ports = [\"53:53/udp\", \"8080:81\"]\n"),
            (11, 23),
            "already published by container[0].ports[0]",
        ),
        (c("a", "mounts = [\"/var/lib/a:/a:z\"]\n"), (7, 11), "not supported"),
        (c("a", "mounts = [\"/var/lib/../../etc:/a\"]\n"), (7, 11), "write `/etc`"),
        (c("a", "health = { command = [] }\n"), (7, 22), "give the command"),
        (c("a", "health = { command = [\"true\"], interval = \"0s\" }\n"), (7, 43), "at least 1s"),
        (c("a", "health = { command = [\"true\"], retries = 0 }\n"), (7, 42), "at least 1"),
        (
            c("a", "name = \"x\"\n").replace("name = \"x\"\n", "") + &c("a", ""),
            (8, 8),
            "declared twice",
        ),
    ]
}

#[test]
fn every_rule_names_the_line_column_and_what_is_allowed() {
    let mut failures = Vec::new();
    for (body, (line, col), fragment) in cases() {
        // `[image] hostname` replaces HEAD's table: the row gives its own.
        let source = if body.starts_with("[image]") {
            format!(
                "[image]\nname = \"demo\"\nversion = \"1.0\"\n{}",
                &body[8..]
            )
        } else {
            format!("{HEAD}{body}")
        };
        let Err(err) = Definition::parse("t.toml", &source) else {
            failures.push(format!("accepted:\n{source}"));
            continue;
        };
        let at = source
            .lines()
            .nth(err.location.map_or(0, |l| l.0 - 1))
            .unwrap_or("");
        if err.location != Some((line, col)) || !err.message.contains(fragment) {
            failures.push(format!(
                "{source}→ {err}\n   want {line}:{col} `{fragment}`; line is `{at}`\n"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn valid_forms_still_pass() {
    let body = format!(
        "[network]\nmode = \"static\"\naddress = \"10.0.2.15/24\"\ngateway = \"10.0.2.2\"\ndns = [\"10.0.2.3\"]\n\
         {}\
         [[container]]\nname = \"a\"\nimage = \"registry.example:5000/team/app:v1.2\"\nports = [\"8080:80\", \"8080:80/udp\"]\n\
         mounts = [\"/var/lib/a:/data:ro\"]\nenv = {{ PATH = \"/bin\" }}\n\
         [[file]]\npath = \"/usr/lib/plinth/hook\"\nmode = \"0700\"\ncontent = \"\"\n",
        update("interval = \"10s\"\n").replace("http://10.0.2.2:8000/r", "http://[::1]:8080/")
    );
    Definition::parse("t.toml", &format!("{HEAD}{body}")).expect("valid definition");
}

#[test]
fn invalid_utf8_names_the_first_bad_byte() {
    let mut bytes = HEAD.as_bytes().to_vec();
    bytes.extend_from_slice(b"[debian]\nsuite = \"bo\xffkworm\"\n");
    let err = Definition::parse_bytes("t.toml", &bytes).expect_err("bad byte");
    assert_eq!(err.location, Some((5, 12)), "{err}");
    assert!(
        err.to_string().starts_with("t.toml:5:12: invalid UTF-8"),
        "{err}"
    );
}
