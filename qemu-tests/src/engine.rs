//! A small Docker Engine API client over TCP (a QEMU host forward to the guest's engine), so
//! tests can act on a running guest as an administrator would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The engine of a guest, reached on `127.0.0.1:port`.
#[derive(Debug, Clone, Copy)]
pub struct Engine {
    pub port: u16,
}

/// What a one-shot helper container printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub exit_code: i64,
    pub output: String,
}

impl Engine {
    /// One HTTP/1.0 request (the engine then answers without chunking and closes).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).with_context(|| {
            format!("connecting to the guest engine on 127.0.0.1:{}", self.port)
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let body = body
            .map(serde_json::to_vec)
            .transpose()?
            .unwrap_or_default();
        let head = format!(
            "{method} /v1.41{path} HTTP/1.0\r\nHost: engine\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body)?;
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .with_context(|| format!("reading the reply to {method} {path}"))?;
        let split = reply
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .with_context(|| format!("malformed reply to {method} {path}"))?;
        let head = String::from_utf8_lossy(&reply[..split]).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status in reply to {method} {path}: {head}"))?;
        Ok((status, reply[split + 4..].to_vec()))
    }

    /// A request whose reply must be 2xx; returns the body as JSON (`null` when empty).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, reply) = self.request(method, path, body)?;
        if !(200..300).contains(&status) {
            bail!(
                "{method} {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&reply)
            );
        }
        if reply.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&reply)
            .with_context(|| format!("parsing the reply to {method} {path}"))
    }

    /// Waits until the engine answers `_ping`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.request("GET", "/_ping", None) {
                Ok((200, _)) => return Ok(()),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
                Ok((status, body)) => bail!(
                    "engine ping: HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                ),
                Err(e) => return Err(e.context("engine never answered")),
            }
        }
    }

    /// Inspects a container.
    pub fn inspect(&self, name: &str) -> Result<Value> {
        self.call("GET", &format!("/containers/{name}/json"), None)
    }

    /// Runs `cmd` in a new container of `image` to completion; `host` gives it the host's PID
    /// namespace and full privileges, `binds` are `host:container` bind mounts.
    pub fn run(&self, image: &str, cmd: &[&str], host: bool, binds: &[&str]) -> Result<Run> {
        let created = self.call(
            "POST",
            "/containers/create",
            Some(&json!({
                "Image": image,
                "Cmd": cmd,
                "HostConfig": { "Privileged": host, "PidMode": if host { "host" } else { "" }, "Binds": binds },
            })),
        )?;
        let id = created["Id"]
            .as_str()
            .context("create reply has no Id")?
            .to_owned();
        self.call("POST", &format!("/containers/{id}/start"), None)?;
        let waited = self.call("POST", &format!("/containers/{id}/wait"), None)?;
        let (_, logs) = self.request(
            "GET",
            &format!("/containers/{id}/logs?stdout=1&stderr=1"),
            None,
        )?;
        self.call("DELETE", &format!("/containers/{id}?force=1"), None)?;
        Ok(Run {
            exit_code: waited["StatusCode"].as_i64().unwrap_or(-1),
            output: demux(&logs),
        })
    }
}

/// Joins the payloads of the engine's multiplexed log stream (8-byte frame headers).
pub fn demux(mut raw: &[u8]) -> String {
    let mut out = Vec::new();
    while raw.len() >= 8 {
        let len = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]) as usize;
        let end = (8 + len).min(raw.len());
        out.extend_from_slice(&raw[8..end]);
        raw = &raw[end..];
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A plain HTTP GET of `http://127.0.0.1:port/path`, retried until `timeout`; returns the body.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = (|| -> Result<String> {
            let mut stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").as_bytes())?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            let status = reply.split_whitespace().nth(1);
            if !reply.starts_with("HTTP/1.") || status != Some("200") {
                bail!("unexpected reply: {}", reply.lines().next().unwrap_or(""));
            }
            Ok(reply
                .split_once("\r\n\r\n")
                .map_or(String::new(), |(_, b)| b.to_owned()))
        })();
        match attempt {
            Ok(body) => return Ok(body),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("GET http://127.0.0.1:{port}{path}")))
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demux_joins_frames() {
        let mut raw = vec![1, 0, 0, 0, 0, 0, 0, 3];
        raw.extend_from_slice(b"abc");
        raw.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 2]);
        raw.extend_from_slice(b"de");
        assert_eq!(demux(&raw), "abcde");
    }
}
