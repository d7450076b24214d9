//! DHCPv4 client (RFC 2131): packet encoding and decoding, and the DISCOVER/OFFER/REQUEST/ACK
//! exchange over a UDP socket on port 68, with renewal and rebinding of a lease.

#![warn(missing_docs)]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use crate::udp::{receive_until, ReceiveError};

/// DHCP server port.
pub const SERVER_PORT: u16 = 67;
/// DHCP client port.
pub const CLIENT_PORT: u16 = 68;

const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const BROADCAST_FLAG: u16 = 0x8000;

/// Option codes this client reads or writes.
pub mod option {
    /// Padding.
    pub const PAD: u8 = 0;
    /// Subnet mask.
    pub const SUBNET_MASK: u8 = 1;
    /// Routers, the first is the default gateway.
    pub const ROUTER: u8 = 3;
    /// DNS servers.
    pub const DNS: u8 = 6;
    /// Client host name.
    pub const HOSTNAME: u8 = 12;
    /// Domain name.
    pub const DOMAIN_NAME: u8 = 15;
    /// NTP servers (RFC 2132 section 8.3).
    pub const NTP_SERVERS: u8 = 42;
    /// Address the client asks for.
    pub const REQUESTED_IP: u8 = 50;
    /// Lease time in seconds.
    pub const LEASE_TIME: u8 = 51;
    /// DHCP message type.
    pub const MESSAGE_TYPE: u8 = 53;
    /// Server identifier.
    pub const SERVER_ID: u8 = 54;
    /// Parameters the client asks for.
    pub const PARAMETERS: u8 = 55;
    /// Largest message the client accepts.
    pub const MAX_SIZE: u8 = 57;
    /// T1, renewal time in seconds.
    pub const RENEWAL_TIME: u8 = 58;
    /// T2, rebinding time in seconds.
    pub const REBINDING_TIME: u8 = 59;
    /// Client identifier.
    pub const CLIENT_ID: u8 = 61;
    /// End of options.
    pub const END: u8 = 255;
}

/// DHCP message type (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// DHCPDISCOVER: a client looks for servers.
    Discover = 1,
    /// DHCPOFFER: a server offers an address.
    Offer = 2,
    /// DHCPREQUEST: a client takes an offer or extends a lease.
    Request = 3,
    /// DHCPDECLINE: the offered address is in use.
    Decline = 4,
    /// DHCPACK: the server grants the lease.
    Ack = 5,
    /// DHCPNAK: the server refuses the request.
    Nak = 6,
    /// DHCPRELEASE: a client gives its address up.
    Release = 7,
    /// DHCPINFORM: a client asks for parameters only.
    Inform = 8,
}

