//! The clouds' instance metadata services, over plain HTTP through the update agent's client
//! ([`crate::update::fetch::http_request`]): EC2 (IMDSv2 only), GCE and Azure IMDS.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::{check_size, sanitize_hostname, Env, Found, USER_DATA_LIMIT};
use crate::http::Response;
use crate::update::fetch::{self, Client, FetchError, HttpUrl, Pace, Scheme};

/// Largest answer other than user data (a token, a host name, a goal state).
const SMALL_LIMIT: u64 = 64 * 1024;

/// How long an EC2 session token lives, in seconds.
const EC2_TOKEN_TTL: &str = "21600";

/// The client for link-local services: `env.timeout` to connect and between bytes.
fn client(env: &Env) -> Client {
    let pace = Pace {
        stall: env.timeout,
        ..fetch::PACE
    };
    Client::new(None, pace).with_connect_timeout(env.timeout)
}

/// `http://addr/path`.
fn url(addr: SocketAddr, path: &str) -> HttpUrl {
    HttpUrl {
        scheme: Scheme::Http,
        host: addr.ip().to_string(),
        port: addr.port(),
        path: path.to_owned(),
    }
}

/// One request, asked again while the service does not answer (no connection, a timeout), for
/// `env.retry_for` in all; an answer of any status is returned.
pub(super) fn request(
    env: &Env,
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    limit: u64,
) -> Result<Response> {
    let client = client(env);
    let target = url(addr, path);
    let deadline = Instant::now() + env.retry_for;
    let mut tries = 0u32;
    loop {
        tries += 1;
        match fetch::http_request(&client, method, &target, headers, body, limit) {
            Ok(response) => return Ok(response),
            Err(FetchError::Io { what, error }) if Instant::now() + env.retry_pause < deadline => {
                if tries == 1 {
                    crate::info!("{what}: {error}; asking again");
                }
                std::thread::sleep(env.retry_pause);
            }
            Err(FetchError::Io { what, error }) => bail!(
                "{what}: {error} (no answer in {} tries over {:.1} s)",
                tries,
                env.retry_for.as_secs_f64()
            ),
            Err(e) => return Err(e.into()),
        }
    }
}

/// An error naming `method path` and the status, unless `response` is a 200.
fn expect_ok(response: &Response, method: &str, addr: SocketAddr, path: &str) -> Result<()> {
    if response.status != 200 {
        bail!(
            "{method} {}: HTTP status {}",
            url(addr, path),
            response.status
        );
    }
    Ok(())
}

/// A 200 answer's body, or `None` for 404; other statuses are errors.
fn optional_body(
    response: Response,
    method: &str,
    addr: SocketAddr,
    path: &str,
) -> Result<Option<Vec<u8>>> {
    if response.status == 404 {
        return Ok(None);
    }
    expect_ok(&response, method, addr, path)?;
    Ok(Some(response.body))
}

/// A host name answer's text, sanitised.
fn hostname(source: &str, body: Option<Vec<u8>>) -> Option<String> {
    let body = body?;
    sanitize_hostname(source, &String::from_utf8_lossy(&body))
}

/// EC2 through IMDSv2: a session token from `PUT /latest/api/token`, then the host name and the
/// user data with it. Never a request without a token (IMDSv1).
pub fn ec2(env: &Env) -> Result<Found> {
    let addr = env.metadata;
    let token_path = "/latest/api/token";
    let answer = request(
        env,
        "PUT",
        addr,
        token_path,
        &[("X-aws-ec2-metadata-token-ttl-seconds", EC2_TOKEN_TTL)],
        b"",
        SMALL_LIMIT,
    )
    .context("ec2: getting an IMDSv2 session token")?;
    expect_ok(&answer, "PUT", addr, token_path).context("ec2: getting an IMDSv2 session token")?;
    let token = String::from_utf8_lossy(&answer.body).trim().to_owned();
    if token.is_empty() || token.bytes().any(|b| b.is_ascii_control()) {
        bail!(
            "ec2: PUT {}: the session token is empty or not one line",
            url(addr, token_path)
        );
    }
    let headers = [("X-aws-ec2-metadata-token", token.as_str())];
    let get = |path: &str, limit: u64| -> Result<Option<Vec<u8>>> {
        let answer = request(env, "GET", addr, path, &headers, b"", limit)
            .with_context(|| format!("ec2: reading {path}"))?;
        optional_body(answer, "GET", addr, path).with_context(|| format!("ec2: reading {path}"))
    };
    let hostname = hostname("ec2", get("/latest/meta-data/local-hostname", SMALL_LIMIT)?);
    let user_data = get("/latest/user-data", USER_DATA_LIMIT)?;
    Ok(Found {
        source: "ec2",
        hostname,
        user_data,
        network: None,
    })
}

