//! rtnetlink requests (link up, IPv4 addresses, routes) built as bytes and sent over a
//! `NETLINK_ROUTE` socket, each acknowledged by the kernel.
//!
//! Messages are little-endian as on every architecture Plinth targets (x86-64); the layout is
//! `nlmsghdr` (16 bytes), the family header, then `rtattr`s padded to 4 bytes.

#![warn(missing_docs)]

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

/// `RTM_NEWLINK`: change a link's flags.
pub const RTM_NEWLINK: u16 = 16;
/// `RTM_NEWADDR`: add (or replace) an address.
pub const RTM_NEWADDR: u16 = 20;
/// `RTM_DELADDR`: remove an address.
pub const RTM_DELADDR: u16 = 21;
/// `RTM_GETADDR`: list addresses.
pub const RTM_GETADDR: u16 = 22;
/// `RTM_NEWROUTE`: add (or replace) a route.
pub const RTM_NEWROUTE: u16 = 24;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

const RT_TABLE_MAIN: u8 = 254;
const RTN_UNICAST: u8 = 1;

/// `RTPROT_BOOT`: routes set up at boot (static configuration).
pub const RTPROT_BOOT: u8 = 3;
/// `RTPROT_DHCP`: routes learnt by DHCP.
pub const RTPROT_DHCP: u8 = 16;
/// `RT_SCOPE_UNIVERSE`: a route through a gateway.
pub const RT_SCOPE_UNIVERSE: u8 = 0;
/// `RT_SCOPE_LINK`: a destination directly on the link.
pub const RT_SCOPE_LINK: u8 = 253;

/// Appends an `nlmsghdr` for a message whose payload is filled in afterwards.
fn start(msg_type: u16, flags: u16, seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&0u32.to_le_bytes()); // length, patched by `finish`
    out.extend_from_slice(&msg_type.to_le_bytes());
    out.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // port id: the kernel fills it in
    out
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let length = out.len() as u32;
    out[..4].copy_from_slice(&length.to_le_bytes());
    out
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().div_ceil(4) * 4, 0);
}

/// `RTM_NEWLINK` setting `IFF_UP` on link `index`.
pub fn link_up(seq: u32, index: u32) -> Vec<u8> {
    let mut out = start(RTM_NEWLINK, 0, seq);
    out.push(AF_UNSPEC);
    out.push(0); // padding
    out.extend_from_slice(&0u16.to_le_bytes()); // device type: unchanged
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&IFF_UP.to_le_bytes()); // flags
    out.extend_from_slice(&IFF_UP.to_le_bytes()); // change mask
    finish(out)
}

fn address_message(
    msg_type: u16,
    flags: u16,
    seq: u32,
    index: u32,
    address: Ipv4Addr,
    prefix: u8,
) -> Vec<u8> {
    let mut out = start(msg_type, flags, seq);
    out.extend_from_slice(&[AF_INET, prefix, 0, RT_SCOPE_UNIVERSE]);
    out.extend_from_slice(&index.to_le_bytes());
    attr(&mut out, IFA_LOCAL, &address.octets());
    attr(&mut out, IFA_ADDRESS, &address.octets());
    if prefix < 31 {
        let host_mask = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
        let broadcast = Ipv4Addr::from(u32::from(address) | host_mask);
        attr(&mut out, IFA_BROADCAST, &broadcast.octets());
    }
    finish(out)
}

/// `RTM_NEWADDR` adding `address/prefix` (with its broadcast address) to link `index`, replacing
/// the same address if present.
pub fn new_address(seq: u32, index: u32, address: Ipv4Addr, prefix: u8) -> Vec<u8> {
    address_message(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_REPLACE,
        seq,
        index,
        address,
        prefix,
    )
}

/// `RTM_DELADDR` removing `address/prefix` from link `index`.
pub fn delete_address(seq: u32, index: u32, address: Ipv4Addr, prefix: u8) -> Vec<u8> {
    address_message(RTM_DELADDR, 0, seq, index, address, prefix)
}

