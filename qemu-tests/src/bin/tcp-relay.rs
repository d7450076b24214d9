//! Relays standard input and output to a TCP address: QEMU's `guestfwd=…-cmd:` runs it once per
//! guest connection, so that a test can forward a second guest address on a port another
//! `guestfwd` already uses (QEMU names its chardev-backed forwards by port alone).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

fn main() {
    let Some(address) = std::env::args().nth(1) else {
        eprintln!("usage: tcp-relay HOST:PORT");
        std::process::exit(2);
    };
    let stream = match TcpStream::connect(&address) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("tcp-relay: connecting to {address}: {e}");
            std::process::exit(1);
        }
    };
    let Ok(mut upstream) = stream.try_clone() else {
        std::process::exit(1);
    };
    // Guest → server in a thread; server → guest here.
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        let mut stdin = std::io::stdin().lock();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || upstream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = upstream.shutdown(Shutdown::Write);
    });
    let mut downstream = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16384];
    while let Ok(n) = downstream.read(&mut buf) {
        if n == 0 || stdout.write_all(&buf[..n]).is_err() || stdout.flush().is_err() {
            break;
        }
    }
}
