//! When a staged update may reboot the machine: at once, in a maintenance window (UTC), or once a
//! FleetLock server grants one of its group's reboot slots (the protocol of Zincati and airlock:
//! `POST <url>/v1/pre-reboot` before the reboot, `POST <url>/v1/steady-state` after a good boot),
//! or, on a Docker Swarm node, once it holds the swarm's update lock and is drained
//! ([`swarm_lock`]).

use std::time::Duration;

use anyhow::{Context, Result};
use os_config::definition::{FleetLock, UpdateStrategy, Window};
use sha2::{Digest, Sha256};

use super::agent::Agent;
use super::fetch::{http_post, Client, HttpUrl};
use super::swarm_lock::{self, Step};

const DAY: u64 = 86_400;

/// How soon a refused or unreachable FleetLock server is asked again (at most).
pub const FLEETLOCK_RETRY: Duration = Duration::from_secs(300);

/// Whether a staged update may reboot the machine now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Reboot now (`immediate`, an open window, a granted lock).
    Reboot,
    /// `manual`: the operator reboots.
    Never,
    /// Not yet: why, and when to ask again.
    Wait { reason: String, retry: Duration },
}

/// How soon a lock that could not be given back after a good boot (server or managers not
/// answering yet) is given back again.
pub const RELEASE_RETRY: Duration = Duration::from_secs(15);

/// How soon a reboot waiting for the running boot to settle asks again.
pub const SETTLE_RETRY: Duration = Duration::from_secs(5);

/// Decides for the agent's `[update] strategy`; for FleetLock this takes a reboot slot. No
/// strategy reboots before the running boot has settled ([`Agent::settled`]).
pub fn decide(agent: &Agent) -> Decision {
    let update = agent.definition.update.as_ref();
    if agent.strategy != UpdateStrategy::Manual && !agent.settled() {
        return Decision::Wait {
            reason:
                "the running boot has not settled (bless pending or containers being reconciled)"
                    .to_owned(),
            retry: SETTLE_RETRY,
        };
    }
    match agent.strategy {
        UpdateStrategy::Immediate => Decision::Reboot,
        UpdateStrategy::Manual => Decision::Never,
        UpdateStrategy::Window => match update.and_then(|u| u.window.as_ref()) {
            None => Decision::Never,
            Some(window) => match seconds_until_open(window, (agent.clock)()) {
                0 => Decision::Reboot,
                wait => Decision::Wait {
                    reason: format!("the maintenance window opens in {wait} s"),
                    retry: Duration::from_secs(wait),
                },
            },
        },
        UpdateStrategy::Swarm => match swarm_before_reboot(agent) {
            Ok(Step::Reboot) => Decision::Reboot,
            Ok(Step::Wait { reason, retry }) => Decision::Wait { reason, retry },
            Err(e) => Decision::Wait {
                reason: format!("{e:#}"),
                retry: swarm_lock::LOCK_RETRY,
            },
        },
        UpdateStrategy::Fleetlock => match update.and_then(|u| u.fleetlock.as_ref()) {
            None => Decision::Never,
            Some(lock) => match fleetlock_client(agent, lock).and_then(|c| c.pre_reboot()) {
                Ok(LockReply::Granted) => Decision::Reboot,
                Ok(LockReply::Refused(why)) => Decision::Wait {
                    reason: format!("the FleetLock server refused a reboot slot ({why})"),
                    retry: FLEETLOCK_RETRY,
                },
                Err(e) => Decision::Wait {
                    reason: format!("{e:#}"),
                    retry: FLEETLOCK_RETRY,
                },
            },
        },
    }
}

/// After a good boot, gives a FleetLock reboot slot back (`steady-state`); true once the server
/// agreed, and always for the other strategies.
pub fn release_after_good_boot(agent: &Agent) -> Result<bool> {
    if agent.strategy == UpdateStrategy::Swarm {
        let (local, api) = swarm_lock::engines(agent.definition.swarm.as_ref())?;
        return swarm_lock::after_good_boot(&local.swarm_info()?, &api);
    }
    let lock = match (agent.strategy, agent.definition.update.as_ref()) {
        (UpdateStrategy::Fleetlock, Some(update)) => update.fleetlock.as_ref(),
        _ => None,
    };
    let Some(lock) = lock else {
        return Ok(true);
    };
    match fleetlock_client(agent, lock)?.steady_state()? {
        LockReply::Granted => Ok(true),
        LockReply::Refused(why) => {
            eprintln!("plinth-update: FleetLock steady-state refused: {why}");
            Ok(false)
        }
    }
}

