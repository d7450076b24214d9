//! One image, many instances, under QEMU (OVMF, TCG): `images/cloud.toml` built once, then booted
//! with its instance data coming from each kind of source, nothing leaving the machine.
//!
//! - fw_cfg (`opt/plinth/user-data`): Plinth user data sets the host name, replaces the image's
//!   container with its own version and turns on the Engine API over mutual TLS on 2376, with
//!   certificates in the user data. Through `hostfwd`, curl with a client certificate from that CA
//!   runs a container; curl without a certificate, or with one from another CA, is refused.
//! - NoCloud on a vfat volume labelled `cidata`: `#cloud-config` user data is reported as ignored,
//!   the meta-data's host name and the network-config's static address are applied; on an iso9660
//!   volume: invalid Plinth user data is
//!   reported with its line and column, and the image's own container still runs.
//! - EC2 (IMDSv2), GCE and Azure: fake metadata servers on 127.0.0.1, which the guest reaches at
//!   169.254.169.254 through `guestfwd` (its user network is 168.0.0.0/7), and SMBIOS strings
//!   that name the platform. The EC2 server refuses any request without a session token; the
//!   Azure guest reports ready to a fake wire server at 168.63.129.16.
//! - Time: a guest whose clock starts in 2015 sets it from an SNTP server that DHCP option 42
//!   names; both run in a network namespace of the test, on a bridge only this machine has.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use os_config::userdata::FW_CFG_USER_DATA;
use qemu_tests::netns::NetNs;
use qemu_tests::{free_port, image, Vm, VmOptions};

/// From QEMU start to a running container, under TCG on a busy machine.
const BOOT: Duration = Duration::from_secs(420);
/// The image's container image, which the user data's containers use too.
const DEMO_IMAGE: &str = "plinth/busybox:1";

/// `images/cloud.toml`, built once for every test of this file.
fn cloud_image() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = image::workspace();
            image::build(
                &root.join("images/cloud.toml"),
                &root.join("images/cloud.lock"),
            )
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("building images/cloud.toml: {e}"))
}

/// A guest of the cloud image on a throw-away overlay.
fn guest() -> Result<VmOptions> {
    let mut opts = VmOptions::new(cloud_image()?);
    opts.snapshot = true;
    Ok(opts)
}

/// Runs a host tool, failing with its output.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A field of a status line, or "".
fn field<'a>(fields: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    fields.get(key).map_or("", String::as_str)
}

/// Waits for `provisioned` and checks its source and what became of the user data.
fn expect_provisioned(vm: &mut Vm, source: &str, user_data: &str) -> Result<()> {
    let provisioned = vm.wait_status("provisioned", BOOT)?;
    ensure!(
        field(&provisioned, "source") == source && field(&provisioned, "user-data") == user_data,
        "expected provisioned source={source} user-data={user_data}, got {provisioned:?}"
    );
    Ok(())
}

