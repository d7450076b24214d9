//! A minimal SNTP server for the time test: answers every client request (mode 3) on the
//! address given as the only argument with this host's clock, as a stratum-2 server. The test
//! runs it inside its own network namespace, where the guest reaches it over a private bridge.

use std::net::UdpSocket;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// The host clock as a 64-bit NTP timestamp.
fn ntp_now() -> [u8; 8] {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = (now.as_secs() + NTP_UNIX_OFFSET) as u32;
    let fraction = ((u64::from(now.subsec_nanos()) << 32) / 1_000_000_000) as u32;
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&seconds.to_be_bytes());
    out[4..].copy_from_slice(&fraction.to_be_bytes());
    out
}

fn main() {
    let Some(listen) = std::env::args().nth(1) else {
        eprintln!("usage: sntp-server ADDRESS:PORT");
        std::process::exit(2);
    };
    let socket = match UdpSocket::bind(&listen) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("sntp-server: binding {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("sntp-server: answering on {listen}");
    let mut request = [0u8; 512];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut request) else {
            continue;
        };
        let received = ntp_now();
        // Version from the request, mode 3 (client) only.
        if len < 48 || request[0] & 0x07 != 3 {
            continue;
        }
        let version = (request[0] >> 3) & 0x07;
        let mut reply = [0u8; 48];
        reply[0] = (version << 3) | 4; // LI 0, server
        reply[1] = 2; // stratum
        reply[2] = request[2]; // poll
        reply[3] = 0xEC; // precision: about 2^-20 s
        reply[12..16].copy_from_slice(b"TEST"); // reference ID
        reply[16..24].copy_from_slice(&received); // reference time
        reply[24..32].copy_from_slice(&request[40..48]); // originate = client's transmit
        reply[32..40].copy_from_slice(&received);
        reply[40..48].copy_from_slice(&ntp_now());
        if let Err(e) = socket.send_to(&reply, peer) {
            eprintln!("sntp-server: answering {peer}: {e}");
        } else {
            eprintln!("sntp-server: answered {peer}");
        }
    }
}
