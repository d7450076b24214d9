//! The Debian source against a small signed archive served on 127.0.0.1: locking, signature and
//! checksum checks, the cache's repair of corrupted files, and offline builds.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use builder::cache::Cache;
use builder::debian::{self, lock, sources, Lockfile};
use os_config::Definition;
use sha2::{Digest, Sha256};

/// One package of the test archive: (name, version, suite, extra control fields).
type Spec = (&'static str, &'static str, &'static str, &'static str);

const PACKAGES: &[Spec] = &[
    ("linux-image-cloud-amd64", "6.1.0-1", "bookworm", "Depends: linux-image-6.1.0-1-cloud-amd64 (= 6.1.0-1)"),
    ("linux-image-6.1.0-1-cloud-amd64", "6.1.0-1", "bookworm", "Depends: kmod, linux-base (>= 4.3~)"),
    ("kmod", "30+20221128-1", "bookworm", "Depends: libc6 (>= 2.34)"),
    ("linux-base", "4.9", "bookworm", "Architecture: all"),
    ("systemd-boot-efi", "252.30-1~deb12u2", "bookworm", ""),
    ("docker.io", "20.10.24+dfsg1-1+b3", "bookworm", "Depends: containerd (>= 1.4~), runc (>= 1.0.0~rc9~), tini | dumb-init, iptables, libc6 (>= 2.34), adduser"),
    ("docker.io", "20.10.24+dfsg1-1+deb12u1", "bookworm-security", "Depends: containerd (>= 1.4~), runc (>= 1.0.0~rc9~), tini | dumb-init, iptables, libc6 (>= 2.34), adduser"),
    ("containerd", "1.6.20~ds1-1+b1", "bookworm", "Depends: runc (>= 1.0.0~rc2~), libc6:any (>= 2.34)"),
    ("runc", "1.1.5+ds1-1+deb12u1", "bookworm", "Depends: libseccomp2 (>= 2.5.0)"),
    ("tini", "0.19.0-1", "bookworm", ""),
    ("dumb-init", "1.2.5-2", "bookworm", ""),
    ("iptables", "1.8.9-2", "bookworm", "Pre-Depends: libxtables12-abi\nDepends: netbase"),
    ("libxtables12", "1.8.9-2", "bookworm", "Provides: libxtables12-abi (= 1.8.9)"),
    ("netbase", "6.4", "bookworm", "Architecture: all"),
    ("adduser", "3.134", "bookworm", "Architecture: all\nDepends: passwd | shadow-provider"),
    ("login-shadow", "1:4.13", "bookworm", "Provides: shadow-provider"),
    ("libseccomp2", "2.5.4-1+b3", "bookworm", "Depends: libc6 (>= 2.14)"),
    ("libc6", "2.36-9+deb12u4", "bookworm", ""),
    ("libc6", "2.36-9+deb12u9", "bookworm-security", ""),
    ("ca-certificates", "20230311", "bookworm", "Architecture: all"),
    ("ca-certificates", "20230311+deb12u1", "bookworm-updates", "Architecture: all"),
    ("busybox-static", "1:1.35.0-4+b3", "bookworm", ""),
    ("arm-only", "1.0", "bookworm", "Architecture: arm64"),
];