/// Waits for the host name plinth-init sets from the instance data.
fn expect_hostname(vm: &mut Vm, name: &str) -> Result<()> {
    let set = vm.wait_status("hostname", BOOT)?;
    ensure!(
        field(&set, "name") == name,
        "expected host name {name}, got {set:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// fw_cfg and mutual TLS

/// A CA, a certificate it signs for `names` (or a client certificate when empty), as PEM.
struct Pki {
    ca: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Result<Pki> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = params.self_signed(&key)?;
        Ok(Pki { ca, key })
    }

    /// (certificate, key) PEM signed by this CA: a server certificate for `names`, or a client
    /// certificate when `names` is empty.
    fn issue(&self, names: &[&str]) -> Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.extended_key_usages = if names.is_empty() {
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]
        };
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "plinth test");
        let cert = params.signed_by(&key, &self.ca, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// curl against the engine on 127.0.0.1:`port` over TLS; `client` is a (cert, key) file pair.
fn engine_curl(
    dir: &Path,
    port: u16,
    client: Option<(&Path, &Path)>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "60", "-X", method])
        .arg("--cacert")
        .arg(dir.join("ca.pem"));
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data", body]);
    }
    cmd.arg(format!("https://127.0.0.1:{port}{path}"));
    let out = cmd.output().context("running curl")?;
    if !out.status.success() {
        bail!(
            "curl {method} {path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn fw_cfg_user_data_names_the_host_replaces_a_container_and_opens_the_engine_over_mutual_tls(
) -> Result<()> {
    let work_dir = tempfile::tempdir()?;
    let work = work_dir.path();
    let pki = Pki::new("Plinth test engine CA")?;
    let (server_cert, server_key) = pki.issue(&["127.0.0.1", "localhost"])?;
    let (client_cert, client_key) = pki.issue(&[])?;
    let other = Pki::new("Another CA")?;
    let (other_cert, other_key) = other.issue(&[])?;
    for (name, text) in [
        ("ca.pem", pki.ca.pem()),
        ("client.pem", client_cert),
        ("client-key.pem", client_key),
        ("other.pem", other_cert),
        ("other-key.pem", other_key),
    ] {
        std::fs::write(work.join(name), text)?;
    }
    let user_data = format!(
        "#plinth\nhostname = \"fw-guest\"\n\n[engine.tls]\nca = '''\n{}'''\ncert = '''\n{server_cert}'''\nkey = '''\n{server_key}'''\n\n\
         [[container]]\nname = \"web\"\nimage = \"{DEMO_IMAGE}\"\n\
         command = [\"/bin/busybox\", \"sh\", \"-c\", \"mkdir -p /www; echo '<h1>Hello from user data</h1>' > /www/index.html; exec /bin/busybox httpd -f -p 80 -h /www\"]\n\
         ports = [\"8080:80\"]\n",
        pki.ca.pem()
    );
    let user_data_file = work.join("user-data.toml");
    std::fs::write(&user_data_file, &user_data)?;

    let web = free_port()?;
    let tls = free_port()?;
    let mut opts = guest()?;
    opts.fw_cfg_files = vec![(FW_CFG_USER_DATA.to_owned(), user_data_file)];
    opts.forwards = vec![(web, 8080), (tls, 2376)];
    let mut vm = Vm::boot(&opts)?;
    expect_provisioned(&mut vm, "fw_cfg", "plinth")?;
    expect_hostname(&mut vm, "fw-guest")?;
    vm.wait_status("container-running", BOOT)?;
    let page = qemu_tests::engine::http_get(web, "/", Duration::from_secs(60))?;
    ensure!(
        page.contains("Hello from user data"),
        "the user data's container did not replace the image's: {page:?}"
    );

    // A client with a certificate from the CA runs a container.
    let client = (work.join("client.pem"), work.join("client-key.pem"));
    let client = Some((client.0.as_path(), client.1.as_path()));
    let version = engine_curl(work, tls, client, "GET", "/version", None)?;
    ensure!(version.contains("ApiVersion"), "GET /version: {version}");
    let created = engine_curl(
        work,
        tls,
        client,
        "POST",
        "/containers/create?name=mtls",
        Some(&format!(
            "{{\"Image\":\"{DEMO_IMAGE}\",\"Cmd\":[\"/bin/busybox\",\"echo\",\"hello over mutual TLS\"]}}"
        )),
    )?;
    ensure!(created.contains("\"Id\""), "create: {created}");
    engine_curl(work, tls, client, "POST", "/containers/mtls/start", None)?;
    let waited = engine_curl(work, tls, client, "POST", "/containers/mtls/wait", None)?;
    ensure!(
        waited.contains("\"StatusCode\":0"),
        "the container over mutual TLS did not exit 0: {waited}"
    );
    let logs = engine_curl(
        work,
        tls,
        client,
        "GET",
        "/containers/mtls/logs?stdout=1",
        None,
    )?;
    ensure!(logs.contains("hello over mutual TLS"), "logs: {logs:?}");

    // Without a certificate, and with one from another CA: refused at the handshake.
    let bare = engine_curl(work, tls, None, "GET", "/version", None);
    ensure!(
        bare.is_err(),
        "a client without a certificate got in: {bare:?}"
    );
    let foreign = (work.join("other.pem"), work.join("other-key.pem"));
    let foreign = engine_curl(
        work,
        tls,
        Some((foreign.0.as_path(), foreign.1.as_path())),
        "GET",
        "/version",
        None,
    );
    ensure!(
        foreign.is_err(),
        "a client with another CA's certificate got in: {foreign:?}"
    );
    vm.kill();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// NoCloud

/// A NoCloud volume labelled `cidata` holding `meta-data`, `user-data` and, if given,
/// `network-config`, as vfat or iso9660.
fn nocloud_volume(
    dir: &Path,
    iso: bool,
    meta_data: &str,
    user_data: &str,
    network_config: Option<&str>,
) -> Result<PathBuf> {
    let files = dir.join(if iso { "cidata-iso" } else { "cidata-vfat" });
    std::fs::create_dir_all(&files)?;
    std::fs::write(files.join("meta-data"), meta_data)?;
    std::fs::write(files.join("user-data"), user_data)?;
    if let Some(text) = network_config {
        std::fs::write(files.join("network-config"), text)?;
    }
    let volume = dir.join(if iso { "cidata.iso" } else { "cidata.vfat" });
    let volume_text = volume.display().to_string();
    if iso {
        run(
            "genisoimage",
            &[
                "-quiet",
                "-output",
                &volume_text,
                "-volid",
                "cidata",
                "-joliet",
                "-rock",
                &files.display().to_string(),
            ],
        )?;
    } else {
        let file = std::fs::File::create(&volume)?;
        file.set_len(8 << 20)?;
        run("mkfs.vfat", &["-n", "CIDATA", &volume_text])?;
        for name in ["meta-data", "user-data", "network-config"] {
            if !files.join(name).exists() {
                continue;
            }
            run(
                "mcopy",
                &[
                    "-i",
                    &volume_text,
                    &files.join(name).display().to_string(),
                    &format!("::{name}"),
                ],
            )?;
        }
    }
    Ok(volume)
}

#[test]
fn nocloud_volumes_name_the_host_ignore_cloud_config_and_report_invalid_user_data() -> Result<()> {
    let work_dir = tempfile::tempdir()?;
    let work = work_dir.path();

    // vfat: cloud-init's own user data is not Plinth's: reported as ignored; the host name comes
    // from the meta-data, a static address from the network-config (version 2).
    let vfat = nocloud_volume(
        work,
        false,
        "instance-id: i-0001\nlocal-hostname: nocloud-vfat\n",
        "#cloud-config\npackages: [nginx]\n",
        Some(
            "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.50/24]\n    gateway4: 10.0.2.2\n    nameservers:\n      addresses: [10.0.2.3]\n",
        ),
    )?;
    let mut opts = guest()?;
    opts.extra_disks = vec![vfat];
    let mut vm = Vm::boot(&opts)?;
    let provisioned = vm.wait_status("provisioned", BOOT)?;
    ensure!(
        field(&provisioned, "source") == "nocloud"
            && field(&provisioned, "user-data") == "ignored"
            && field(&provisioned, "kind") == "cloud-config",
        "expected the cloud-config user data reported as ignored, got {provisioned:?}"
    );
    expect_hostname(&mut vm, "nocloud-vfat")?;
    let network = vm.wait_status("network", BOOT)?;
    ensure!(
        field(&network, "address") == "10.0.2.50/24"
            && field(&network, "gateway") == "10.0.2.2"
            && field(&network, "source") == "static",
        "the network-config's static address was not configured: {network:?}"
    );
    vm.kill();

    // iso9660: Plinth user data with a misspelt key on line 4: refused with its place, and the
    // image's own container runs.
    let iso = nocloud_volume(
        work,
        true,
        "instance-id: i-0002\nlocal-hostname: nocloud-iso\n",
        "#plinth\n[[container]]\nname = \"extra\"\nimagee = \"busybox\"\n",
        None,
    )?;
    let mut opts = guest()?;
    opts.extra_disks = vec![iso];
    let web = free_port()?;
    opts.forwards = vec![(web, 8080)];
    let mut vm = Vm::boot(&opts)?;
    let error = vm.wait_status("provision-error", BOOT)?;
    let text = field(&error, "error");
    ensure!(
        field(&error, "source") == "nocloud" && text.contains(":4:1") && text.contains("imagee"),
        "expected the misspelt key reported at line 4, column 1: {error:?}"
    );
    expect_hostname(&mut vm, "nocloud-iso")?;
    let running = vm.wait_status("container-running", BOOT)?;
    ensure!(field(&running, "name") == "web", "{running:?}");
    let page = qemu_tests::engine::http_get(web, "/", Duration::from_secs(60))?;
    ensure!(page.contains("Hello from Plinth"), "{page:?}");
    vm.kill();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// EC2 and GCE metadata

/// One HTTP request as the fake metadata servers see it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Reads one request head (and skips its body); `None` at the end of the stream.
fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        bail!("malformed request line {line:?}");
    };
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

/// A response: status, extra headers, body.
type Response = (u16, Vec<(String, String)>, Vec<u8>);

/// A fake metadata server on 127.0.0.1 that answers with `answer` and records every request.
/// QEMU's `guestfwd` carries every guest connection over one host connection, so requests are
/// read one after the other from each stream.
fn metadata_server(
    answer: impl Fn(&Request) -> Response + Send + Sync + 'static,
) -> Result<(u16, Arc<Mutex<Vec<Request>>>)> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let port = listener.local_addr()?.port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let answer = Arc::new(answer);
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answer = Arc::clone(&answer);
            let log = Arc::clone(&log);
            std::thread::spawn(move || -> Result<()> {
                let mut writer: TcpStream = stream.try_clone()?;
                let mut reader = BufReader::new(stream);
                while let Some(request) = read_request(&mut reader)? {
                    let (status, headers, body) = answer(&request);
                    log.lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .push(request);
                    let mut head =
                        format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                    for (name, value) in headers {
                        head.push_str(&format!("{name}: {value}\r\n"));
                    }
                    head.push_str("\r\n");
                    writer.write_all(head.as_bytes())?;
                    writer.write_all(&body)?;
                }
                Ok(())
            });
        }
    });
    Ok((port, seen))
}