/// [`swarm_lock::before_reboot`] with this machine's engines.
fn swarm_before_reboot(agent: &Agent) -> Result<Step> {
    let (local, api) = swarm_lock::engines(agent.definition.swarm.as_ref())?;
    let info = local
        .swarm_info()
        .context("reading this node's swarm state from its engine")?;
    swarm_lock::before_reboot(&info, &api, (agent.clock)())
}

fn fleetlock_client(agent: &Agent, lock: &FleetLock) -> Result<FleetLockClient> {
    let machine_id = std::fs::read_to_string(&agent.paths.machine_id)
        .with_context(|| format!("reading {}", agent.paths.machine_id.display()))?;
    FleetLockClient::new(lock, &machine_id, agent.client.clone())
}

/// Seconds from `now` (Unix time, UTC) until `window` is open: 0 while it is open.
pub fn seconds_until_open(window: &Window, now: u64) -> u64 {
    let today = now / DAY;
    let start = u64::from(window.start.0) * 60;
    let length = window.length.0.as_secs();
    // 1970-01-01 was a Thursday (index 3, Monday being 0). A window may have opened on an
    // earlier day and still be open; it opens again within a week.
    let mut soonest = u64::MAX;
    for day in today.saturating_sub(7)..=today + 7 {
        let weekday = (day + 3) % 7;
        if !window.days.is_empty() && !window.days.iter().any(|d| d.index() == weekday) {
            continue;
        }
        let opens = day * DAY + start;
        if opens <= now && now < opens + length {
            return 0;
        }
        if opens > now {
            soonest = soonest.min(opens - now);
        }
    }
    soonest
}

/// What a FleetLock server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockReply {
    /// The request was granted (HTTP 200).
    Granted,
    /// Refused, with the server's reason (for example all slots taken).
    Refused(String),
}

/// A FleetLock client for this machine.
#[derive(Debug, Clone)]
pub struct FleetLockClient {
    base: HttpUrl,
    client: Client,
    id: String,
    group: String,
}

impl FleetLockClient {
    /// The client for `[update] fleetlock` and this machine's id (`/etc/machine-id`'s content),
    /// talking through `client` (which holds the TLS trust for an `https://` lock server).
    pub fn new(lock: &FleetLock, machine_id: &str, client: Client) -> Result<FleetLockClient> {
        Ok(FleetLockClient {
            base: HttpUrl::parse(&lock.url).context("[update] fleetlock url")?,
            client,
            id: lock_id(machine_id),
            group: lock.group.to_string(),
        })
    }

    /// The id this machine holds locks with.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Asks for a reboot slot.
    pub fn pre_reboot(&self) -> Result<LockReply> {
        self.call("pre-reboot")
    }

    /// Gives the slot back after a good boot (granted also when this machine held none).
    pub fn steady_state(&self) -> Result<LockReply> {
        self.call("steady-state")
    }