impl MessageType {
    fn from_u8(value: u8) -> Option<MessageType> {
        Some(match value {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }
}

/// One DHCP message (Ethernet hardware addresses only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// 1 request, 2 reply.
    pub op: u8,
    /// Transaction id chosen by the client.
    pub xid: u32,
    /// Seconds since the client began.
    pub secs: u16,
    /// Asks the server to broadcast its reply (we cannot receive unicast before we have an address).
    pub broadcast: bool,
    /// Client address, when it already has one.
    pub ciaddr: Ipv4Addr,
    /// Address offered to the client.
    pub yiaddr: Ipv4Addr,
    /// Next server (boot server) address.
    pub siaddr: Ipv4Addr,
    /// Relay agent address.
    pub giaddr: Ipv4Addr,
    /// Client hardware address.
    pub chaddr: [u8; 6],
    /// Options in order, without PAD and END.
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Packet {
    /// An empty request from `mac`.
    fn request(message_type: MessageType, xid: u32, mac: [u8; 6]) -> Packet {
        let mut client_id = vec![1u8];
        client_id.extend_from_slice(&mac);
        Packet {
            op: BOOTREQUEST,
            xid,
            secs: 0,
            broadcast: true,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: mac,
            options: vec![
                (option::MESSAGE_TYPE, vec![message_type as u8]),
                (option::CLIENT_ID, client_id),
                (option::MAX_SIZE, 1500u16.to_be_bytes().to_vec()),
                (
                    option::PARAMETERS,
                    vec![
                        option::SUBNET_MASK,
                        option::ROUTER,
                        option::DNS,
                        option::DOMAIN_NAME,
                        option::NTP_SERVERS,
                        option::LEASE_TIME,
                        option::SERVER_ID,
                        option::RENEWAL_TIME,
                        option::REBINDING_TIME,
                    ],
                ),
            ],
        }
    }

    /// The first value of option `code`.
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    /// The message type (option 53).
    pub fn message_type(&self) -> Option<MessageType> {
        match self.option(option::MESSAGE_TYPE) {
            Some([t]) => MessageType::from_u8(*t),
            _ => None,
        }
    }

    fn address_option(&self, code: u8) -> Option<Ipv4Addr> {
        match self.option(code) {
            Some(&[a, b, c, d, ..]) => Some(Ipv4Addr::new(a, b, c, d)),
            _ => None,
        }
    }

    fn addresses_option(&self, code: u8) -> Vec<Ipv4Addr> {
        self.option(code)
            .unwrap_or_default()
            .chunks_exact(4)
            .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
            .collect()
    }

    fn seconds_option(&self, code: u8) -> Option<Duration> {
        match self.option(code) {
            Some(&[a, b, c, d]) => Some(Duration::from_secs(u64::from(u32::from_be_bytes([
                a, b, c, d,
            ])))),
            _ => None,
        }
    }

    /// The wire format, padded to the 300 bytes BOOTP servers expect at least.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(300);
        out.extend_from_slice(&[self.op, 1, 6, 0]); // op, htype Ethernet, hlen, hops
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        let flags = if self.broadcast { BROADCAST_FLAG } else { 0 };
        out.extend_from_slice(&flags.to_be_bytes());
        for address in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&address.octets());
        }
        out.extend_from_slice(&self.chaddr);
        out.resize(out.len() + 10 + 64 + 128, 0); // chaddr padding, sname, file
        out.extend_from_slice(&MAGIC_COOKIE);
        for (code, value) in &self.options {
            for piece in value.chunks(255) {
                out.push(*code);
                out.push(piece.len() as u8);
                out.extend_from_slice(piece);
            }
        }
        out.push(option::END);
        if out.len() < 300 {
            out.resize(300, 0);
        }
        out
    }

    /// Parses a message; options split over several instances are joined (RFC 3396).
    pub fn decode(bytes: &[u8]) -> Result<Packet, String> {
        if bytes.len() < 240 {
            return Err(format!(
                "DHCP message of {} bytes is too short",
                bytes.len()
            ));
        }
        if bytes[236..240] != MAGIC_COOKIE {
            return Err("DHCP message lacks the magic cookie".to_owned());
        }
        if bytes[1] != 1 || bytes[2] != 6 {
            return Err(format!(
                "DHCP message for hardware type {} length {}, expected Ethernet",
                bytes[1], bytes[2]
            ));
        }
        let address =
            |at: usize| Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]);
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&bytes[28..34]);
        let mut options: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut rest = &bytes[240..];
        while let Some((&code, tail)) = rest.split_first() {
            match code {
                option::PAD => rest = tail,
                option::END => break,
                _ => {
                    let (&length, tail) = tail
                        .split_first()
                        .ok_or_else(|| format!("option {code} lacks its length"))?;
                    let length = usize::from(length);
                    if tail.len() < length {
                        return Err(format!("option {code} runs past the end of the message"));
                    }
                    let value = &tail[..length];
                    match options.iter_mut().find(|(c, _)| *c == code) {
                        Some((_, existing)) => existing.extend_from_slice(value),
                        None => options.push((code, value.to_vec())),
                    }
                    rest = &tail[length..];
                }
            }
        }
        Ok(Packet {
            op: bytes[0],
            xid: u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            secs: u16::from_be_bytes([bytes[8], bytes[9]]),
            broadcast: u16::from_be_bytes([bytes[10], bytes[11]]) & BROADCAST_FLAG != 0,
            ciaddr: address(12),
            yiaddr: address(16),
            siaddr: address(20),
            giaddr: address(24),
            chaddr,
            options,
        })
    }
}

/// `DHCPDISCOVER` from `mac`.
pub fn discover(xid: u32, mac: [u8; 6]) -> Packet {
    Packet::request(MessageType::Discover, xid, mac)
}