/// A guest on the 168.0.0.0/7 user network (which holds the clouds' link-local metadata address
/// and Azure's wire server) whose 169.254.169.254:80 is `server`, with SMBIOS system strings
/// `manufacturer` and `product`.
fn cloud_guest(server: u16, manufacturer: &str, product: &str) -> Result<VmOptions> {
    let mut opts = guest()?;
    opts.user_net = Some("168.0.0.0/7".to_owned());
    opts.guest_forwards = vec![("169.254.169.254:80".to_owned(), server)];
    opts.smbios = vec![format!(
        "type=1,manufacturer={manufacturer},product={product}"
    )];
    Ok(opts)
}

/// Standard base64 with padding, for the fake Azure IMDS's `userData`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn ec2_imdsv2_and_gce_metadata_servers_provision_the_instance() -> Result<()> {
    // EC2: a session token first; every other request must carry it.
    const TOKEN: &str = "AQAEAPlinthTestToken==";
    let (port, seen) = metadata_server(|r| {
        let ok = |body: &str| (200, Vec::new(), body.as_bytes().to_vec());
        if r.method == "PUT" && r.path == "/latest/api/token" {
            return if r
                .headers
                .contains_key("x-aws-ec2-metadata-token-ttl-seconds")
            {
                ok(TOKEN)
            } else {
                (400, Vec::new(), Vec::new())
            };
        }
        if r.headers
            .get("x-aws-ec2-metadata-token")
            .map(String::as_str)
            != Some(TOKEN)
        {
            return (401, Vec::new(), Vec::new());
        }
        match r.path.as_str() {
            "/latest/meta-data/local-hostname" => ok("ip-172-31-1-2.ec2.internal"),
            "/latest/user-data" => ok("#plinth\n[time]\nservers = [\"169.254.169.123\"]\n"),
            _ => (404, Vec::new(), Vec::new()),
        }
    })?;
    let mut vm = Vm::boot(&cloud_guest(port, "Amazon EC2", "m7i.large")?)?;
    expect_provisioned(&mut vm, "ec2", "plinth")?;
    expect_hostname(&mut vm, "ip-172-31-1-2")?;
    vm.kill();
    let requests = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    ensure!(
        requests.first().is_some_and(|r| r.method == "PUT"),
        "the first request to IMDS was not the token PUT: {requests:?}"
    );
    ensure!(
        requests
            .iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.headers.contains_key("x-aws-ec2-metadata-token")),
        "a request without the IMDSv2 token: {requests:?}"
    );
    ensure!(
        requests.iter().any(|r| r.path == "/latest/user-data"),
        "the user data was never asked for: {requests:?}"
    );

    // GCE: the Metadata-Flavor header both ways.
    let (port, seen) = metadata_server(|r| {
        let google = vec![("Metadata-Flavor".to_owned(), "Google".to_owned())];
        if r.headers.get("metadata-flavor").map(String::as_str) != Some("Google") {
            return (403, Vec::new(), Vec::new());
        }
        match r.path.as_str() {
            "/computeMetadata/v1/instance/hostname" => {
                (200, google, b"gce-node.c.project.internal".to_vec())
            }
            "/computeMetadata/v1/instance/attributes/user-data" => (
                200,
                google,
                b"#plinth\nhostname = \"gce-from-user-data\"\n".to_vec(),
            ),
            _ => (404, google, Vec::new()),
        }
    })?;
    let mut vm = Vm::boot(&cloud_guest(port, "Google", "Google Compute Engine")?)?;
    expect_provisioned(&mut vm, "gce", "plinth")?;
    // The user data's host name wins over the metadata's.
    expect_hostname(&mut vm, "gce-from-user-data")?;
    vm.kill();
    let requests = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    ensure!(
        requests
            .iter()
            .all(|r| r.headers.get("metadata-flavor").map(String::as_str) == Some("Google")),
        "a GCE metadata request without Metadata-Flavor: {requests:?}"
    );
    Ok(())
}

