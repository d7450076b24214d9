//! Network time: an SNTPv4 client (RFC 4330, client mode of RFC 5905) that steps the system clock
//! once at boot and then keeps it in step by slewing, with its servers taken from the
//! configuration, DHCP option 42 and the cloud platform; on a KVM guest with `ptp_kvm`, the host's
//! clock (`/dev/ptpN`, "KVM virtual PTP") when no server answers or there is none.
//!
//! The first answer decides the boot: a `clock-synced` (or `clock-unsynced`) status line and the
//! marker file [`CLOCK_MARKER`], which the update agent waits for before it judges expiry dates or
//! talks TLS.

#![warn(missing_docs)]

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::status;
use crate::udp::ReceiveError;

/// Where plinth-init records the outcome of the first synchronisation: `synced offset-ms=<ms>`,
/// `no-answer` or `no-source`, one line. It exists once the clock is as right as it will get
/// early in the boot.
pub const CLOCK_MARKER: &str = "/run/plinth/clock";

/// The NTP port, used when a server is given without one.
pub const NTP_PORT: u16 = 123;

/// Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01).
const NTP_TO_UNIX_SECONDS: i64 = 2_208_988_800;

const NANOS_PER_SECOND: i64 = 1_000_000_000;

/// Length of an NTP header without extension fields.
pub const PACKET_LEN: usize = 48;

/// Mode of a client request.
pub const MODE_CLIENT: u8 = 3;
/// Mode of a server reply.
pub const MODE_SERVER: u8 = 4;
/// Leap indicator of a server whose clock is not synchronised.
pub const LEAP_UNSYNCHRONISED: u8 = 3;

/// An offset at least this large is stepped at the first synchronisation, smaller ones slewed.
pub const FIRST_STEP_THRESHOLD_NS: i64 = 500_000_000;
/// After the first synchronisation only an offset larger than this is stepped.
pub const STEP_THRESHOLD_NS: i64 = NANOS_PER_SECOND;
/// A slew larger than this is logged.
const LOG_SLEW_THRESHOLD_NS: i64 = 100_000_000;

/// Requests sent to one server per query (readings of a PTP clock); the sample with the lowest
/// delay wins.
const TRIES: u32 = 4;

/// Where the kernel lists its PTP hardware clocks, one `ptpN` folder each with a `clock_name`.
pub const SYS_CLASS_PTP: &str = "/sys/class/ptp";

/// The `clock_name` of the PTP clock `ptp_kvm` registers: the KVM host's `CLOCK_REALTIME`.
pub const KVM_PTP_CLOCK_NAME: &str = "KVM virtual PTP";

/// The stratum reported for the KVM host's clock: a reference clock read directly, as a
/// stratum-1 server reads its own.
pub const PTP_STRATUM: u8 = 1;

/// An NTP timestamp: seconds since 1900 in the high 32 bits, the fraction in the low 32 bits.
/// The seconds wrap every 136 years (eras); see [`Timestamp::to_unix_nanos`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The timestamp of `unix_nanos` nanoseconds after 1970-01-01 (era bits dropped).
    pub fn from_unix_nanos(unix_nanos: i64) -> Timestamp {
        let seconds = unix_nanos.div_euclid(NANOS_PER_SECOND) + NTP_TO_UNIX_SECONDS;
        let nanos = unix_nanos.rem_euclid(NANOS_PER_SECOND) as u64;
        let fraction = (nanos << 32) / NANOS_PER_SECOND as u64;
        Timestamp(((seconds as u64 & 0xffff_ffff) << 32) | fraction)
    }

    /// Nanoseconds since 1970-01-01. Seconds with the top bit set are in era 0 (1968 to
    /// 2036-02-07); with it clear, in era 1 (2036 to 2104): this client never sees times before
    /// 1968.
    pub fn to_unix_nanos(self) -> i64 {
        let seconds = (self.0 >> 32) as i64;
        let era = if seconds & 0x8000_0000 != 0 { 0 } else { 1 };
        let seconds = seconds + (era << 32) - NTP_TO_UNIX_SECONDS;
        let nanos = ((self.0 & 0xffff_ffff) * NANOS_PER_SECOND as u64) >> 32;
        seconds * NANOS_PER_SECOND + nanos as i64
    }
}

/// Nanoseconds since 1970-01-01 of `time` (negative before).
pub fn unix_nanos(time: SystemTime) -> i64 {
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => nanos(after),
        Err(before) => -nanos(before.duration()),
    }
}

/// One NTP packet header (extension fields and MACs are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Leap indicator: 0 none, 1/2 leap second at the end of the day, 3 unsynchronised.
    pub leap: u8,
    /// Protocol version (4).
    pub version: u8,
    /// Association mode: 3 client, 4 server.
    pub mode: u8,
    /// Distance from a reference clock: 1 primary, 2..15 secondary, 0 kiss-o'-death.
    pub stratum: u8,
    /// Poll interval, log2 seconds.
    pub poll: i8,
    /// Clock precision, log2 seconds.
    pub precision: i8,
    /// Round-trip delay to the reference clock, 16.16 fixed-point seconds.
    pub root_delay: u32,
    /// Dispersion to the reference clock, 16.16 fixed-point seconds.
    pub root_dispersion: u32,
    /// Reference identifier; the kiss code for stratum 0.
    pub reference_id: [u8; 4],
    /// When the server's clock was last set.
    pub reference: Timestamp,
    /// The client's transmit timestamp, echoed by the server (T1).
    pub originate: Timestamp,
    /// When the request arrived at the server (T2).
    pub receive: Timestamp,
    /// When the packet left its sender (T3 in a reply).
    pub transmit: Timestamp,
}

impl Packet {
    /// A client request (version 4, mode 3) carrying `transmit`, which the server echoes.
    pub fn request(transmit: Timestamp) -> Packet {
        Packet {
            leap: 0,
            version: 4,
            mode: MODE_CLIENT,
            stratum: 0,
            poll: 0,
            precision: 0,
            root_delay: 0,
            root_dispersion: 0,
            reference_id: [0; 4],
            reference: Timestamp(0),
            originate: Timestamp(0),
            receive: Timestamp(0),
            transmit,
        }
    }