/// The resolved set: (name, version, suite).
const EXPECTED: &[(&str, &str, &str)] = &[
    ("adduser", "3.134", "bookworm"),
    ("busybox-static", "1:1.35.0-4+b3", "bookworm"),
    ("ca-certificates", "20230311+deb12u1", "bookworm-updates"),
    ("containerd", "1.6.20~ds1-1+b1", "bookworm"),
    ("docker.io", "20.10.24+dfsg1-1+deb12u1", "bookworm-security"),
    ("iptables", "1.8.9-2", "bookworm"),
    ("kmod", "30+20221128-1", "bookworm"),
    ("libc6", "2.36-9+deb12u9", "bookworm-security"),
    ("libseccomp2", "2.5.4-1+b3", "bookworm"),
    ("libxtables12", "1.8.9-2", "bookworm"),
    ("linux-base", "4.9", "bookworm"),
    ("linux-image-6.1.0-1-cloud-amd64", "6.1.0-1", "bookworm"),
    ("linux-image-cloud-amd64", "6.1.0-1", "bookworm"),
    ("login-shadow", "1:4.13", "bookworm"),
    ("netbase", "6.4", "bookworm"),
    ("runc", "1.1.5+ds1-1+deb12u1", "bookworm"),
    ("systemd-boot-efi", "252.30-1~deb12u2", "bookworm"),
    ("tini", "0.19.0-1", "bookworm"),
];

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?} (is gnupg installed?): {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A gzip-compressed tar with one file.
fn tar_gz(path: &str, data: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder
        .append_data(&mut header, path, data)
        .expect("tar entry");
    builder.into_inner().expect("tar").finish().expect("gzip")
}

/// A real (tiny) `.deb`: `debian-binary`, `control.tar.gz`, `data.tar.gz`.
fn deb(name: &str, version: &str, arch: &str) -> Vec<u8> {
    let control = format!(
        "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: t <t@invalid>\nDescription: test package\n"
    );
    let members = [
        ("debian-binary", b"2.0\n".to_vec()),
        ("control.tar.gz", tar_gz("./control", control.as_bytes())),
        (
            "data.tar.gz",
            tar_gz(
                &format!("./usr/share/doc/{name}/version"),
                version.as_bytes(),
            ),
        ),
    ];
    let mut builder = ar::Builder::new(Vec::new());
    for (member, data) in members {
        let header = ar::Header::new(member.as_bytes().to_vec(), data.len() as u64);
        builder.append(&header, data.as_slice()).expect("ar member");
    }
    builder.into_inner().expect("ar")
}

/// A throw-away signing key, its exported keyring, and a test archive on disk.
struct Archive {
    dir: tempfile::TempDir,
    gnupghome: PathBuf,
}

impl Archive {
    fn root(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    fn keyring(&self) -> PathBuf {
        self.dir.path().join("keyring.gpg")
    }

    fn gpg(&self) -> Command {
        let mut command = Command::new("gpg");
        command.env("GNUPGHOME", &self.gnupghome).args([
            "--batch",
            "--yes",
            "--quiet",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ]);
        command
    }

    fn new() -> Archive {
        let dir = tempfile::tempdir().expect("tempdir");
        let gnupghome = dir.path().join("gnupg");
        std::fs::create_dir(&gnupghome).expect("mkdir");
        let archive = Archive { dir, gnupghome };
        run(archive.gpg().args([
            "--quick-gen-key",
            "Plinth Test Archive <archive@invalid>",
            "ed25519",
            "sign",
            "never",
        ]));
        run(archive
            .gpg()
            .arg("--output")
            .arg(archive.keyring())
            .arg("--export"));

        let mut by_suite: BTreeMap<&str, String> = BTreeMap::new();
        for (name, version, suite, extra) in PACKAGES {
            let arch = if extra.contains("Architecture: all") {
                "all"
            } else if extra.contains("Architecture: arm64") {
                "arm64"
            } else {
                "amd64"
            };
            let (base, pool) = if suite.ends_with("-security") {
                ("security", "pool/updates/main")
            } else {
                ("debian", "pool/main")
            };
            let file_version = version.split_once(':').map_or(*version, |(_, v)| v);
            let filename = format!(
                "{pool}/{}/{name}/{name}_{file_version}_{arch}.deb",
                &name[..1]
            );
            let data = deb(name, version, arch);
            let path = archive.root().join(base).join(&filename);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, &data).expect("write deb");
            let extra: String = extra
                .lines()
                .filter(|l| !l.starts_with("Architecture:"))
                .map(|l| format!("{l}\n"))
                .collect();
            by_suite.entry(suite).or_default().push_str(&format!(
                "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: t <t@invalid>\n{extra}Filename: {filename}\nSize: {}\nSHA256: {}\nDescription: test package\n\n",
                data.len(),
                sha256(&data)
            ));
        }
        for suite in ["bookworm", "bookworm-updates", "bookworm-security"] {
            let base = if suite.ends_with("-security") {
                "security"
            } else {
                "debian"
            };
            let packages = by_suite.get(suite).cloned().unwrap_or_default();
            archive.write_suite(base, suite, &packages);
        }
        archive
    }

    /// Writes `dists/<suite>/` with a `Packages.xz` and a signed `InRelease`.
    fn write_suite(&self, base: &str, suite: &str, packages: &str) {
        let dists = self.root().join(base).join("dists").join(suite);
        let index = dists.join("main/binary-amd64");
        std::fs::create_dir_all(&index).expect("mkdir");
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(packages.as_bytes()).expect("xz");
        let xz = xz.finish().expect("xz");
        std::fs::write(index.join("Packages.xz"), &xz).expect("write");
        let release = format!(
            "Origin: Test\nLabel: Test\nSuite: stable{}\nCodename: {suite}\nDate: Sat, 10 Jun 2023 08:55:33 UTC\nValid-Until: Fri, 01 Jan 2100 00:00:00 UTC\nArchitectures: amd64 arm64\nComponents: main\nNo-Support-for-Architecture-all: Packages\nSHA256:\n {} {:>8} main/binary-amd64/Packages.xz\n {} {:>8} main/binary-amd64/Packages\n",
            suite.strip_prefix("bookworm").unwrap_or(""),
            sha256(&xz),
            xz.len(),
            sha256(packages.as_bytes()),
            packages.len()
        );
        let plain = dists.join("Release");
        std::fs::write(&plain, release).expect("write");
        run(self
            .gpg()
            .arg("--output")
            .arg(dists.join("InRelease"))
            .arg("--clearsign")
            .arg(&plain));
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        // Stops the agent gpg started for this throw-away home; failure only leaves it idle.
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", &self.gnupghome)
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

/// A static file server over the archive folder, counting the `.deb` requests it answers.
struct Server {
    port: u16,
    debs: Arc<AtomicUsize>,
    server: Arc<tiny_http::Server>,
}

impl Server {
    fn start(root: PathBuf) -> Server {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("listen"));
        let port = server.server_addr().to_ip().expect("ip").port();
        let debs = Arc::new(AtomicUsize::new(0));
        let (thread_server, thread_debs) = (server.clone(), debs.clone());
        std::thread::spawn(move || {
            for request in thread_server.incoming_requests() {
                let path = request.url().trim_start_matches('/').to_owned();
                if path.ends_with(".deb") {
                    thread_debs.fetch_add(1, Ordering::SeqCst);
                }
                let file = if path.split('/').any(|p| p == "..") {
                    None
                } else {
                    std::fs::File::open(root.join(&path)).ok()
                };
                // A client that hung up is no concern of the server.
                let _ = match file {
                    Some(file) => request.respond(tiny_http::Response::from_file(file)),
                    None => request.respond(tiny_http::Response::empty(404)),
                };
            }
        });
        Server { port, debs, server }
    }

    fn debs(&self) -> usize {
        self.debs.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// An archive, its server, and an image definition pointing at them.
struct Fixture {
    archive: Archive,
    server: Server,
    work: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let archive = Archive::new();
        let server = Server::start(archive.root());
        let work = tempfile::tempdir().expect("tempdir");
        let fixture = Fixture {
            archive,
            server,
            work,
        };
        fixture.write_definition(fixture.server.port);
        fixture
    }

    fn def_path(&self) -> PathBuf {
        self.work.path().join("img.toml")
    }

    fn write_definition(&self, port: u16) {
        let text = format!(
            "[image]\nname = \"t\"\nversion = \"1.0.0\"\n[debian]\nsuite = \"bookworm\"\nmirror = \"http://127.0.0.1:{port}/debian/\"\nsecurity-mirror = \"http://127.0.0.1:{port}/security\"\nkeyring = \"{}\"\n[[container]]\nname = \"web\"\nimage = \"t/busybox:1\"\nbuild = {{ packages = [\"busybox-static\"] }}\n",
            self.archive.keyring().display()
        );
        std::fs::write(self.def_path(), text).expect("write definition");
    }

    fn definition(&self) -> Definition {
        let text = std::fs::read_to_string(self.def_path()).expect("read definition");
        Definition::parse("img.toml", &text).expect("definition")
    }

    fn cache_args(&self, offline: bool) -> builder::cache::Options {
        builder::cache::Options {
            dir: Some(self.work.path().join("cache")),
            offline,
        }
    }

    fn lock(&self, update: bool) -> anyhow::Result<()> {
        debian::lock_command(&debian::LockOptions {
            file: self.def_path(),
            update,
            cache: self.cache_args(false),
        })
    }

    fn load_lock(&self) -> Lockfile {
        debian::load_lock(&self.definition(), &self.def_path()).expect("lock loads")
    }

    fn fetch(&self, offline: bool) -> anyhow::Result<Vec<debian::FetchedPackage>> {
        debian::fetch_packages(
            &self.load_lock(),
            &self.definition(),
            &self.cache_args(offline),
        )
    }

    fn suite_file(&self, base: &str, suite: &str, file: &str) -> PathBuf {
        self.archive
            .root()
            .join(base)
            .join("dists")
            .join(suite)
            .join(file)
    }
}

#[test]
fn lock_resolves_across_suites_and_is_stable() {
    let fixture = Fixture::new();
    let lock_path = lock::lock_path(&fixture.def_path());
    assert_eq!(lock_path, fixture.work.path().join("img.lock"));
    fixture.lock(false).expect("lock");
    let lock = fixture.load_lock();
    let got: Vec<(&str, &str, &str)> = lock
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str(), p.suite.as_str()))
        .collect();
    assert_eq!(got, EXPECTED);
    assert_eq!(lock.roots, debian::roots(&fixture.definition()));
    assert_eq!(lock.suite, "bookworm");
    let docker = lock
        .packages
        .iter()
        .find(|p| p.name == "docker.io")
        .expect("docker.io");
    assert_eq!(
        docker.filename,
        "pool/updates/main/d/docker.io/docker.io_20.10.24+dfsg1-1+deb12u1_amd64.deb"
    );
    let on_disk = std::fs::read(
        fixture
            .archive
            .root()
            .join("security")
            .join(&docker.filename),
    )
    .expect("deb");
    assert_eq!(docker.sha256, sha256(&on_disk));
    assert_eq!(docker.size, on_disk.len() as u64);
    let text = std::fs::read_to_string(&lock_path).expect("lock text");
    assert!(
        !text.contains("127.0.0.1"),
        "the lock names no host:\n{text}"
    );

    // An up-to-date lock is kept as it is; --update resolves again, to the same bytes.
    std::fs::write(&lock_path, format!("{text}\n")).expect("mark");
    fixture.lock(false).expect("lock again");
    assert_eq!(
        std::fs::read_to_string(&lock_path).expect("lock text"),
        format!("{text}\n"),
        "an up-to-date lock is not rewritten"
    );
    fixture.lock(true).expect("lock --update");
    assert_eq!(
        std::fs::read_to_string(&lock_path).expect("lock text"),
        text
    );
    let parsed = Lockfile::parse("img.lock", &text).expect("parse");
    assert_eq!(parsed.to_text().expect("text"), text);

    let leftovers: Vec<_> = std::fs::read_dir(fixture.work.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".plinth-lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn tampered_inrelease_is_refused() {
    let fixture = Fixture::new();
    let inrelease = fixture.suite_file("debian", "bookworm-updates", "InRelease");
    let text = std::fs::read_to_string(&inrelease).expect("read");
    assert!(text.contains("Label: Test"));
    std::fs::write(&inrelease, text.replace("Label: Test", "Label: Evil")).expect("write");
    let err = fixture.lock(false).expect_err("tampered InRelease");
    let message = format!("{err:#}");
    assert!(
        message.contains("signature") && message.contains("bookworm-updates/InRelease"),
        "{message}"
    );
    assert!(!fixture.work.path().join("img.lock").exists());
}

#[test]
fn inrelease_signed_by_an_unknown_key_is_refused() {
    let fixture = Fixture::new();
    let other = Archive::new();
    std::fs::copy(other.keyring(), fixture.archive.keyring()).expect("swap keyring");
    let err = fixture.lock(false).expect_err("unknown key");
    assert!(format!("{err:#}").contains("signature"), "{err:#}");
}

#[test]
fn tampered_packages_index_is_refused() {
    let fixture = Fixture::new();
    let index = fixture.suite_file(
        "security",
        "bookworm-security",
        "main/binary-amd64/Packages.xz",
    );
    let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(
        b"Package: evil\nVersion: 9\nArchitecture: amd64\nFilename: x.deb\nSize: 1\nSHA256: 00\n",
    )
    .expect("xz");
    std::fs::write(&index, xz.finish().expect("xz")).expect("write");
    let err = fixture.lock(false).expect_err("tampered Packages");
    let message = format!("{err:#}");
    assert!(
        message.contains("bookworm-security/main/binary-amd64/Packages.xz"),
        "{message}"
    );
    assert!(message.contains("expected"), "{message}");
    assert!(!fixture.work.path().join("img.lock").exists());
}

#[test]
fn fetch_verifies_repairs_corruption_and_works_offline() {
    let fixture = Fixture::new();
    fixture.lock(false).expect("lock");

    // Cold cache, offline: fails naming what is missing, without a single request.
    let err = fixture.fetch(true).expect_err("cold offline");
    let message = format!("{err:#}");
    assert!(
        message.contains("offline") && message.contains("docker.io 20.10.24+dfsg1-1+deb12u1"),
        "{message}"
    );
    assert_eq!(fixture.server.debs(), 0);

    let fetched = fixture.fetch(false).expect("fetch");
    assert_eq!(fixture.server.debs(), EXPECTED.len());
    let names: Vec<&str> = fetched.iter().map(|p| p.name.as_str()).collect();
    let expected: Vec<&str> = EXPECTED.iter().map(|e| e.0).collect();
    assert_eq!(names, expected);
    let lock = fixture.load_lock();
    for (package, locked) in fetched.iter().zip(&lock.packages) {
        let data = std::fs::read(&package.path).expect("cached deb");
        assert_eq!(sha256(&data), locked.sha256, "{}", package.name);
        assert_eq!(data[..8], *b"!<arch>\n", "{}", package.name);
        assert_eq!(package.version, locked.version);
    }

    // Warm cache, offline: works without a request.
    assert_eq!(fixture.fetch(true).expect("warm offline"), fetched);
    assert_eq!(fixture.server.debs(), EXPECTED.len());

    // A corrupted cached file is detected, deleted and fetched again (one more request).
    let tini = fetched.iter().find(|p| p.name == "tini").expect("tini");
    std::fs::write(&tini.path, b"bit rot").expect("corrupt");
    let again = fixture.fetch(false).expect("fetch after corruption");
    assert_eq!(fixture.server.debs(), EXPECTED.len() + 1);
    assert_eq!(again, fetched);
    let data = std::fs::read(&tini.path).expect("repaired");
    let locked_tini = lock
        .packages
        .iter()
        .find(|p| p.name == "tini")
        .expect("tini");
    assert_eq!(sha256(&data), locked_tini.sha256);

    // Corrupted and offline: detected and reported as missing, never used.
    std::fs::write(&tini.path, b"bit rot").expect("corrupt");
    let err = fixture.fetch(true).expect_err("corrupt offline");
    assert!(format!("{err:#}").contains("tini 0.19.0-1"), "{err:#}");
    assert!(!tini.path.exists());
}

#[test]
fn superseded_pool_file_names_the_update_command() {
    let fixture = Fixture::new();
    fixture.lock(false).expect("lock");
    let lock = fixture.load_lock();
    let runc = lock
        .packages
        .iter()
        .find(|p| p.name == "runc")
        .expect("runc");
    std::fs::remove_file(fixture.archive.root().join("debian").join(&runc.filename))
        .expect("remove");
    let err = fixture.fetch(false).expect_err("gone");
    let message = format!("{err:#}");
    assert!(
        message.contains(&format!(
            "plinth lock --update {}",
            fixture.def_path().display()
        )),
        "{message}"
    );
    assert!(message.contains("runc 1.1.5+ds1-1+deb12u1"), "{message}");
    assert!(message.contains("404"), "{message}");
}

#[test]
fn unreachable_mirror_is_named() {
    let fixture = Fixture::new();
    fixture.lock(false).expect("lock");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    fixture.write_definition(port);
    let err = fixture.fetch(false).expect_err("unreachable");
    let message = format!("{err:#}");
    assert!(
        message.contains("unreachable") && message.contains(&format!("127.0.0.1:{port}")),
        "{message}"
    );

    // With every package cached, `plinth lock --update` says the offline build still works.
    fixture.write_definition(fixture.server.port);
    fixture.fetch(false).expect("fetch");
    fixture.write_definition(port);
    let err = fixture.lock(true).expect_err("unreachable lock");
    let message = format!("{err:#}");
    assert!(
        message.contains("unreachable") && message.contains("plinth build --offline"),
        "{message}"
    );
}

#[test]
fn unknown_package_names_the_suites() {
    let fixture = Fixture::new();
    let text = std::fs::read_to_string(fixture.def_path()).expect("read");
    std::fs::write(
        fixture.def_path(),
        text.replace(
            "suite = \"bookworm\"\n",
            "suite = \"bookworm\"\npackages = [\"no-such-thing\"]\n",
        ),
    )
    .expect("write");
    let err = fixture.lock(false).expect_err("unknown package");
    let message = format!("{err:#}");
    assert!(message.contains("`no-such-thing`"), "{message}");
    assert!(
        message.contains("bookworm, bookworm-updates, bookworm-security"),
        "{message}"
    );
}

#[test]
fn host_apt_sources_name_the_mirrors() {
    let fixture = Fixture::new();
    let port = fixture.server.port;
    let apt = fixture.work.path().join("apt");
    let list_d = apt.join("sources.list.d");
    std::fs::create_dir_all(&list_d).expect("mkdir");
    std::fs::write(
        list_d.join("archive.sources"),
        format!("Types: deb\nURIs: http://127.0.0.1:{port}/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"),
    )
    .expect("write");
    std::fs::write(
        apt.join("sources.list"),
        format!("deb [signed-by=/k.gpg] http://127.0.0.1:{port}/security bookworm-security main\n"),
    )
    .expect("write");
    // Files apt ignores are ignored here too: this one would send security to a dead port.
    std::fs::write(
        list_d.join("dead.list.disabled"),
        "deb http://127.0.0.1:9/dead bookworm-security main\n",
    )
    .expect("write");
    let text = std::fs::read_to_string(fixture.def_path()).expect("read");
    let text: String = text
        .lines()
        .filter(|l| !l.contains("mirror ="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(fixture.def_path(), text).expect("write");
    let def = fixture.definition();
    assert!(def.debian.mirror.is_none() && def.debian.security_mirror.is_none());

    let mirrors = sources::mirrors_with_env(&def, &apt, |_| None).expect("mirrors");
    assert_eq!(
        mirrors.url_of("bookworm-security"),
        Some(format!("http://127.0.0.1:{port}/security").as_str())
    );
    let cache = Cache::at(fixture.work.path().join("cache"), false).expect("cache");
    let lock = debian::resolve_lock(&def, &fixture.def_path(), &mirrors, &cache).expect("lock");
    let got: Vec<(&str, &str, &str)> = lock
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str(), p.suite.as_str()))
        .collect();
    assert_eq!(got, EXPECTED);
}
