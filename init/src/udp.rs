//! Waiting for the answer to a UDP request: datagrams are received until one is accepted or a
//! deadline passes, and the ones that are no answer (another protocol, a late reply to an earlier
//! request) are skipped. The SNTP client ([`crate::clock`]) and the DHCP client
//! ([`crate::stage2::net::dhcp`]) wait this way.

use std::io;
use std::net::UdpSocket;
use std::time::Instant;

/// Why [`receive_until`] returned without an accepted datagram.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError<E> {
    /// The deadline passed before a datagram was accepted.
    #[error("no acceptable datagram arrived before the deadline")]
    TimedOut,
    /// The socket failed.
    #[error("receiving a datagram: {0}")]
    Io(#[source] io::Error),
    /// A datagram ended the wait with a refusal (a DHCPNAK, an NTP kiss-o'-death).
    #[error("{0}")]
    Refused(E),
}

/// Receives datagrams on `socket` into `buffer` until `accept` takes one or `deadline` passes.
/// `accept` sees each datagram (cut to `buffer`'s length) and returns `Ok(Some(answer))` to end
/// the wait with it, `Ok(None)` to skip it, or `Err(refusal)` to end the wait with
/// [`ReceiveError::Refused`]. A signal that interrupts the wait does not end it.
pub fn receive_until<T, E>(
    socket: &UdpSocket,
    deadline: Instant,
    buffer: &mut [u8],
    mut accept: impl FnMut(&[u8]) -> Result<Option<T>, E>,
) -> Result<T, ReceiveError<E>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReceiveError::TimedOut);
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(ReceiveError::Io)?;
        let length = match socket.recv_from(buffer) {
            Ok((length, _)) => length,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReceiveError::TimedOut)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReceiveError::Io(e)),
        };
        // The kernel never reports more than the buffer holds; `min` only keeps this total.
        let datagram = &buffer[..length.min(buffer.len())];
        if let Some(answer) = accept(datagram).map_err(ReceiveError::Refused)? {
            return Ok(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A receiving socket and a sending one connected to it, both on 127.0.0.1.
    fn pair() -> (UdpSocket, UdpSocket) {
        let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind receiver");
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
        sender
            .connect(receiver.local_addr().expect("receiver address"))
            .expect("connect");
        (receiver, sender)
    }

    /// Accepts `answer N`, refuses `refused`, skips everything else; counts what it saw.
    fn judge(seen: &mut Vec<String>, datagram: &[u8]) -> Result<Option<String>, String> {
        let text = String::from_utf8_lossy(datagram).into_owned();
        seen.push(text.clone());
        match text.as_str() {
            "refused" => Err(text),
            t if t.starts_with("answer ") => Ok(Some(text)),
            _ => Ok(None),
        }
    }

    #[test]
    fn junk_is_skipped_until_the_answer() {
        let (receiver, sender) = pair();
        for datagram in [&b"junk"[..], b"\x00\xff", b"answer 1", b"answer 2"] {
            sender.send(datagram).expect("send");
        }
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buffer = [0u8; 64];
        let answer = receive_until(&receiver, deadline, &mut buffer, |d| judge(&mut seen, d))
            .expect("an answer");
        assert_eq!(answer, "answer 1");
        assert_eq!(seen.len(), 3, "{seen:?}");
        // The second answer is still queued for the next wait.
        let answer = receive_until(&receiver, deadline, &mut buffer, |d| judge(&mut seen, d))
            .expect("the next answer");
        assert_eq!(answer, "answer 2");
    }

    #[test]
    fn a_refusal_ends_the_wait() {
        let (receiver, sender) = pair();
        sender.send(b"refused").expect("send");
        sender.send(b"answer 1").expect("send");
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let result = receive_until(&receiver, deadline, &mut [0u8; 64], |d| judge(&mut seen, d));
        assert!(
            matches!(&result, Err(ReceiveError::Refused(r)) if r == "refused"),
            "{result:?}"
        );
    }

    #[test]
    fn the_deadline_is_a_timeout_even_while_junk_arrives() {
        let (receiver, sender) = pair();
        sender.send(b"junk").expect("send");
        let mut seen = Vec::new();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(200);
        let result = receive_until(&receiver, deadline, &mut [0u8; 64], |d| judge(&mut seen, d));
        assert!(matches!(result, Err(ReceiveError::TimedOut)), "{result:?}");
        assert_eq!(seen, ["junk"]);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));
        // A deadline already past does not wait at all.
        let result = receive_until(&receiver, started, &mut [0u8; 64], |d| judge(&mut seen, d));
        assert!(matches!(result, Err(ReceiveError::TimedOut)), "{result:?}");
    }
}