    /// The 48-byte wire format.
    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut out = [0u8; PACKET_LEN];
        out[0] = (self.leap & 3) << 6 | (self.version & 7) << 3 | (self.mode & 7);
        out[1] = self.stratum;
        out[2] = self.poll as u8;
        out[3] = self.precision as u8;
        out[4..8].copy_from_slice(&self.root_delay.to_be_bytes());
        out[8..12].copy_from_slice(&self.root_dispersion.to_be_bytes());
        out[12..16].copy_from_slice(&self.reference_id);
        for (at, timestamp) in [
            (16, self.reference),
            (24, self.originate),
            (32, self.receive),
            (40, self.transmit),
        ] {
            out[at..at + 8].copy_from_slice(&timestamp.0.to_be_bytes());
        }
        out
    }

    /// Parses the header of a packet of at least 48 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Packet, String> {
        let Some(header) = bytes.get(..PACKET_LEN) else {
            return Err(format!(
                "NTP packet of {} bytes is shorter than its {PACKET_LEN}-byte header",
                bytes.len()
            ));
        };
        let word = |at: usize| {
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let timestamp = |at: usize| Timestamp(u64::from(word(at)) << 32 | u64::from(word(at + 4)));
        Ok(Packet {
            leap: header[0] >> 6,
            version: header[0] >> 3 & 7,
            mode: header[0] & 7,
            stratum: header[1],
            poll: header[2] as i8,
            precision: header[3] as i8,
            root_delay: word(4),
            root_dispersion: word(8),
            reference_id: [header[12], header[13], header[14], header[15]],
            reference: timestamp(16),
            originate: timestamp(24),
            receive: timestamp(32),
            transmit: timestamp(40),
        })
    }
}

/// Why a reply to a request was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The reply does not echo the request's transmit timestamp: stale, or not ours.
    #[error("its originate timestamp {got:#018x} is not the request's {sent:#018x}")]
    WrongOriginate {
        /// What the request carried.
        sent: u64,
        /// What the reply echoed.
        got: u64,
    },
    /// Not a server reply.
    #[error("it is mode {0}, not a server reply (mode 4)")]
    NotServer(u8),
    /// Stratum 0: the server asks the client to go away or slow down.
    #[error("kiss-o'-death {0}")]
    Kiss(String),
    /// Stratum above 15 (16 is unsynchronised).
    #[error("stratum {0} is not 1 to 15 (unsynchronised)")]
    BadStratum(u8),
    /// Leap indicator 3: the server's clock is not synchronised.
    #[error("its leap indicator says its clock is unsynchronised")]
    Unsynchronised,
    /// No transmit timestamp.
    #[error("its transmit timestamp is zero")]
    ZeroTransmit,
}

/// Checks a reply to a request that carried `sent` (RFC 4330 section 5).
pub fn check_reply(reply: &Packet, sent: Timestamp) -> Result<(), Rejection> {
    if reply.originate != sent {
        return Err(Rejection::WrongOriginate {
            sent: sent.0,
            got: reply.originate.0,
        });
    }
    if reply.mode != MODE_SERVER {
        return Err(Rejection::NotServer(reply.mode));
    }
    if reply.stratum == 0 {
        let code: String = reply
            .reference_id
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
            .collect();
        return Err(Rejection::Kiss(code));
    }
    if reply.stratum > 15 {
        return Err(Rejection::BadStratum(reply.stratum));
    }
    if reply.leap == LEAP_UNSYNCHRONISED {
        return Err(Rejection::Unsynchronised);
    }
    if reply.transmit.0 == 0 {
        return Err(Rejection::ZeroTransmit);
    }
    Ok(())
}

/// One measurement of the local clock against a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// How far the local clock is behind the server's, in nanoseconds (positive: set it forward).
    pub offset_ns: i64,
    /// Round-trip delay of the exchange, in nanoseconds, not counting the server's own time.
    pub delay_ns: i64,
    /// The server's stratum.
    pub stratum: u8,
    /// The server.
    pub server: SourceAddr,
}

impl Sample {
    /// Offset `((t2 - t1) + (t3 - t4)) / 2` and delay `(t4 - t1) - (t3 - t2)` from the client's
    /// send and receive times `t1`, `t4` and the server's receive and transmit times `t2`, `t3`
    /// (all nanoseconds since 1970). A negative delay (rounding at the server) counts as zero.
    pub fn from_times(t1: i64, t2: i64, t3: i64, t4: i64) -> (i64, i64) {
        let (t1, t2, t3, t4) = (
            i128::from(t1),
            i128::from(t2),
            i128::from(t3),
            i128::from(t4),
        );
        let clamp = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        let offset = ((t2 - t1) + (t3 - t4)) / 2;
        let delay = (t4 - t1) - (t3 - t2);
        (clamp(offset), clamp(delay).max(0))
    }

    /// Offset `clock - (before + after) / 2` and delay `after - before` of a clock read between
    /// two readings of the local one, `before` and `after` (all nanoseconds since 1970). A
    /// negative delay (the local clock set back meanwhile) counts as zero.
    pub fn from_readings(before: i64, clock: i64, after: i64) -> (i64, i64) {
        let (before, clock, after) = (i128::from(before), i128::from(clock), i128::from(after));
        let clamp = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        let midpoint = before + (after - before) / 2;
        (clamp(clock - midpoint), clamp(after - before).max(0))
    }
}

/// Why a server gave no usable sample.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// Nothing (usable) came back.
    #[error("no answer from NTP server {server} to {tries} requests ({timeout:?} each)")]
    NoAnswer {
        /// The server.
        server: SocketAddr,
        /// Requests sent.
        tries: u32,
        /// How long each was waited for.
        timeout: Duration,
    },
    /// The server answered with a reply that cannot be used.
    #[error("NTP server {server} refused: {reason}")]
    Rejected {
        /// The server.
        server: SocketAddr,
        /// What was wrong with its reply.
        reason: Rejection,
    },
    /// The socket failed (no route, port unreachable …).
    #[error("NTP server {server}: {source}")]
    Io {
        /// The server.
        server: SocketAddr,
        /// The I/O failure.
        source: io::Error,
    },
    /// A PTP clock could not be opened or read.
    #[error("reading the PTP clock {}: {source}", device.display())]
    Ptp {
        /// The clock's device (`/dev/ptp0`).
        device: PathBuf,
        /// The failure.
        source: io::Error,
    },
}

/// The system clock as the client reads and corrects it.
pub trait ClockControl {
    /// The current time.
    fn now(&self) -> SystemTime;
    /// Moves the clock by `offset_ns` nanoseconds at once.
    fn step(&self, offset_ns: i64) -> io::Result<()>;
    /// Makes up `offset_ns` nanoseconds gradually (at most 0.5 ms per second).
    fn slew(&self, offset_ns: i64) -> io::Result<()>;
}

/// The kernel's `CLOCK_REALTIME`; after a step also the hardware clock, when there is one, so
/// that the next boot starts close.
#[derive(Debug, Clone)]
pub struct KernelClock {
    /// The hardware clock device (`/dev/rtc0`); skipped when missing.
    pub rtc: PathBuf,
}