/// Azure's identifier in SMBIOS chassis asset tags.
const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";

#[test]
fn azure_imds_provisions_the_instance_and_it_reports_ready_to_the_wire_server() -> Result<()> {
    assert_eq!(base64(b"Plinth!"), "UGxpbnRoIQ==");
    let user_data = base64(b"#plinth\nhostname = \"azure-from-user-data\"\n");
    let (imds, imds_seen) = metadata_server(move |r| {
        if r.headers.get("metadata").map(String::as_str) != Some("true") {
            return (400, Vec::new(), Vec::new());
        }
        if r.path.starts_with("/metadata/instance/compute?") {
            let body = format!("{{\"name\":\"azure-vm\",\"userData\":\"{user_data}\"}}");
            return (200, Vec::new(), body.into_bytes());
        }
        (404, Vec::new(), Vec::new())
    })?;
    let (wire, wire_seen) = metadata_server(|r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/machine/?comp=goalstate") => (
            200,
            Vec::new(),
            b"<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<GoalState><Version>2012-11-30</Version>\
              <Incarnation>3</Incarnation><Machine><ExpectedState>Started</ExpectedState></Machine>\
              <Container><ContainerId>5f6e7d8c-0000-4000-8000-000000000001</ContainerId>\
              <RoleInstanceList><RoleInstance><InstanceId>0c1d2e3f.azure-vm</InstanceId>\
              </RoleInstance></RoleInstanceList></Container></GoalState>"
                .to_vec(),
        ),
        ("POST", "/machine?comp=health") => (200, Vec::new(), Vec::new()),
        _ => (404, Vec::new(), Vec::new()),
    })?;
    let mut opts = cloud_guest(imds, "Microsoft Corporation", "Virtual Machine")?;
    // A second forward on port 80: through a relay command (QEMU names forwards by port).
    opts.guest_commands = vec![(
        "168.63.129.16:80".to_owned(),
        format!("{} 127.0.0.1:{wire}", env!("CARGO_BIN_EXE_tcp-relay")),
    )];
    opts.smbios.push(format!("type=3,asset={AZURE_ASSET_TAG}"));
    let mut vm = Vm::boot(&opts)?;
    let platform = vm.wait_status("platform", BOOT)?;
    ensure!(field(&platform, "name") == "azure", "{platform:?}");
    expect_provisioned(&mut vm, "azure", "plinth")?;
    expect_hostname(&mut vm, "azure-from-user-data")?;
    vm.wait_status("provision-reported", BOOT)?;
    vm.kill();
    ensure!(
        !imds_seen
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .is_empty(),
        "the IMDS was never asked"
    );
    let wire = wire_seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let report = wire
        .iter()
        .find(|r| r.method == "POST")
        .with_context(|| format!("no health report reached the wire server: {wire:?}"))?;
    for part in [
        "<State>Ready</State>",
        "<GoalStateIncarnation>3</GoalStateIncarnation>",
        "<ContainerId>5f6e7d8c-0000-4000-8000-000000000001</ContainerId>",
        "<InstanceId>0c1d2e3f.azure-vm</InstanceId>",
    ] {
        ensure!(
            report.body.contains(part),
            "the health report lacks {part}: {}",
            report.body
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Time

/// The guest's clock at power-on: years before now.
const RTC_BASE: &str = "2015-06-01T00:00:00";
/// [`RTC_BASE`] in Unix seconds.
const RTC_BASE_UNIX: u64 = 1_433_116_800;

#[test]
fn a_guest_with_its_clock_years_off_sets_it_from_the_time_server_dhcp_names() -> Result<()> {
    let bridge = Ipv4Addr::new(10, 77, 0, 1);
    let mut ns = NetNs::create("time", bridge)?;
    ns.add_tap("tap0")?;
    ns.dhcp_server(&[format!("42,{bridge}")])?;
    ns.spawn(
        env!("CARGO_BIN_EXE_sntp-server"),
        &[format!("{bridge}:123")],
    )?;
    let mut opts = guest()?;
    opts.rtc_base = Some(RTC_BASE.to_owned());
    opts.tap = Some((ns.name().to_owned(), "tap0".to_owned()));
    let started = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut vm = Vm::boot(&opts)?;
    let synced = vm.wait_status("clock-synced", BOOT)?;
    let offset_ms: i64 = field(&synced, "offset")
        .trim_end_matches("ms")
        .parse()
        .with_context(|| format!("clock-synced without a numeric offset: {synced:?}"))?;
    // The guest's clock ran from RTC_BASE since QEMU started; the server's is this host's.
    let expected_ms = (started - RTC_BASE_UNIX) as i64 * 1000;
    ensure!(
        (offset_ms - expected_ms).abs() < 30_000,
        "the guest stepped by {offset_ms} ms, expected about {expected_ms} ms: {synced:?}"
    );
    ensure!(
        field(&synced, "server").starts_with(&bridge.to_string()),
        "synced from {synced:?}, not the server DHCP named"
    );
    ensure!(field(&synced, "stepped") == "yes", "{synced:?}");
    vm.kill();
    Ok(())
}