/// `DHCPREQUEST` accepting `offer` (SELECTING state: requested address and server id).
pub fn request_offer(xid: u32, mac: [u8; 6], offer: &Packet) -> Packet {
    let mut packet = Packet::request(MessageType::Request, xid, mac);
    packet
        .options
        .push((option::REQUESTED_IP, offer.yiaddr.octets().to_vec()));
    if let Some(server) = offer.option(option::SERVER_ID) {
        packet.options.push((option::SERVER_ID, server.to_vec()));
    }
    packet
}

/// `DHCPREQUEST` extending `lease` (RENEWING/REBINDING state: `ciaddr` set, no server id).
pub fn request_renewal(xid: u32, mac: [u8; 6], lease: &Lease) -> Packet {
    let mut packet = Packet::request(MessageType::Request, xid, mac);
    packet.ciaddr = lease.address;
    packet.broadcast = false;
    packet
}

/// An address lease granted by a DHCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The leased address.
    pub address: Ipv4Addr,
    /// Prefix length from the subnet mask (option 1).
    pub prefix: u8,
    /// Default gateway (option 3).
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Domain name (option 15), used as search domain.
    pub domain: Option<String>,
    /// NTP servers (option 42), in the server's order of preference.
    pub ntp: Vec<Ipv4Addr>,
    /// The server that granted it (option 54).
    pub server: Ipv4Addr,
    /// Lease duration (option 51).
    pub lease_time: Duration,
    /// T1: when to start renewing with the granting server.
    pub renewal_time: Duration,
    /// T2: when to start rebinding with any server.
    pub rebinding_time: Duration,
    /// When the ACK arrived; the times above count from here.
    pub obtained: Instant,
}

impl Lease {
    /// Reads a lease from a `DHCPACK`. T1 and T2 default to 1/2 and 7/8 of the lease time.
    pub fn from_ack(ack: &Packet, obtained: Instant) -> Result<Lease, String> {
        if ack.message_type() != Some(MessageType::Ack) {
            return Err(format!("expected a DHCPACK, got {:?}", ack.message_type()));
        }
        if ack.yiaddr.is_unspecified() {
            return Err("DHCPACK carries no address".to_owned());
        }
        let mask = ack
            .address_option(option::SUBNET_MASK)
            .unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
        let mask = u32::from(mask);
        if mask.leading_ones() + mask.trailing_zeros() != 32 {
            return Err(format!(
                "subnet mask {} is not contiguous",
                Ipv4Addr::from(mask)
            ));
        }
        let lease_time = ack
            .seconds_option(option::LEASE_TIME)
            .ok_or("DHCPACK carries no lease time")?;
        let renewal_time = ack
            .seconds_option(option::RENEWAL_TIME)
            .filter(|t| *t < lease_time)
            .unwrap_or(lease_time / 2);
        let rebinding_time = ack
            .seconds_option(option::REBINDING_TIME)
            .filter(|t| *t < lease_time && *t > renewal_time)
            .unwrap_or(lease_time * 7 / 8);
        let domain = ack
            .option(option::DOMAIN_NAME)
            .map(|d| String::from_utf8_lossy(d).trim_end_matches('\0').to_owned())
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_graphic()));
        Ok(Lease {
            address: ack.yiaddr,
            prefix: mask.leading_ones() as u8,
            router: ack.address_option(option::ROUTER),
            dns: ack.addresses_option(option::DNS),
            domain,
            ntp: ack.addresses_option(option::NTP_SERVERS),
            server: ack.address_option(option::SERVER_ID).unwrap_or(ack.siaddr),
            lease_time,
            renewal_time,
            rebinding_time,
            obtained,
        })
    }

    /// When renewal is due (T1).
    pub fn renew_at(&self) -> Instant {
        self.obtained + self.renewal_time
    }

    /// When rebinding is due (T2).
    pub fn rebind_at(&self) -> Instant {
        self.obtained + self.rebinding_time
    }

    /// When the lease runs out.
    pub fn expires_at(&self) -> Instant {
        self.obtained + self.lease_time
    }
}