/// An IPv4 route in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destination network (`0.0.0.0` with `prefix` 0 for the default route).
    pub destination: Ipv4Addr,
    /// Prefix length of the destination.
    pub prefix: u8,
    /// Next hop; `None` for a destination on the link.
    pub gateway: Option<Ipv4Addr>,
    /// Outgoing link index.
    pub interface: u32,
    /// Who set it up: [`RTPROT_BOOT`] or [`RTPROT_DHCP`].
    pub protocol: u8,
}

/// `RTM_NEWROUTE` adding (or replacing) a route.
pub fn new_route(seq: u32, route: &Route) -> Vec<u8> {
    let mut out = start(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq);
    let scope = if route.gateway.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        RT_SCOPE_LINK
    };
    out.extend_from_slice(&[
        AF_INET,
        route.prefix,
        0, // source length
        0, // tos
        RT_TABLE_MAIN,
        route.protocol,
        scope,
        RTN_UNICAST,
    ]);
    out.extend_from_slice(&0u32.to_le_bytes()); // rtm_flags
    if route.prefix > 0 {
        attr(&mut out, RTA_DST, &route.destination.octets());
    }
    if let Some(gateway) = route.gateway {
        attr(&mut out, RTA_GATEWAY, &gateway.octets());
    }
    attr(&mut out, RTA_OIF, &route.interface.to_le_bytes());
    finish(out)
}

/// Looks for the acknowledgement of request `seq` in a buffer of netlink messages:
/// `Some(0)` for success, `Some(-errno)` for a refusal, `None` if it is not in this buffer.
pub fn find_ack(buffer: &[u8], seq: u32) -> io::Result<Option<i32>> {
    let mut rest = buffer;
    while rest.len() >= 16 {
        let length = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if length < 16 || length > rest.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "netlink message length {length} does not fit the {} bytes received",
                    rest.len()
                ),
            ));
        }
        let msg_type = u16::from_le_bytes([rest[4], rest[5]]);
        let msg_seq = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
        if msg_type == NLMSG_ERROR && msg_seq == seq && length >= 20 {
            let code = i32::from_le_bytes([rest[16], rest[17], rest[18], rest[19]]);
            return Ok(Some(code));
        }
        rest = &rest[length.div_ceil(4) * 4..];
    }
    Ok(None)
}

/// `RTM_GETADDR` dumping every IPv4 address of every link (no acknowledgement: the dump ends
/// with `NLMSG_DONE`).
pub fn dump_ipv4_addresses(seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&RTM_GETADDR.to_le_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&[AF_INET, 0, 0, 0]);
    out.extend_from_slice(&0u32.to_le_bytes());
    finish(out)
}

/// One IPv4 address of a link, from an `RTM_NEWADDR` message of a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddress {
    /// The link's index.
    pub index: u32,
    /// The address (`IFA_LOCAL`, else `IFA_ADDRESS`).
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
}