impl Default for KernelClock {
    fn default() -> Self {
        KernelClock {
            rtc: PathBuf::from("/dev/rtc0"),
        }
    }
}

impl KernelClock {
    /// Copies the system time to the hardware clock (UTC), to the second.
    fn set_rtc(&self) -> io::Result<()> {
        let rtc = std::fs::OpenOptions::new().read(true).open(&self.rtc)?;
        let seconds = unix_nanos(SystemTime::now()).div_euclid(NANOS_PER_SECOND);
        let time = os_config::units::CivilTime::from_unix(u64::try_from(seconds).unwrap_or(0));
        crate::syscall::rtc_set_time(rtc.as_fd(), &time)
    }
}

impl ClockControl for KernelClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn step(&self, offset_ns: i64) -> io::Result<()> {
        crate::syscall::clock_step(offset_ns)?;
        if self.rtc.exists() {
            if let Err(e) = self.set_rtc() {
                crate::info!("setting the hardware clock {}: {e}", self.rtc.display());
            }
        }
        Ok(())
    }

    fn slew(&self, offset_ns: i64) -> io::Result<()> {
        crate::syscall::clock_slew(offset_ns / 1000)
    }
}

/// A time source: an NTP server or a PTP hardware clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The source as given (`time.example.com:123`, `10.0.2.2`) or found (`/dev/ptp0 (KVM
    /// virtual PTP)`), for messages.
    pub name: String,
    /// Where it is read.
    pub addr: SourceAddr,
}

/// Where a time source is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAddr {
    /// An NTP server's address, resolved once.
    Udp(SocketAddr),
    /// A PTP hardware clock's device (`/dev/ptp0`), read with `clock_gettime`.
    Ptp(PathBuf),
}

impl fmt::Display for SourceAddr {
    /// The address (`10.0.2.2:123`), or the clock's device name (`ptp0`), as status lines show
    /// them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceAddr::Udp(addr) => write!(f, "{addr}"),
            SourceAddr::Ptp(device) => match device.file_name() {
                Some(name) => write!(f, "{}", name.to_string_lossy()),
                None => write!(f, "{}", device.display()),
            },
        }
    }
}