/// Why an exchange did not yield a lease.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// No (acceptable) answer arrived in time.
    #[error("no DHCP server answered on {interface} within {waited:?}")]
    Timeout {
        /// The interface name.
        interface: String,
        /// How long the client tried.
        waited: Duration,
    },
    /// The server refused; the client must start over with a DISCOVER.
    #[error("the DHCP server {server} refused the request (DHCPNAK)")]
    Nak {
        /// The refusing server.
        server: Ipv4Addr,
    },
    /// The socket failed.
    #[error("DHCP on {interface}: {source}")]
    Io {
        /// The interface name.
        interface: String,
        /// The I/O failure.
        source: io::Error,
    },
    /// The server's ACK was unusable.
    #[error("DHCP on {interface}: {detail}")]
    Invalid {
        /// The interface name.
        interface: String,
        /// What was wrong with the ACK.
        detail: String,
    },
}

/// A random transaction id; std's hasher keys come from the kernel's getrandom.
pub fn random_xid() -> u32 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(Instant::now().elapsed().as_nanos() as u64);
    hasher.finish() as u32
}

/// The DHCP client of one interface.
#[derive(Debug, Clone)]
pub struct Client {
    /// Interface name, for messages.
    pub interface: String,
    /// Hardware address of the interface.
    pub mac: [u8; 6],
    /// How long to wait for each reply before resending (doubled on each retry).
    pub first_timeout: Duration,
    /// Number of DISCOVERs before giving up.
    pub attempts: u32,
}

impl Client {
    /// A client with the RFC's timing shortened for boot: 1 s, 2 s, 4 s, 8 s, 8 s … waits.
    pub fn new(interface: &str, mac: [u8; 6]) -> Client {
        Client {
            interface: interface.to_owned(),
            mac,
            first_timeout: Duration::from_secs(1),
            attempts: 8,
        }
    }

    fn io(&self, source: io::Error) -> DhcpError {
        DhcpError::Io {
            interface: self.interface.clone(),
            source,
        }
    }