/// Reads the `RTM_NEWADDR` messages of dump `seq` in a buffer into `out`; returns true once the
/// dump's `NLMSG_DONE` was seen. Every length is checked against the bytes received.
pub fn read_address_dump(buffer: &[u8], seq: u32, out: &mut Vec<LinkAddress>) -> io::Result<bool> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut rest = buffer;
    while rest.len() >= 16 {
        let length = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if length < 16 || length > rest.len() {
            return Err(bad(format!(
                "netlink message length {length} does not fit the {} bytes received",
                rest.len()
            )));
        }
        let msg_type = u16::from_le_bytes([rest[4], rest[5]]);
        let msg_seq = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let message = &rest[..length];
        rest = &rest[length.div_ceil(4).saturating_mul(4).min(rest.len())..];
        if msg_seq != seq {
            continue;
        }
        match msg_type {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR if length >= 20 => {
                let code = i32::from_le_bytes([message[16], message[17], message[18], message[19]]);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            RTM_NEWADDR if length >= 24 && message[16] == AF_INET => {
                let prefix = message[17];
                let index =
                    u32::from_le_bytes([message[20], message[21], message[22], message[23]]);
                let (mut local, mut address) = (None, None);
                let mut attrs = &message[24..];
                while attrs.len() >= 4 {
                    let attr_len = usize::from(u16::from_le_bytes([attrs[0], attrs[1]]));
                    if attr_len < 4 || attr_len > attrs.len() {
                        return Err(bad(format!(
                            "netlink attribute length {attr_len} does not fit its message"
                        )));
                    }
                    let kind = u16::from_le_bytes([attrs[2], attrs[3]]);
                    if let Ok(octets) = <[u8; 4]>::try_from(&attrs[4..attr_len]) {
                        match kind {
                            IFA_LOCAL => local = Some(Ipv4Addr::from(octets)),
                            IFA_ADDRESS => address = Some(Ipv4Addr::from(octets)),
                            _ => {}
                        }
                    }
                    attrs = &attrs[attr_len.div_ceil(4).saturating_mul(4).min(attrs.len())..];
                }
                if let Some(address) = local.or(address) {
                    out.push(LinkAddress {
                        index,
                        address,
                        prefix,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// A `NETLINK_ROUTE` socket that sends one request at a time and waits for its acknowledgement.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// Opens the socket; replies are awaited for at most five seconds.
    pub fn open() -> io::Result<Socket> {
        // Protocol 0 of AF_NETLINK is NETLINK_ROUTE.
        let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None)?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(5)),
        )?;
        Ok(Socket { fd, seq: 1 })
    }

    /// Sends the request `build(seq)` to the kernel and waits for its acknowledgement; a refusal
    /// becomes the matching OS error.
    pub fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let message = build(seq);
        // An unconnected netlink socket sends to the kernel (port id 0).
        let sent = rustix::net::send(&self.fd, &message, SendFlags::empty())?;
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short netlink send",
            ));
        }
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let received = rustix::net::recv(&self.fd, &mut buffer, RecvFlags::empty())?;
            match find_ack(&buffer[..received], seq)? {
                Some(0) => return Ok(()),
                Some(code) => return Err(io::Error::from_raw_os_error(-code)),
                None => continue,
            }
        }
    }

    /// Every IPv4 address of every link.
    pub fn ipv4_addresses(&mut self) -> io::Result<Vec<LinkAddress>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let message = dump_ipv4_addresses(seq);
        let sent = rustix::net::send(&self.fd, &message, SendFlags::empty())?;
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short netlink send",
            ));
        }
        let mut buffer = vec![0u8; 32 * 1024];
        let mut out = Vec::new();
        loop {
            let received = rustix::net::recv(&self.fd, &mut buffer, RecvFlags::empty())?;
            if read_address_dump(&buffer[..received], seq, &mut out)? {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_dumps_are_read_and_checked() {
        let request = dump_ipv4_addresses(9);
        assert_eq!(request.len(), 24);
        assert_eq!(
            &request[4..8],
            &[22, 0, 0x01, 0x03],
            "RTM_GETADDR, REQUEST | DUMP"
        );
        // The kernel answers a dump with RTM_NEWADDR messages shaped like our own requests.
        let mut answer = new_address(9, 3, Ipv4Addr::new(10, 0, 0, 5), 24);
        answer.extend(new_address(8, 4, Ipv4Addr::new(10, 9, 9, 9), 8)); // another request's
        let mut done = vec![20, 0, 0, 0, 3, 0, 2, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut out = Vec::new();
        assert!(!read_address_dump(&answer, 9, &mut out).expect("reads"));
        assert_eq!(
            out,
            [LinkAddress {
                index: 3,
                address: Ipv4Addr::new(10, 0, 0, 5),
                prefix: 24
            }]
        );
        assert!(read_address_dump(&done, 9, &mut out).expect("done"));
        done[0] = 200;
        assert!(
            read_address_dump(&done, 9, &mut out).is_err(),
            "a length past the buffer"
        );
        let mut broken = new_address(9, 3, Ipv4Addr::new(10, 0, 0, 5), 24);
        broken[24] = 200; // the first attribute claims more than the message holds
        assert!(read_address_dump(&broken, 9, &mut out).is_err());
    }

    #[test]
    fn new_address_is_byte_exact() {
        // What `ip -4 addr replace 10.0.2.15/24 dev <index 2>` sends (with ACK requested).
        let message = new_address(7, 2, Ipv4Addr::new(10, 0, 2, 15), 24);
        let expected: Vec<u8> = [
            &[48, 0, 0, 0][..],           // length
            &[20, 0],                     // RTM_NEWADDR
            &[0x05, 0x05],                // REQUEST | ACK | REPLACE | CREATE
            &[7, 0, 0, 0],                // seq
            &[0, 0, 0, 0],                // port id
            &[2, 24, 0, 0],               // AF_INET, prefix, flags, scope
            &[2, 0, 0, 0],                // index
            &[8, 0, 2, 0, 10, 0, 2, 15],  // IFA_LOCAL
            &[8, 0, 1, 0, 10, 0, 2, 15],  // IFA_ADDRESS
            &[8, 0, 4, 0, 10, 0, 2, 255], // IFA_BROADCAST
        ]
        .concat();
        assert_eq!(message, expected);
        let deleted = delete_address(8, 2, Ipv4Addr::new(10, 0, 2, 15), 24);
        assert_eq!(&deleted[4..8], &[21, 0, 0x05, 0]);
        let host = new_address(1, 3, Ipv4Addr::new(192, 168, 1, 1), 32);
        assert_eq!(host.len(), 40, "no broadcast for a /32");
    }

    #[test]
    fn link_up_and_routes_are_byte_exact() {
        let up = link_up(1, 1);
        assert_eq!(
            up,
            [
                32, 0, 0, 0, 16, 0, 5, 0, 1, 0, 0, 0, 0, 0, 0, 0, // header
                0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, // ifinfomsg
            ]
        );
        let default = new_route(
            3,
            &Route {
                destination: Ipv4Addr::UNSPECIFIED,
                prefix: 0,
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
                interface: 2,
                protocol: RTPROT_DHCP,
            },
        );
        assert_eq!(
            default,
            [
                44, 0, 0, 0, 24, 0, 5, 5, 3, 0, 0, 0, 0, 0, 0, 0, // header
                2, 0, 0, 0, 254, 16, 0, 1, 0, 0, 0, 0, // rtmsg
                8, 0, 5, 0, 10, 0, 2, 2, // RTA_GATEWAY
                8, 0, 4, 0, 2, 0, 0, 0, // RTA_OIF
            ]
        );
        let broadcast = new_route(
            4,
            &Route {
                destination: Ipv4Addr::BROADCAST,
                prefix: 32,
                gateway: None,
                interface: 2,
                protocol: RTPROT_BOOT,
            },
        );
        assert_eq!(
            &broadcast[16..28],
            &[2, 32, 0, 0, 254, 3, 253, 1, 0, 0, 0, 0]
        );
        assert_eq!(&broadcast[28..36], &[8, 0, 1, 0, 255, 255, 255, 255]);
    }

    #[test]
    fn acknowledgements_are_found_by_sequence() {
        let ack = |seq: u32, code: i32| -> Vec<u8> {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_le_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_le_bytes());
            m.extend_from_slice(&0u16.to_le_bytes());
            m.extend_from_slice(&seq.to_le_bytes());
            m.extend_from_slice(&99u32.to_le_bytes());
            m.extend_from_slice(&code.to_le_bytes());
            m.extend_from_slice(&[0u8; 16]); // echoed request header
            m
        };
        let mut buffer = ack(4, -17);
        buffer.extend(ack(5, 0));
        assert_eq!(find_ack(&buffer, 4).expect("parses"), Some(-17));
        assert_eq!(find_ack(&buffer, 5).expect("parses"), Some(0));
        assert_eq!(find_ack(&buffer, 6).expect("parses"), None);
        buffer[0] = 200;
        assert!(find_ack(&buffer, 4).is_err(), "length past the end");
    }
}