/// Splits `host[:port]` (`[v6]:port` or a bare IPv6 address) into host and port.
fn split_host_port(text: &str) -> Result<(&str, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("`{text}`: port `{p}` is not 1 to 65535"))
    };
    if let Some(rest) = text.strip_prefix('[') {
        let (host, tail) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{text}`: `[` without `]`"))?;
        return match tail {
            "" => Ok((host, NTP_PORT)),
            _ => match tail.strip_prefix(':') {
                Some(p) => Ok((host, port(p)?)),
                None => Err(format!("`{text}`: expected `:port` after `]`")),
            },
        };
    }
    match text.split_once(':') {
        Some((host, p)) if !p.contains(':') => Ok((host, port(p)?)),
        // Two colons or more: a bare IPv6 address.
        _ => Ok((text, NTP_PORT)),
    }
}

/// Parses and resolves a server given as `host[:port]` (port 123 by default); IP literals are
/// taken as they are, names go through the system resolver (as the update agent's fetches do).
pub fn parse_source(text: &str) -> Result<Source, String> {
    let text = text.trim();
    let (host, port) = split_host_port(text)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Source {
            name: text.to_owned(),
            addr: SourceAddr::Udp(SocketAddr::new(ip, port)),
        });
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid_name {
        return Err(format!(
            "`{text}`: `{host}` is neither an IP address nor a host name"
        ));
    }
    let mut addresses = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("`{text}`: resolving `{host}`: {e}"))?;
    let addr = addresses
        .next()
        .ok_or_else(|| format!("`{text}`: `{host}` has no address"))?;
    Ok(Source {
        name: text.to_owned(),
        addr: SourceAddr::Udp(addr),
    })
}

/// The time servers a cloud platform offers its machines: EC2's Time Sync Service, GCE's
/// metadata server; none elsewhere.
pub fn platform_sources(platform_name: &str) -> Vec<Source> {
    let (name, ip) = match platform_name {
        "ec2" => ("169.254.169.123", Ipv4Addr::new(169, 254, 169, 123)),
        "gce" => (
            "metadata.google.internal",
            Ipv4Addr::new(169, 254, 169, 254),
        ),
        _ => return Vec::new(),
    };
    vec![Source {
        name: name.to_owned(),
        addr: SourceAddr::Udp(SocketAddr::new(IpAddr::V4(ip), NTP_PORT)),
    }]
}

/// The device of the KVM host's clock (`dev`/`ptpN` whose `sys_class_ptp`/`ptpN/clock_name` is
/// [`KVM_PTP_CLOCK_NAME`]), the first in name order; `None` on hosts without `ptp_kvm`. Other
/// PTP clocks (a network card's) keep their own time, which may be anything, and are not used.
/// A folder whose `clock_name` cannot be read is skipped.
pub fn kvm_ptp_device(sys_class_ptp: &Path, dev: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_class_ptp).ok()?;
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ptp"))
        .collect();
    names.sort_by_key(|name| (name.len(), name.clone()));
    names.into_iter().find_map(|name| {
        let clock_name = std::fs::read_to_string(sys_class_ptp.join(&name).join("clock_name"));
        match clock_name {
            Ok(text) if text.trim_end() == KVM_PTP_CLOCK_NAME => Some(dev.join(name)),
            _ => None,
        }
    })
}

/// The KVM host's clock as a source (see [`kvm_ptp_device`]).
pub fn kvm_ptp_source(sys_class_ptp: &Path, dev: &Path) -> Option<Source> {
    let device = kvm_ptp_device(sys_class_ptp, dev)?;
    Some(Source {
        name: format!("{} ({KVM_PTP_CLOCK_NAME})", device.display()),
        addr: SourceAddr::Ptp(device),
    })
}

/// The sources to ask, in order: `configured` (`[time] servers`, `host[:port]`), then the DHCP
/// servers (option 42), then the platform's, then the KVM host's clock when this machine has
/// one (`/dev/ptpN`, found under [`SYS_CLASS_PTP`]); an address already listed is not repeated.
/// Entries that do not parse or resolve are left out and described in the second list.
pub fn sources(
    configured: &[String],
    dhcp: &[Ipv4Addr],
    platform: &str,
) -> (Vec<Source>, Vec<String>) {
    let ptp = kvm_ptp_source(Path::new(SYS_CLASS_PTP), Path::new("/dev"));
    sources_with(configured, dhcp, platform, ptp)
}

/// [`sources`] with the PTP clock given (`ptp`, asked last) instead of looked for.
pub fn sources_with(
    configured: &[String],
    dhcp: &[Ipv4Addr],
    platform: &str,
    ptp: Option<Source>,
) -> (Vec<Source>, Vec<String>) {
    let mut errors = Vec::new();
    let mut all = Vec::new();
    for text in configured {
        match parse_source(text) {
            Ok(source) => all.push(source),
            Err(e) => errors.push(format!("[time] servers: {e}")),
        }
    }
    all.extend(dhcp.iter().map(|&ip| Source {
        name: ip.to_string(),
        addr: SourceAddr::Udp(SocketAddr::new(IpAddr::V4(ip), NTP_PORT)),
    }));
    all.extend(platform_sources(platform));
    all.extend(ptp);
    let mut unique: Vec<Source> = Vec::new();
    for source in all {
        if !unique.iter().any(|s| s.addr == source.addr) {
            unique.push(source);
        }
    }
    (unique, errors)
}

/// A transmit timestamp for a request: random, so that a reply cannot be forged without seeing
/// the request and the request does not reveal the local clock (RFC 9109); the local time if
/// the kernel has no random bytes to give.
fn request_timestamp(now: i64) -> Timestamp {
    let mut bytes = [0u8; 8];
    match rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()) {
        Ok(8) if bytes != [0; 8] => Timestamp(u64::from_ne_bytes(bytes)),
        _ => Timestamp::from_unix_nanos(now),
    }
}

/// Asks `addr` for the time: up to four requests, each waited for up to `timeout`; the answer
/// with the lowest delay wins. Reads the real clock; see [`query_with`].
pub fn query(addr: SocketAddr, timeout: Duration) -> Result<Sample, ClockError> {
    query_with(addr, timeout, &KernelClock::default())
}

/// [`query`] measuring against `clock` (only its [`ClockControl::now`] is used).
pub fn query_with(
    addr: SocketAddr,
    timeout: Duration,
    clock: &impl ClockControl,
) -> Result<Sample, ClockError> {
    let io_err = |source: io::Error| ClockError::Io {
        server: addr,
        source,
    };
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(io_err)?;
    // Connected: the kernel drops datagrams from anyone else.
    socket.connect(addr).map_err(io_err)?;
    let mut best: Option<Sample> = None;
    let mut rejected = None;
    for _ in 0..TRIES {
        match exchange(&socket, addr, timeout, clock) {
            Ok(Some(sample)) => {
                if best.as_ref().is_none_or(|b| sample.delay_ns < b.delay_ns) {
                    best = Some(sample);
                }
            }
            Ok(None) => {}
            // A kiss-o'-death asks us to stop sending.
            Err(ClockError::Rejected {
                reason: Rejection::Kiss(code),
                ..
            }) => {
                return Err(ClockError::Rejected {
                    server: addr,
                    reason: Rejection::Kiss(code),
                })
            }
            Err(e @ ClockError::Rejected { .. }) => rejected = Some(e),
            Err(e) => return Err(e),
        }
    }
    match (best, rejected) {
        (Some(sample), _) => Ok(sample),
        (None, Some(rejected)) => Err(rejected),
        (None, None) => Err(ClockError::NoAnswer {
            server: addr,
            tries: TRIES,
            timeout,
        }),
    }
}

/// One request and its reply; `None` when nothing valid arrived within `timeout`.
fn exchange(
    socket: &UdpSocket,
    addr: SocketAddr,
    timeout: Duration,
    clock: &impl ClockControl,
) -> Result<Option<Sample>, ClockError> {
    let io_err = |source: io::Error| ClockError::Io {
        server: addr,
        source,
    };
    let t1 = unix_nanos(clock.now());
    let sent = request_timestamp(t1);
    // T4 is T1 plus the monotonic time elapsed, so a clock change meanwhile cannot skew it.
    let started = Instant::now();
    socket
        .send(&Packet::request(sent).encode())
        .map_err(io_err)?;
    // A wait beyond a century is as good as endless, and `Instant` cannot add much more.
    let deadline = started + timeout.min(Duration::from_secs(100 * 365 * 24 * 3600));
    let mut buffer = [0u8; 512];
    let received = crate::udp::receive_until(socket, deadline, &mut buffer, |datagram| {
        let t4 = t1.saturating_add(i64::try_from(started.elapsed().as_nanos()).unwrap_or(0));
        let Ok(reply) = Packet::decode(datagram) else {
            return Ok(None); // not NTP
        };
        match check_reply(&reply, sent) {
            Ok(()) => Ok(Some((reply, t4))),
            // A late reply to an earlier request, or not ours at all.
            Err(Rejection::WrongOriginate { .. }) => Ok(None),
            Err(reason) => Err(reason),
        }
    });
    let (reply, t4) = match received {
        Ok(answer) => answer,
        Err(ReceiveError::TimedOut) => return Ok(None),
        Err(ReceiveError::Io(e)) => return Err(io_err(e)),
        Err(ReceiveError::Refused(reason)) => {
            return Err(ClockError::Rejected {
                server: addr,
                reason,
            })
        }
    };
    let (offset_ns, delay_ns) = Sample::from_times(
        t1,
        reply.receive.to_unix_nanos(),
        reply.transmit.to_unix_nanos(),
        t4,
    );
    Ok(Some(Sample {
        offset_ns,
        delay_ns,
        stratum: reply.stratum,
        server: SourceAddr::Udp(addr),
    }))
}

/// Reads the PTP clock `device` against `clock` (only its [`ClockControl::now`] is used): four
/// readings, each between two of the local clock; the one with the lowest delay wins
/// ([`Sample::from_readings`]), reported at stratum [`PTP_STRATUM`].
pub fn query_ptp(device: &Path, clock: &impl ClockControl) -> Result<Sample, ClockError> {
    let ptp_err = |source: io::Error| ClockError::Ptp {
        device: device.to_owned(),
        source,
    };
    let file = std::fs::File::open(device).map_err(ptp_err)?;
    let mut best: Option<Sample> = None;
    for _ in 0..TRIES {
        let before = unix_nanos(clock.now());
        let reading = crate::syscall::clock_gettime_fd(file.as_fd()).map_err(ptp_err)?;
        let after = unix_nanos(clock.now());
        let (offset_ns, delay_ns) = Sample::from_readings(before, reading, after);
        if best.as_ref().is_none_or(|b| delay_ns < b.delay_ns) {
            best = Some(Sample {
                offset_ns,
                delay_ns,
                stratum: PTP_STRATUM,
                server: SourceAddr::Ptp(device.to_owned()),
            });
        }
    }
    best.ok_or_else(|| ptp_err(io::Error::other("no reading")))
}

/// Asks `source` for the time: an NTP query or PTP clock readings, measured against `clock`.
fn query_source(
    source: &Source,
    timeout: Duration,
    clock: &impl ClockControl,
) -> Result<Sample, ClockError> {
    match &source.addr {
        SourceAddr::Udp(addr) => query_with(*addr, timeout, clock),
        SourceAddr::Ptp(device) => query_ptp(device, clock),
    }
}

/// Waits up to `timeout` for `marker` to exist; true if it does.
pub fn wait_for_clock(marker: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if marker.exists() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(Duration::from_millis(200)));
    }
}

/// The timing of [`keep_time`].
#[derive(Debug, Clone)]
pub struct Timing {
    /// How long each request waits for its reply.
    pub query_timeout: Duration,
    /// How long the first synchronisation is tried before `clock-unsynced` is reported.
    pub first_sync_for: Duration,
    /// Pause between rounds of the first synchronisation.
    pub first_sync_retry: Duration,
    /// First poll interval after the first synchronisation.
    pub min_poll: Duration,
    /// Longest poll interval; each good poll doubles the interval up to this.
    pub max_poll: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            query_timeout: Duration::from_secs(1),
            first_sync_for: Duration::from_secs(60),
            first_sync_retry: Duration::from_secs(3),
            min_poll: Duration::from_secs(64),
            max_poll: Duration::from_secs(1024),
        }
    }
}

/// Signed milliseconds for status lines: `+1500`, `-3`.
fn signed_ms(nanos: i64) -> String {
    format!("{:+}", nanos / 1_000_000)
}

/// The state of [`keep_time`]: the servers, the clock it corrects and whether it has been set.
#[derive(Debug)]
pub struct Keeper<C> {
    sources: Vec<Source>,
    control: C,
    marker: PathBuf,
    timing: Timing,
    synced: bool,
    poll: Duration,
}

impl<C: ClockControl> Keeper<C> {
    /// A keeper that has not synchronised yet.
    pub fn new(sources: Vec<Source>, control: C, marker: PathBuf, timing: Timing) -> Keeper<C> {
        let poll = timing.min_poll;
        Keeper {
            sources,
            control,
            marker,
            timing,
            synced: false,
            poll,
        }
    }

    /// The clock it corrects.
    pub fn control(&self) -> &C {
        &self.control
    }

    /// Whether the clock has been set from a server.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The first synchronisation: asks the servers in order every few seconds until one answers
    /// or the first-sync time is up, then prints `clock-synced` or `clock-unsynced` and writes
    /// the marker. False when there is nothing to keep (no servers).
    pub fn start(&mut self) -> bool {
        if let Err(e) = std::fs::remove_file(&self.marker) {
            if e.kind() != io::ErrorKind::NotFound {
                crate::info!("removing {}: {e}", self.marker.display());
            }
        }
        if self.sources.is_empty() {
            status::status("clock-unsynced", &[("reason", "no-source")]);
            self.write_marker("no-source");
            return false;
        }
        let deadline = Instant::now() + self.timing.first_sync_for;
        let mut logged = false;
        loop {
            match self.ask() {
                Ok(sample) => {
                    if self.first_sync(&sample) {
                        return true;
                    }
                }
                Err(failures) if !logged => {
                    crate::info!("no time server answered yet: {}", failures.join("; "));
                    logged = true;
                }
                Err(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(self.timing.first_sync_retry));
        }
        let servers: Vec<String> = self.sources.iter().map(|s| s.addr.to_string()).collect();
        status::status(
            "clock-unsynced",
            &[("reason", "no-answer"), ("servers", &servers.join(","))],
        );
        self.write_marker("no-answer");
        true
    }

    /// One poll after [`Keeper::start`]: slews (or steps, beyond 1 s) by the first answer;
    /// before any synchronisation, does the first one. Returns how long to wait until the next.
    pub fn round(&mut self) -> Duration {
        match self.ask() {
            Ok(sample) if !self.synced => {
                self.first_sync(&sample);
            }
            Ok(sample) => {
                if self.correct(&sample) {
                    self.poll = (self.poll * 2).min(self.timing.max_poll);
                }
            }
            Err(failures) => {
                crate::info!("no time server answered: {}", failures.join("; "));
            }
        }
        self.poll
    }

    /// The first answer in source order, or what each server did instead.
    fn ask(&self) -> Result<Sample, Vec<String>> {
        let mut failures = Vec::new();
        for source in &self.sources {
            match query_source(source, self.timing.query_timeout, &self.control) {
                Ok(sample) => return Ok(sample),
                Err(e) => failures.push(format!("{} ({e})", source.name)),
            }
        }
        Err(failures)
    }

    /// Sets the clock by the first sample: a step from 0.5 s on, else a slew. True if set.
    fn first_sync(&mut self, sample: &Sample) -> bool {
        let stepped = sample.offset_ns.abs() >= FIRST_STEP_THRESHOLD_NS;
        let result = if stepped {
            self.control.step(sample.offset_ns)
        } else {
            self.control.slew(sample.offset_ns)
        };
        if let Err(e) = result {
            crate::info!(
                "setting the clock by {} ms from {}: {e}",
                signed_ms(sample.offset_ns),
                sample.server
            );
            return false;
        }
        self.synced = true;
        let offset = signed_ms(sample.offset_ns);
        status::status(
            "clock-synced",
            &[
                ("offset", &offset),
                ("server", &sample.server.to_string()),
                ("stratum", &sample.stratum.to_string()),
                ("delay-ms", &(sample.delay_ns / 1_000_000).to_string()),
                ("stepped", if stepped { "yes" } else { "no" }),
            ],
        );
        self.write_marker(&format!("synced offset-ms={offset}"));
        true
    }

    /// Keeps a synchronised clock in step: a slew, or a step beyond 1 s. True if corrected.
    fn correct(&mut self, sample: &Sample) -> bool {
        let offset = signed_ms(sample.offset_ns);
        let result = if sample.offset_ns.abs() > STEP_THRESHOLD_NS {
            crate::info!(
                "clock is {offset} ms off {}: stepping it again",
                sample.server
            );
            self.control.step(sample.offset_ns)
        } else {
            if sample.offset_ns.abs() > LOG_SLEW_THRESHOLD_NS {
                crate::info!("clock is {offset} ms off {}: slewing it", sample.server);
            }
            self.control.slew(sample.offset_ns)
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                crate::info!("correcting the clock by {offset} ms: {e}");
                false
            }
        }
    }

    /// Writes `line` to the marker (temporary file, then rename); failures are only logged.
    fn write_marker(&self, line: &str) {
        if let Err(e) = write_marker(&self.marker, line) {
            crate::info!("{e:#}");
        }
    }
}

/// Writes `line` and a newline to `marker` atomically, creating its directory.
fn write_marker(marker: &Path, line: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let temporary = marker.with_extension("plinth-tmp");
    std::fs::write(&temporary, format!("{line}\n"))
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, marker)
        .with_context(|| format!("renaming {} to {}", temporary.display(), marker.display()))
}

/// Keeps the clock right from `sources` for ever (run it in its own thread): the first
/// synchronisation as soon as a server answers (step from 0.5 s, else slew), reported by a
/// `clock-synced` status line and `marker`; then a poll every 64 s, doubling to 1024 s. Returns
/// only when there are no sources (`clock-unsynced reason=no-source`).
pub fn keep_time(sources: Vec<Source>, control: impl ClockControl, marker: PathBuf) {
    let mut keeper = Keeper::new(sources, control, marker, Timing::default());
    if !keeper.start() {
        return;
    }
    let mut wait = keeper.timing.min_poll;
    loop {
        std::thread::sleep(wait);
        wait = keeper.round();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const NANOS: i64 = NANOS_PER_SECOND;
    /// 2024-01-01T00:00:00Z.
    const NOW: i64 = 1_704_067_200 * NANOS;
    /// Ten years of 365.25 days.
    const TEN_YEARS: i64 = 315_576_000 * NANOS;

    fn server_reply(sent: Timestamp, receive: i64, transmit: i64) -> Packet {
        Packet {
            leap: 0,
            version: 4,
            mode: MODE_SERVER,
            stratum: 2,
            poll: 6,
            precision: -20,
            root_delay: 0x0000_0100,
            root_dispersion: 0x0000_0200,
            reference_id: [10, 0, 2, 2],
            reference: Timestamp::from_unix_nanos(receive - NANOS),
            originate: sent,
            receive: Timestamp::from_unix_nanos(receive),
            transmit: Timestamp::from_unix_nanos(transmit),
        }
    }

    #[test]
    fn packets_encode_and_decode() {
        let request = Packet::request(Timestamp(0x0123_4567_89ab_cdef));
        let wire = request.encode();
        assert_eq!(wire[0], 0x23, "LI 0, VN 4, mode 3");
        assert_eq!(
            &wire[40..48],
            &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]
        );
        assert_eq!(Packet::decode(&wire), Ok(request));

        let reply = server_reply(Timestamp(7), NOW, NOW + 1000);
        let mut wire = reply.encode().to_vec();
        assert_eq!(wire[0], 0x24, "LI 0, VN 4, mode 4");
        assert_eq!(wire[3], 0xec, "precision -20");
        wire.extend_from_slice(&[0; 20]); // a MAC after the header is ignored
        assert_eq!(Packet::decode(&wire), Ok(reply));
        let err = Packet::decode(&wire[..47]).expect_err("short");
        assert!(err.contains("47 bytes"), "{err}");
    }

    #[test]
    fn timestamps_convert_across_eras() {
        // The Unix epoch is 2 208 988 800 s after the NTP epoch.
        assert_eq!(Timestamp::from_unix_nanos(0), Timestamp(0x83aa_7e80 << 32));
        assert_eq!(Timestamp(0x83aa_7e80 << 32).to_unix_nanos(), 0);
        // Half a second is half of the 32-bit fraction.
        assert_eq!(
            Timestamp::from_unix_nanos(NANOS / 2).0 & 0xffff_ffff,
            0x8000_0000
        );
        // 2036-02-07T06:28:16Z starts era 1: seconds wrap to 0.
        let era1 = 2_085_978_496 * NANOS;
        assert_eq!(Timestamp::from_unix_nanos(era1), Timestamp(0));
        assert_eq!(Timestamp(0).to_unix_nanos(), era1);
        for unix in [
            NOW,
            NOW + 123_456_789,
            era1 - NANOS,
            era1 + 40 * 365 * 86_400 * NANOS,
        ] {
            let back = Timestamp::from_unix_nanos(unix).to_unix_nanos();
            assert!((back - unix).abs() <= 1, "{unix} came back as {back}");
        }
    }

    #[test]
    fn offset_and_delay_follow_the_four_timestamps() {
        // Server 10 s ahead, 20 ms each way, 1 ms inside the server.
        let t1 = NOW;
        let t2 = NOW + 10 * NANOS + 20_000_000;
        let t3 = t2 + 1_000_000;
        let t4 = NOW + 41_000_000;
        assert_eq!(Sample::from_times(t1, t2, t3, t4), (10 * NANOS, 40_000_000));
        // Server behind: a negative offset.
        assert_eq!(
            Sample::from_times(NOW, NOW - NANOS, NOW - NANOS, NOW),
            (-NANOS, 0)
        );
        // A server that says it held the request longer than the round trip took (rounding)
        // gives no delay, not a negative one.
        assert_eq!(Sample::from_times(NOW, NOW, NOW + 10, NOW + 2), (4, 0));
    }

    #[test]
    fn bad_replies_are_refused() {
        let sent = Timestamp(0xfeed_f00d_0000_0001);
        let good = server_reply(sent, NOW, NOW);
        assert_eq!(check_reply(&good, sent), Ok(()));
        let cases: Vec<(Packet, Rejection)> = vec![
            (
                Packet {
                    originate: Timestamp(1),
                    ..good
                },
                Rejection::WrongOriginate {
                    sent: sent.0,
                    got: 1,
                },
            ),
            (
                Packet {
                    mode: MODE_CLIENT,
                    ..good
                },
                Rejection::NotServer(3),
            ),
            (
                Packet {
                    stratum: 0,
                    reference_id: *b"RATE",
                    ..good
                },
                Rejection::Kiss("RATE".into()),
            ),
            (
                Packet {
                    stratum: 16,
                    ..good
                },
                Rejection::BadStratum(16),
            ),
            (
                Packet {
                    leap: LEAP_UNSYNCHRONISED,
                    ..good
                },
                Rejection::Unsynchronised,
            ),
            (
                Packet {
                    transmit: Timestamp(0),
                    ..good
                },
                Rejection::ZeroTransmit,
            ),
        ];
        for (reply, want) in cases {
            assert_eq!(check_reply(&reply, sent), Err(want.clone()), "{want}");
        }
        let kiss = Packet {
            stratum: 0,
            reference_id: *b"DENY",
            ..good
        };
        let text = check_reply(&kiss, sent).expect_err("kiss").to_string();
        assert_eq!(text, "kiss-o'-death DENY");
    }

    /// A fake SNTP server on 127.0.0.1 whose clock is the real one plus `ahead_ns`, answering
    /// `answers` requests with `shape` applied to each reply.
    fn fake_server(
        ahead_ns: i64,
        answers: usize,
        shape: fn(Packet) -> Packet,
    ) -> (SocketAddr, std::thread::JoinHandle<usize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = socket.local_addr().expect("address");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let thread = std::thread::spawn(move || {
            let mut served = 0;
            let mut buffer = [0u8; 512];
            while served < answers {
                let Ok((length, from)) = socket.recv_from(&mut buffer) else {
                    break;
                };
                let request = Packet::decode(&buffer[..length]).expect("request decodes");
                assert_eq!(request.mode, MODE_CLIENT);
                let now = unix_nanos(SystemTime::now()) + ahead_ns;
                let reply = shape(server_reply(request.transmit, now, now));
                socket.send_to(&reply.encode(), from).expect("reply");
                served += 1;
            }
            served
        });
        (addr, thread)
    }

    #[test]
    fn query_measures_a_server_ten_years_ahead() {
        let (addr, server) = fake_server(TEN_YEARS, TRIES as usize, |p| p);
        let sample = query(addr, Duration::from_secs(2)).expect("answer");
        assert_eq!(sample.server, SourceAddr::Udp(addr));
        assert_eq!(sample.stratum, 2);
        assert!(
            (sample.offset_ns - TEN_YEARS).abs() < NANOS / 10,
            "offset {} ns, expected about {TEN_YEARS}",
            sample.offset_ns
        );
        assert!(sample.delay_ns < NANOS, "delay {} ns", sample.delay_ns);
        assert_eq!(server.join().expect("server"), TRIES as usize);
    }

    #[test]
    fn a_silent_server_times_out_by_name() {
        let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = silent.local_addr().expect("address");
        let started = Instant::now();
        let err = query(addr, Duration::from_millis(100)).expect_err("no answer");
        assert!(
            matches!(err, ClockError::NoAnswer { tries: 4, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[test]
    fn a_kiss_of_death_stops_the_query() {
        let (addr, server) = fake_server(0, 1, |p| Packet {
            stratum: 0,
            reference_id: *b"RATE",
            ..p
        });
        let err = query(addr, Duration::from_secs(2)).expect_err("kissed");
        assert!(err.to_string().contains("kiss-o'-death RATE"), "{err}");
        assert_eq!(
            server.join().expect("server"),
            1,
            "no request after the kiss"
        );
    }

    #[test]
    fn sources_are_parsed_in_order_without_repeats() {
        let configured = vec![
            "192.0.2.1".to_owned(),
            "192.0.2.2:1123".to_owned(),
            "[2001:db8::1]:124".to_owned(),
            "2001:db8::2".to_owned(),
            "localhost".to_owned(),
            "bad host".to_owned(),
            "192.0.2.3:0".to_owned(),
        ];
        let dhcp = [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(10, 0, 2, 2)];
        let (list, errors) = sources_with(&configured, &dhcp, "ec2", None);
        let addrs: Vec<String> = list.iter().map(|s| s.addr.to_string()).collect();
        assert_eq!(
            addrs[..4],
            [
                "192.0.2.1:123",
                "192.0.2.2:1123",
                "[2001:db8::1]:124",
                "[2001:db8::2]:123"
            ]
        );
        assert_eq!(list[4].name, "localhost");
        assert!(
            matches!(list[4].addr, SourceAddr::Udp(addr) if addr.ip().is_loopback()),
            "{:?}",
            list[4]
        );
        assert_eq!(addrs[5..], ["10.0.2.2:123", "169.254.169.123:123"]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("`bad host`"), "{errors:?}");
        assert!(errors[1].contains("port `0`"), "{errors:?}");
        assert_eq!(
            platform_sources("gce")[0].addr.to_string(),
            "169.254.169.254:123"
        );
        assert!(platform_sources("metal").is_empty());
    }

    /// A clock that records corrections instead of making them.
    #[derive(Default)]
    struct FakeClock {
        calls: Mutex<Vec<(&'static str, i64)>>,
    }

    impl FakeClock {
        fn calls(&self) -> Vec<(&'static str, i64)> {
            self.calls.lock().expect("lock").clone()
        }
    }

    impl ClockControl for FakeClock {
        fn now(&self) -> SystemTime {
            SystemTime::now()
        }

        fn step(&self, offset_ns: i64) -> io::Result<()> {
            self.calls.lock().expect("lock").push(("step", offset_ns));
            Ok(())
        }

        fn slew(&self, offset_ns: i64) -> io::Result<()> {
            self.calls.lock().expect("lock").push(("slew", offset_ns));
            Ok(())
        }
    }

    fn quick_timing() -> Timing {
        Timing {
            query_timeout: Duration::from_millis(100),
            first_sync_for: Duration::from_millis(300),
            first_sync_retry: Duration::from_millis(100),
            min_poll: Duration::from_millis(10),
            max_poll: Duration::from_millis(40),
        }
    }

    fn source(addr: SocketAddr) -> Source {
        Source {
            name: addr.to_string(),
            addr: SourceAddr::Udp(addr),
        }
    }

    #[test]
    fn first_sync_steps_a_clock_far_off_and_writes_the_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("run/plinth/clock");
        let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let (addr, server) = fake_server(TEN_YEARS, 2 * TRIES as usize, |p| p);
        let sources = vec![source(silent.local_addr().expect("address")), source(addr)];
        let mut keeper = Keeper::new(
            sources,
            FakeClock::default(),
            marker.clone(),
            quick_timing(),
        );
        assert!(keeper.start());
        assert!(keeper.synced());
        let calls = keeper.control().calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].0, "step");
        assert!((calls[0].1 - TEN_YEARS).abs() < NANOS / 10, "{calls:?}");
        let text = std::fs::read_to_string(&marker).expect("marker");
        let ms: i64 = text
            .strip_prefix("synced offset-ms=+")
            .and_then(|rest| rest.strip_suffix('\n'))
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("marker {text:?}"));
        assert!((ms - TEN_YEARS / 1_000_000).abs() < 100, "{text:?}");

        // The fake's clock stays ten years behind: beyond 1 s, later polls step again, and the
        // interval doubles up to its maximum.
        assert_eq!(keeper.round(), Duration::from_millis(20));
        assert_eq!(keeper.control().calls()[1].0, "step");
        drop(silent);
        server.join().expect("server");
    }

    #[test]
    fn a_small_offset_is_slewed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("clock");
        let (addr, server) = fake_server(200_000_000, TRIES as usize, |p| p);
        let mut keeper = Keeper::new(
            vec![source(addr)],
            FakeClock::default(),
            marker.clone(),
            quick_timing(),
        );
        assert!(keeper.start());
        let calls = keeper.control().calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].0, "slew");
        assert!((calls[0].1 - 200_000_000).abs() < 50_000_000, "{calls:?}");
        let text = std::fs::read_to_string(&marker).expect("marker");
        assert!(text.starts_with("synced offset-ms=+"), "{text:?}");
        server.join().expect("server");
    }

    #[test]
    fn no_source_and_no_answer_are_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("clock");
        keep_time(Vec::new(), FakeClock::default(), marker.clone());
        assert_eq!(
            std::fs::read_to_string(&marker).expect("marker"),
            "no-source\n"
        );

        let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let sources = vec![source(silent.local_addr().expect("address"))];
        let mut keeper = Keeper::new(
            sources,
            FakeClock::default(),
            marker.clone(),
            quick_timing(),
        );
        assert!(keeper.start(), "keeps trying in the background");
        assert!(!keeper.synced());
        assert!(keeper.control().calls().is_empty());
        assert_eq!(
            std::fs::read_to_string(&marker).expect("marker"),
            "no-answer\n"
        );
        assert_eq!(keeper.round(), Duration::from_millis(10), "interval kept");
    }

    #[test]
    fn waiting_for_the_clock_ends_with_the_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("clock");
        assert!(!wait_for_clock(&marker, Duration::from_millis(50)));
        let writer = {
            let marker = marker.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                std::fs::write(marker, "no-answer\n").expect("write");
            })
        };
        let started = Instant::now();
        assert!(wait_for_clock(&marker, Duration::from_secs(5)));
        assert!(started.elapsed() < Duration::from_secs(2));
        writer.join().expect("writer");
    }

    #[test]
    fn a_clock_read_between_two_local_readings_gives_offset_and_delay() {
        // The host 10 s ahead, read 1 ms into a 2 ms window.
        assert_eq!(
            Sample::from_readings(NOW, NOW + 10 * NANOS + 1_000_000, NOW + 2_000_000),
            (10 * NANOS, 2_000_000)
        );
        // The host behind: a negative offset, measured from the midpoint.
        assert_eq!(
            Sample::from_readings(NOW, NOW - NANOS + 500, NOW + 1000),
            (-NANOS, 1000)
        );
        // The local clock set back between the readings: no negative delay.
        assert_eq!(Sample::from_readings(NOW, NOW, NOW - 10), (5, 0));
        // Far apart clocks do not overflow.
        assert_eq!(
            Sample::from_readings(i64::MIN, i64::MAX, i64::MIN).0,
            i64::MAX
        );
    }

    /// A fake `/sys/class/ptp` with `clocks` (folder, `clock_name`).
    fn ptp_tree(clocks: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, clock_name) in clocks {
            let folder = dir.path().join(name);
            std::fs::create_dir_all(&folder).expect("folder");
            std::fs::write(folder.join("clock_name"), clock_name).expect("clock_name");
        }
        dir
    }

    #[test]
    fn the_kvm_ptp_clock_is_found_among_others() {
        let dev = Path::new("/dev");
        let tree = ptp_tree(&[
            ("ptp0", "igb\n"),
            ("ptp1", "KVM virtual PTP\n"),
            ("ptp10", "KVM virtual PTP\n"),
        ]);
        assert_eq!(
            kvm_ptp_device(tree.path(), dev),
            Some(PathBuf::from("/dev/ptp1"))
        );
        let source = kvm_ptp_source(tree.path(), dev).expect("a source");
        assert_eq!(source.addr, SourceAddr::Ptp(PathBuf::from("/dev/ptp1")));
        assert_eq!(source.addr.to_string(), "ptp1");
        assert_eq!(source.name, "/dev/ptp1 (KVM virtual PTP)");
    }

    #[test]
    fn a_network_card_ptp_clock_is_not_used() {
        let dev = Path::new("/dev");
        let nic = ptp_tree(&[("ptp0", "igb\n"), ("ptp1", "mlx5_ptp\n")]);
        assert_eq!(kvm_ptp_device(nic.path(), dev), None);
        // A folder without clock_name, and no folder at all.
        let broken = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(broken.path().join("ptp0")).expect("folder");
        assert_eq!(kvm_ptp_device(broken.path(), dev), None);
        assert_eq!(kvm_ptp_device(&broken.path().join("missing"), dev), None);
    }

    #[test]
    fn the_ptp_clock_is_asked_after_the_network_servers() {
        let ptp = Source {
            name: "/dev/ptp0 (KVM virtual PTP)".to_owned(),
            addr: SourceAddr::Ptp(PathBuf::from("/dev/ptp0")),
        };
        let dhcp = [Ipv4Addr::new(10, 0, 2, 2)];
        let (list, errors) =
            sources_with(&["192.0.2.1".to_owned()], &dhcp, "ec2", Some(ptp.clone()));
        assert!(errors.is_empty(), "{errors:?}");
        let addrs: Vec<String> = list.iter().map(|s| s.addr.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "192.0.2.1:123",
                "10.0.2.2:123",
                "169.254.169.123:123",
                "ptp0"
            ]
        );
        let (alone, _) = sources_with(&[], &[], "metal", Some(ptp.clone()));
        assert_eq!(alone, [ptp]);
    }

    #[test]
    fn a_ptp_device_that_is_not_a_clock_fails_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("ptp0");
        std::fs::write(&fake, "").expect("file");
        let err = query_ptp(&fake, &FakeClock::default()).expect_err("not a clock");
        assert!(matches!(err, ClockError::Ptp { .. }), "{err}");
        assert!(
            err.to_string().contains(&fake.display().to_string()),
            "{err}"
        );
        let missing = dir.path().join("ptp9");
        let err = query_ptp(&missing, &FakeClock::default()).expect_err("no device");
        assert!(err.to_string().contains("ptp9"), "{err}");
    }

    #[test]
    fn a_ptp_sample_sets_the_clock_like_a_server_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("clock");
        let mut keeper = Keeper::new(
            Vec::new(),
            FakeClock::default(),
            marker.clone(),
            quick_timing(),
        );
        let sample = Sample {
            offset_ns: TEN_YEARS,
            delay_ns: 2_000,
            stratum: PTP_STRATUM,
            server: SourceAddr::Ptp(PathBuf::from("/dev/ptp0")),
        };
        assert!(keeper.first_sync(&sample));
        assert_eq!(keeper.control().calls(), [("step", TEN_YEARS)]);
        let text = std::fs::read_to_string(&marker).expect("marker");
        assert_eq!(
            text,
            format!("synced offset-ms=+{}\n", TEN_YEARS / 1_000_000)
        );
        assert!(keeper.correct(&Sample {
            offset_ns: 3_000,
            ..sample
        }));
        assert_eq!(keeper.control().calls()[1], ("slew", 3_000));
    }
}