    fn socket(&self) -> Result<UdpSocket, DhcpError> {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT))
            .map_err(|e| self.io(e))?;
        socket.set_broadcast(true).map_err(|e| self.io(e))?;
        Ok(socket)
    }

    /// Sends `packet` to `to` and waits up to `wait` for a reply to its xid of one of `accept`.
    fn exchange(
        &self,
        socket: &UdpSocket,
        packet: &Packet,
        to: SocketAddrV4,
        accept: &[MessageType],
        wait: Duration,
    ) -> Result<Option<Packet>, DhcpError> {
        socket
            .send_to(&packet.encode(), to)
            .map_err(|e| self.io(e))?;
        let deadline = Instant::now() + wait;
        let mut buffer = [0u8; 1500];
        let received = receive_until(socket, deadline, &mut buffer, |datagram| {
            let Ok(reply) = Packet::decode(datagram) else {
                return Ok(None); // not DHCP, or broken: not ours to judge
            };
            if reply.op != BOOTREPLY || reply.xid != packet.xid || reply.chaddr != self.mac {
                return Ok(None);
            }
            match reply.message_type() {
                Some(MessageType::Nak) => Err(DhcpError::Nak {
                    server: reply
                        .address_option(option::SERVER_ID)
                        .unwrap_or(Ipv4Addr::UNSPECIFIED),
                }),
                Some(t) if accept.contains(&t) => Ok(Some(reply)),
                _ => Ok(None),
            }
        });
        match received {
            Ok(reply) => Ok(Some(reply)),
            Err(ReceiveError::TimedOut) => Ok(None),
            Err(ReceiveError::Io(e)) => Err(self.io(e)),
            Err(ReceiveError::Refused(nak)) => Err(nak),
        }
    }

    fn timeout(&self, attempt: u32) -> Duration {
        self.first_timeout * (1u32 << attempt.min(3))
    }

    /// Obtains a new lease: DISCOVER, OFFER, REQUEST, ACK, retrying with growing timeouts.
    pub fn obtain(&self) -> Result<Lease, DhcpError> {
        let socket = self.socket()?;
        let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT);
        let started = Instant::now();
        let mut last_nak = None;
        for attempt in 0..self.attempts {
            let xid = random_xid();
            let mut discover = discover(xid, self.mac);
            discover.secs = started.elapsed().as_secs().min(u64::from(u16::MAX)) as u16;
            let wait = self.timeout(attempt);
            let Some(offer) =
                self.exchange(&socket, &discover, broadcast, &[MessageType::Offer], wait)?
            else {
                continue;
            };
            let request = request_offer(xid, self.mac, &offer);
            match self.exchange(&socket, &request, broadcast, &[MessageType::Ack], wait) {
                Ok(Some(ack)) => {
                    return Lease::from_ack(&ack, Instant::now()).map_err(|detail| {
                        DhcpError::Invalid {
                            interface: self.interface.clone(),
                            detail,
                        }
                    })
                }
                Ok(None) => continue,
                Err(nak @ DhcpError::Nak { .. }) => last_nak = Some(nak),
                Err(e) => return Err(e),
            }
        }
        Err(last_nak.unwrap_or(DhcpError::Timeout {
            interface: self.interface.clone(),
            waited: started.elapsed(),
        }))
    }

    /// Extends `lease`: unicast to its server before T2 (renewing), broadcast after (rebinding).
    /// A NAK means the address must be given up and a new lease obtained.
    pub fn renew(&self, lease: &Lease) -> Result<Lease, DhcpError> {
        let socket = self.socket()?;
        let rebinding = Instant::now() >= lease.rebind_at();
        let to = if rebinding || lease.server.is_unspecified() {
            Ipv4Addr::BROADCAST
        } else {
            lease.server
        };
        let request = request_renewal(random_xid(), self.mac, lease);
        for attempt in 0..3 {
            if let Some(ack) = self.exchange(
                &socket,
                &request,
                SocketAddrV4::new(to, SERVER_PORT),
                &[MessageType::Ack],
                self.timeout(attempt),
            )? {
                return Lease::from_ack(&ack, Instant::now()).map_err(|detail| {
                    DhcpError::Invalid {
                        interface: self.interface.clone(),
                        detail,
                    }
                });
            }
        }
        Err(DhcpError::Timeout {
            interface: self.interface.clone(),
            waited: self.timeout(0) + self.timeout(1) + self.timeout(2),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    /// An OFFER as QEMU's user network sends it, written out field by field.
    fn slirp_offer(message_type: u8) -> Vec<u8> {
        let mut b = vec![2u8, 1, 6, 0]; // BOOTREPLY, Ethernet, hlen 6, hops
        b.extend_from_slice(&0xdead_beefu32.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0x80, 0]); // secs, flags: broadcast
        b.extend_from_slice(&[0, 0, 0, 0]); // ciaddr
        b.extend_from_slice(&[10, 0, 2, 15]); // yiaddr
        b.extend_from_slice(&[10, 0, 2, 2]); // siaddr
        b.extend_from_slice(&[0, 0, 0, 0]); // giaddr
        b.extend_from_slice(&MAC);
        b.resize(236, 0);
        b.extend_from_slice(&MAGIC_COOKIE);
        b.extend_from_slice(&[53, 1, message_type]);
        b.extend_from_slice(&[54, 4, 10, 0, 2, 2]);
        b.extend_from_slice(&[1, 4, 255, 255, 255, 0]);
        b.extend_from_slice(&[3, 4, 10, 0, 2, 2]);
        b.extend_from_slice(&[6, 4, 10, 0, 2, 3]);
        b.extend_from_slice(&[0, 0]); // padding between options is allowed
        b.extend_from_slice(&[51, 4, 0, 1, 0x51, 0x80]); // 86400 s
        b.extend_from_slice(&[58, 4, 0, 0, 0x0e, 0x10]); // 3600 s
        b.extend_from_slice(&[255]);
        b.resize(300, 0);
        b
    }

    #[test]
    fn offer_decodes() {
        let offer = Packet::decode(&slirp_offer(2)).expect("decodes");
        assert_eq!(offer.op, BOOTREPLY);
        assert_eq!(offer.xid, 0xdead_beef);
        assert!(offer.broadcast);
        assert_eq!(offer.yiaddr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(offer.chaddr, MAC);
        assert_eq!(offer.message_type(), Some(MessageType::Offer));
        assert_eq!(offer.option(option::SERVER_ID), Some(&[10, 0, 2, 2][..]));
        assert_eq!(offer.options.len(), 7);

        let request = request_offer(0xdead_beef, MAC, &offer);
        let wire = request.encode();
        assert_eq!(wire.len(), 300);
        assert_eq!(&wire[..4], &[1, 1, 6, 0]);
        assert_eq!(&wire[10..12], &[0x80, 0], "broadcast flag set");
        let back = Packet::decode(&wire).expect("own request decodes");
        assert_eq!(back, request);
        assert_eq!(back.message_type(), Some(MessageType::Request));
        assert_eq!(back.option(option::REQUESTED_IP), Some(&[10, 0, 2, 15][..]));
        assert_eq!(back.option(option::SERVER_ID), Some(&[10, 0, 2, 2][..]));
        assert_eq!(
            back.option(option::CLIENT_ID),
            Some(&[1, 0x52, 0x54, 0, 0x12, 0x34, 0x56][..])
        );
    }

    #[test]
    fn ack_gives_a_lease() {
        let ack = Packet::decode(&slirp_offer(5)).expect("decodes");
        let now = Instant::now();
        let lease = Lease::from_ack(&ack, now).expect("lease");
        assert_eq!(lease.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(lease.prefix, 24);
        assert_eq!(lease.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(lease.dns, [Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(lease.server, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(lease.lease_time, Duration::from_secs(86400));
        assert_eq!(lease.renew_at(), now + Duration::from_secs(3600));
        assert_eq!(
            lease.rebind_at(),
            now + Duration::from_secs(75600),
            "7/8 default"
        );
        let offer = Packet::decode(&slirp_offer(2)).expect("decodes");
        assert!(
            Lease::from_ack(&offer, now).is_err(),
            "an OFFER is not a lease"
        );
    }

    #[test]
    fn ack_carries_ntp_servers() {
        let mut b = slirp_offer(5);
        let end = b.iter().rposition(|&byte| byte == 255).expect("END option");
        b.truncate(end);
        b.extend_from_slice(&[42, 8, 10, 0, 2, 2, 192, 0, 2, 123, 255]);
        let lease =
            Lease::from_ack(&Packet::decode(&b).expect("decodes"), Instant::now()).expect("lease");
        assert_eq!(
            lease.ntp,
            [Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 123)]
        );
        let without = Lease::from_ack(
            &Packet::decode(&slirp_offer(5)).expect("decodes"),
            Instant::now(),
        )
        .expect("lease");
        assert!(without.ntp.is_empty(), "{:?}", without.ntp);
        let asked = discover(1, MAC);
        assert!(
            asked
                .option(option::PARAMETERS)
                .is_some_and(|list| list.contains(&option::NTP_SERVERS)),
            "option 42 is requested"
        );
    }

    #[test]
    fn malformed_packets_are_refused() {
        let good = slirp_offer(2);
        assert!(Packet::decode(&good[..200]).is_err());
        let mut bad = good.clone();
        bad[236] = 0;
        assert!(Packet::decode(&bad)
            .expect_err("bad cookie")
            .contains("cookie"));
        let mut truncated = good[..240].to_vec();
        truncated.extend_from_slice(&[51, 4, 0]);
        assert!(Packet::decode(&truncated)
            .expect_err("truncated")
            .contains("past the end"));
    }

    #[test]
    fn split_options_are_joined_and_long_ones_split() {
        let mut b = slirp_offer(2)[..240].to_vec();
        b.extend_from_slice(&[6, 4, 1, 1, 1, 1, 6, 4, 8, 8, 8, 8, 255]);
        let p = Packet::decode(&b).expect("decodes");
        assert_eq!(
            p.addresses_option(option::DNS),
            [Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]
        );
        let mut long = discover(1, MAC);
        long.options.push((option::HOSTNAME, vec![b'a'; 300]));
        let back = Packet::decode(&long.encode()).expect("decodes");
        assert_eq!(back.option(option::HOSTNAME).map(<[u8]>::len), Some(300));
    }

    #[test]
    fn renewal_request_is_unicast_with_ciaddr() {
        let lease = Lease::from_ack(
            &Packet::decode(&slirp_offer(5)).expect("ack"),
            Instant::now(),
        )
        .expect("lease");
        let p = request_renewal(9, MAC, &lease);
        assert_eq!(p.ciaddr, lease.address);
        assert!(!p.broadcast);
        assert_eq!(p.option(option::REQUESTED_IP), None);
        assert_eq!(p.option(option::SERVER_ID), None);
        assert_ne!(random_xid(), random_xid());
    }
}
