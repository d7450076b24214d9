//! `plinth serve-connection DIR` as QEMU's `guestfwd … -cmd:` rule starts it for `plinth run
//! --serve`: one process per guest connection, with that connection (a socket) as its standard
//! input, output and error.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

/// Starts `plinth serve-connection root` on one end of a socket pair, sends `request` on the other
/// and returns all it reads until the process closes the connection.
fn connection(root: &std::path::Path, request: &[u8]) -> Vec<u8> {
    let (mut guest, host) = UnixStream::pair().expect("socket pair");
    let fd = |s: &UnixStream| Stdio::from(std::os::fd::OwnedFd::from(s.try_clone().expect("dup")));
    let mut child = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .arg("serve-connection")
        .arg(root)
        .stdin(fd(&host))
        .stdout(fd(&host))
        .stderr(fd(&host))
        .spawn()
        .expect("starting plinth serve-connection");
    drop(host);
    guest.write_all(request).expect("request");
    let mut reply = Vec::new();
    guest.read_to_end(&mut reply).expect("reply");
    child.wait().expect("wait");
    reply
}

/// A response split into its head (text) and body.
fn split(reply: &[u8]) -> (String, &[u8]) {
    let end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(reply)));
    let head = String::from_utf8(reply[..end + 2].to_vec()).expect("utf-8 head");
    (head, &reply[end + 4..])
}

#[test]
fn each_connection_is_answered_by_its_own_process_and_nothing_else_reaches_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("releases");
    std::fs::create_dir_all(root.join("stable")).expect("mkdir");
    let artifact: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("stable/artifact"), &artifact).expect("write");

    // What the update agent sends: HTTP/1.1 GET, `Connection: close`, `Range` to resume.
    let request = |range: &str| {
        format!("GET /stable/artifact HTTP/1.1\r\nHost: 10.0.2.100:8000\r\nUser-Agent: plinth-update\r\nAccept-Encoding: identity\r\nConnection: close\r\n{range}\r\n").into_bytes()
    };
    let reply = connection(&root, &request(""));
    let (head, body) = split(&reply);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\nContent-Length: 300000\r\n"), "{head}");
    assert!(body == artifact, "the whole file and nothing after it");

    let reply = connection(&root, &request("Range: bytes=299990-\r\n"));
    let (head, body) = split(&reply);
    assert!(
        head.starts_with("HTTP/1.1 206 Partial Content\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nContent-Range: bytes 299990-299999/300000\r\n"),
        "{head}"
    );
    assert_eq!(body, &artifact[299_990..]);

    let reply = connection(
        &root,
        b"GET /../releases/stable/artifact HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    let (head, _) = split(&reply);
    assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");

    // A request that fails the process (a head that is not text) ends the connection without
    // a word: its error message must not reach the guest as response bytes.
    let reply = connection(&root, b"GET /\xff\xfe HTTP/1.1\r\n\r\n");
    assert!(reply.is_empty(), "{:?}", String::from_utf8_lossy(&reply));
}