    fn call(&self, operation: &str) -> Result<LockReply> {
        let url = HttpUrl {
            path: format!("{}/v1/{operation}", self.base.path.trim_end_matches('/')),
            ..self.base.clone()
        };
        let body = serde_json::json!({ "client_params": { "id": self.id, "group": self.group } });
        let (status, reply) = http_post(
            &self.client,
            &url,
            &[
                ("fleet-lock-protocol", "true"),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .with_context(|| format!("FleetLock {operation}"))?;
        if status == 200 {
            return Ok(LockReply::Granted);
        }
        // Errors come as `{"kind": "...", "value": "..."}`.
        let reason = serde_json::from_str::<serde_json::Value>(&reply)
            .ok()
            .and_then(|v| {
                let kind = v["kind"].as_str()?.to_owned();
                Some(match v["value"].as_str() {
                    Some(value) => format!("{kind}: {value}"),
                    None => kind,
                })
            })
            .unwrap_or_else(|| reply.trim().chars().take(200).collect());
        Ok(LockReply::Refused(format!("HTTP {status}: {reason}")))
    }
}

/// The id a machine uses with FleetLock: derived from its machine id, not the id itself (which
/// should not leave the machine), as Zincati does.
pub fn lock_id(machine_id: &str) -> String {
    let digest = Sha256::digest(format!("plinth-fleetlock:{}", machine_id.trim()));
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use os_config::definition::{TimeOfDay, Weekday};
    use os_config::units::{Duration as ConfigDuration, Name};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    fn window(days: Vec<Weekday>, start: &str, hours: u64) -> Window {
        Window {
            days,
            start: TimeOfDay::try_from(start.to_owned()).expect("time"),
            length: ConfigDuration(Duration::from_secs(hours * 3600)),
        }
    }

    // 2026-11-28 (a Saturday) 00:00 UTC.
    const SATURDAY: u64 = 1_795_824_000;

    #[test]
    fn windows_open_on_their_days_and_run_past_midnight() {
        assert_eq!((SATURDAY / DAY + 3) % 7, Weekday::Sat.index());
        let nightly = window(Vec::new(), "02:00", 2);
        assert_eq!(seconds_until_open(&nightly, SATURDAY), 2 * 3600);
        assert_eq!(seconds_until_open(&nightly, SATURDAY + 3 * 3600), 0);
        assert_eq!(seconds_until_open(&nightly, SATURDAY + 4 * 3600), 22 * 3600);

        // Sundays 23:00 for 3 h: open on Monday 01:00, closed again at 02:00.
        let sunday = window(vec![Weekday::Sun], "23:00", 3);
        assert_eq!(seconds_until_open(&sunday, SATURDAY), DAY + 23 * 3600);
        assert_eq!(seconds_until_open(&sunday, SATURDAY + 2 * DAY + 3600), 0);
        assert_eq!(
            seconds_until_open(&sunday, SATURDAY + 2 * DAY + 2 * 3600),
            7 * DAY - 3 * 3600
        );
    }

    /// A FleetLock server on 127.0.0.1 answering each request with the next of `replies`;
    /// returns its URL and the requests it saw (request line, headers, body).
    fn server(replies: Vec<(u16, &'static str)>) -> (String, std::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/lock", listener.local_addr().expect("addr"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (status, body) in replies {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request = String::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).expect("read");
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().expect("length");
                    }
                    request.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut content = vec![0u8; length];
                reader.read_exact(&mut content).expect("body");
                request.push_str(&String::from_utf8_lossy(&content));
                tx.send(request).expect("send");
                write!(
                    &stream,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .expect("reply");
            }
        });
        (url, rx)
    }

    #[test]
    fn fleetlock_requests_follow_the_protocol() {
        let (url, requests) = server(vec![
            (409, r#"{"kind":"failed_lock","value":"all 1 slots taken"}"#),
            (200, ""),
            (200, ""),
        ]);
        let lock = FleetLock {
            url,
            group: Name::parse("workers").expect("name"),
        };
        let client = FleetLockClient::new(
            &lock,
            "0123456789abcdef0123456789abcdef\n",
            Client::default(),
        )
        .expect("client");
        assert_eq!(client.id(), lock_id("0123456789abcdef0123456789abcdef"));
        assert_ne!(client.id(), "0123456789abcdef0123456789abcdef");
        assert_eq!(
            client.pre_reboot().expect("answered"),
            LockReply::Refused("HTTP 409: failed_lock: all 1 slots taken".to_owned())
        );
        assert_eq!(client.pre_reboot().expect("answered"), LockReply::Granted);
        assert_eq!(client.steady_state().expect("answered"), LockReply::Granted);
        let seen: Vec<String> = requests.iter().take(3).collect();
        assert!(
            seen[0].starts_with("POST /lock/v1/pre-reboot HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(
            seen[2].starts_with("POST /lock/v1/steady-state HTTP/1.1\r\n"),
            "{}",
            seen[2]
        );
        for request in &seen {
            assert!(
                request.contains("fleet-lock-protocol: true\r\n"),
                "{request}"
            );
            let body = request.rsplit("\r\n\r\n").next().expect("body");
            let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
            assert_eq!(json["client_params"]["group"], "workers");
            assert_eq!(json["client_params"]["id"], client.id());
        }
    }

    #[test]
    fn an_unreachable_lock_server_is_an_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let lock = FleetLock {
            url: format!("http://127.0.0.1:{port}"),
            group: Name::parse("default").expect("name"),
        };
        let client = FleetLockClient::new(&lock, "id", Client::default()).expect("client");
        let err = client.pre_reboot().expect_err("nobody listens");
        assert!(
            format!("{err:#}").contains("FleetLock pre-reboot"),
            "{err:#}"
        );
    }
}