/// GCE: the host name and the `user-data` attribute, every request and answer carrying
/// `Metadata-Flavor: Google`.
pub fn gce(env: &Env) -> Result<Found> {
    let addr = env.metadata;
    let get = |path: &str, limit: u64| -> Result<Option<Vec<u8>>> {
        let answer = request(
            env,
            "GET",
            addr,
            path,
            &[("Metadata-Flavor", "Google")],
            b"",
            limit,
        )
        .with_context(|| format!("gce: reading {path}"))?;
        if answer.headers.get("metadata-flavor").map(String::as_str) != Some("Google") {
            bail!(
                "gce: GET {}: the answer (HTTP status {}) has no `Metadata-Flavor: Google`: \
                 not the GCE metadata server",
                url(addr, path),
                answer.status
            );
        }
        optional_body(answer, "GET", addr, path).with_context(|| format!("gce: reading {path}"))
    };
    let hostname = hostname(
        "gce",
        get("/computeMetadata/v1/instance/hostname", SMALL_LIMIT)?,
    );
    let user_data = get(
        "/computeMetadata/v1/instance/attributes/user-data",
        USER_DATA_LIMIT,
    )?;
    Ok(Found {
        source: "gce",
        hostname,
        user_data,
        network: None,
    })
}

/// The path of Azure IMDS's compute document.
const AZURE_COMPUTE: &str = "/metadata/instance/compute?api-version=2021-02-01";

/// Azure IMDS: the compute document's `name` (host name) and `userData` (base64).
pub fn azure(env: &Env) -> Result<Found> {
    let addr = env.metadata;
    // The user data, base64 (4/3 its size), and the rest of the document.
    let limit = USER_DATA_LIMIT / 3 * 4 + 4 + SMALL_LIMIT;
    let answer = request(
        env,
        "GET",
        addr,
        AZURE_COMPUTE,
        &[("Metadata", "true")],
        b"",
        limit,
    )
    .context("azure: reading the instance metadata")?;
    expect_ok(&answer, "GET", addr, AZURE_COMPUTE)
        .context("azure: reading the instance metadata")?;
    let what = format!("azure: GET {}", url(addr, AZURE_COMPUTE));
    let json: serde_json::Value =
        serde_json::from_slice(&answer.body).with_context(|| format!("{what}: not JSON"))?;
    let hostname = json
        .get("name")
        .and_then(|v| v.as_str())
        .and_then(|name| sanitize_hostname("azure", name));
    let user_data = match json.get("userData").and_then(|v| v.as_str()) {
        None | Some("") => None,
        Some(text) => {
            let data = super::azure::base64_decode(text)
                .with_context(|| format!("{what}: userData is not base64"))?;
            check_size(&what, data.len() as u64)?;
            Some(data)
        }
    };
    Ok(Found {
        source: "azure",
        hostname,
        user_data,
        network: None,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::time::Duration;

    /// A request the fake server received.
    #[derive(Debug, Clone)]
    pub struct Request {
        pub method: String,
        pub path: String,
        /// Lowercased names.
        pub headers: BTreeMap<String, String>,
        pub body: Vec<u8>,
    }

    /// An answer: status, header fields, body.
    pub type Answer = (u16, Vec<(&'static str, String)>, Vec<u8>);

    /// A server on 127.0.0.1 answering `count` requests with `handler`; the thread returns them.
    pub fn serve(
        count: usize,
        handler: impl Fn(&Request) -> Answer + Send + 'static,
    ) -> (SocketAddr, std::thread::JoinHandle<Vec<Request>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..count {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                reader.read_line(&mut line).expect("request line");
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or_default().to_owned();
                let path = parts.next().unwrap_or_default().to_owned();
                let mut headers = BTreeMap::new();
                loop {
                    line.clear();
                    reader.read_line(&mut line).expect("header");
                    let Some((name, value)) = line.trim_end().split_once(':') else {
                        break;
                    };
                    headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
                }
                let length = headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0usize);
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).expect("body");
                let request = Request {
                    method,
                    path,
                    headers,
                    body,
                };
                let (status, fields, body) = handler(&request);
                let mut head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                for (name, value) in fields {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                head.push_str("\r\n");
                let mut out = &stream;
                let _ = out
                    .write_all(head.as_bytes())
                    .and_then(|()| out.write_all(&body));
                seen.push(request);
            }
            seen
        });
        (addr, server)
    }

    /// An environment whose metadata service and wireserver are `addr`, with short timeouts.
    pub fn env(addr: SocketAddr) -> Env {
        Env {
            metadata: addr,
            wireserver: addr,
            timeout: Duration::from_secs(2),
            retry_for: Duration::from_secs(2),
            retry_pause: Duration::from_millis(100),
            ..Env::default()
        }
    }

    const TOKEN: &str = "AQAEAFake-Token==";

    /// A fake IMDSv2: tokens only by PUT with a TTL, every GET refused (401) without one.
    fn ec2_handler(user_data: Option<Vec<u8>>) -> impl Fn(&Request) -> Answer + Send {
        move |r: &Request| {
            if r.path == "/latest/api/token" {
                if r.method != "PUT"
                    || r.headers
                        .get("x-aws-ec2-metadata-token-ttl-seconds")
                        .map(String::as_str)
                        != Some("21600")
                {
                    return (400, vec![], b"bad token request".to_vec());
                }
                return (200, vec![], TOKEN.as_bytes().to_vec());
            }
            if r.headers
                .get("x-aws-ec2-metadata-token")
                .map(String::as_str)
                != Some(TOKEN)
            {
                return (401, vec![], vec![]);
            }
            match (r.method.as_str(), r.path.as_str(), &user_data) {
                ("GET", "/latest/meta-data/local-hostname", _) => (
                    200,
                    vec![],
                    b"ip-10-0-1-5.eu-west-1.compute.internal".to_vec(),
                ),
                ("GET", "/latest/user-data", Some(data)) => (200, vec![], data.clone()),
                _ => (404, vec![], vec![]),
            }
        }
    }

    #[test]
    fn ec2_uses_an_imdsv2_token_for_every_read() {
        let (addr, server) = serve(3, ec2_handler(Some(b"[network]\n".to_vec())));
        let found = ec2(&env(addr)).expect("ec2");
        assert_eq!(
            found,
            Found {
                source: "ec2",
                hostname: Some("ip-10-0-1-5".into()),
                user_data: Some(b"[network]\n".to_vec()),
                network: None,
            }
        );
        let requests = server.join().expect("server");
        assert_eq!(requests[0].method, "PUT");
        assert!(requests[1..].iter().all(|r| r
            .headers
            .get("x-aws-ec2-metadata-token")
            .map(String::as_str)
            == Some(TOKEN)));
    }

    #[test]
    fn ec2_without_user_data_has_none() {
        let (addr, server) = serve(3, ec2_handler(None));
        let found = ec2(&env(addr)).expect("ec2");
        assert_eq!(found.user_data, None);
        assert_eq!(found.hostname.as_deref(), Some("ip-10-0-1-5"));
        server.join().expect("server");
    }

    #[test]
    fn ec2_never_falls_back_to_requests_without_a_token() {
        // The token request is refused: no GET follows.
        let (addr, server) = serve(1, |_: &Request| (403, vec![], vec![]));
        let err = format!("{:#}", ec2(&env(addr)).expect_err("no token"));
        assert!(
            err.contains("HTTP status 403") && err.contains("/latest/api/token"),
            "{err}"
        );
        assert_eq!(server.join().expect("server").len(), 1);
    }

    #[test]
    fn ec2_user_data_over_the_limit_is_an_error_naming_its_size() {
        let big = vec![b'x'; USER_DATA_LIMIT as usize + 1];
        let (addr, server) = serve(3, ec2_handler(Some(big)));
        let err = format!("{:#}", ec2(&env(addr)).expect_err("too large"));
        assert!(
            err.contains("1048577 bytes") && err.contains("/latest/user-data"),
            "{err}"
        );
        server.join().expect("server");
    }

    #[test]
    fn a_service_that_never_answers_fails_in_bounded_time() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let mut env = env(SocketAddr::from(([127, 0, 0, 1], port)));
        env.retry_for = Duration::from_millis(500);
        let started = Instant::now();
        let err = format!("{:#}", ec2(&env).expect_err("nobody listens"));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            err.contains("ec2") && err.contains(&port.to_string()) && err.contains("tries"),
            "{err}"
        );
    }

    #[test]
    fn a_service_that_comes_up_late_is_asked_again() {
        let probe = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let listener = TcpListener::bind(addr).expect("rebind");
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let mut out = &stream;
            out.write_all(
                b"HTTP/1.1 200 OK\r\nMetadata-Flavor: Google\r\nContent-Length: 2\r\n\r\nvm",
            )
            .expect("answer");
        });
        let answer = request(&env(addr), "GET", addr, "/", &[], b"", SMALL_LIMIT)
            .expect("answered on a later try");
        assert_eq!(answer.body, b"vm");
        late.join().expect("server");
    }

    fn gce_handler(r: &Request) -> Answer {
        if r.headers.get("metadata-flavor").map(String::as_str) != Some("Google") {
            return (403, vec![], b"missing Metadata-Flavor".to_vec());
        }
        let flavor = vec![("Metadata-Flavor", "Google".to_owned())];
        match r.path.as_str() {
            "/computeMetadata/v1/instance/hostname" => {
                (200, flavor, b"vm-1.c.project.internal".to_vec())
            }
            _ => (404, flavor, vec![]),
        }
    }

    #[test]
    fn gce_sends_and_checks_the_metadata_flavor() {
        let (addr, server) = serve(2, gce_handler);
        let found = gce(&env(addr)).expect("gce");
        assert_eq!(
            found,
            Found {
                source: "gce",
                hostname: Some("vm-1".into()),
                user_data: None,
                network: None,
            }
        );
        server.join().expect("server");
        // A server that answers without the header is not GCE's.
        let (addr, server) = serve(1, |_: &Request| (200, vec![], b"vm".to_vec()));
        let err = format!("{:#}", gce(&env(addr)).expect_err("not gce"));
        assert!(err.contains("Metadata-Flavor: Google"), "{err}");
        server.join().expect("server");
    }

    #[test]
    fn azure_imds_gives_the_name_and_decoded_user_data() {
        let (addr, server) = serve(1, |r: &Request| {
            if r.headers.get("metadata").map(String::as_str) != Some("true")
                || r.path != AZURE_COMPUTE
            {
                return (400, vec![], vec![]);
            }
            let json = r#"{"name": "MyVM", "userData": "W25ldHdvcmtdCg==", "vmId": "x"}"#;
            (
                200,
                vec![("Content-Type", "application/json".into())],
                json.into(),
            )
        });
        let found = azure(&env(addr)).expect("azure");
        assert_eq!(
            found,
            Found {
                source: "azure",
                hostname: Some("myvm".into()),
                user_data: Some(b"[network]\n".to_vec()),
                network: None,
            }
        );
        server.join().expect("server");
        let (addr, server) = serve(1, |_: &Request| {
            (200, vec![], br#"{"name": "vm", "userData": ""}"#.to_vec())
        });
        assert_eq!(azure(&env(addr)).expect("azure").user_data, None);
        server.join().expect("server");
    }
}
