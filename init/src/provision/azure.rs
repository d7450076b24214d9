//! Azure's wireserver protocol for reporting the machine ready: read the goal state, then post a
//! health report naming its incarnation, container and role instance with the state `Ready`.

use anyhow::{bail, Context, Result};

use super::metadata::request;
use super::Env;

/// The protocol version every wireserver request names.
const MS_VERSION: &str = "2012-11-30";
/// Largest goal state document accepted.
const GOAL_STATE_LIMIT: u64 = 1 << 20;
const GOAL_STATE_PATH: &str = "/machine/?comp=goalstate";
const HEALTH_PATH: &str = "/machine?comp=health";

/// What a health report names, from the goal state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoalState {
    /// `<Incarnation>`.
    pub incarnation: String,
    /// `<Container><ContainerId>`.
    pub container_id: String,
    /// `<RoleInstance><InstanceId>`.
    pub instance_id: String,
}

/// The text of the first `<tag>…</tag>` in `xml`, trimmed.
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(xml[start..end].trim())
}

/// Reads the incarnation, container ID and role instance ID from a goal state document.
pub fn goal_state(xml: &str) -> Result<GoalState> {
    let get = |tag: &str, within: &str| -> Result<String> {
        match element(within, tag) {
            Some(text) if !text.is_empty() && !text.contains('<') => Ok(text.to_owned()),
            _ => bail!("the goal state has no <{tag}>"),
        }
    };
    let role = element(xml, "RoleInstance").context("the goal state has no <RoleInstance>")?;
    Ok(GoalState {
        incarnation: get("Incarnation", xml)?,
        container_id: get("ContainerId", xml)?,
        instance_id: get("InstanceId", role)?,
    })
}

/// `text` with the XML special characters escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The health report telling the wireserver the role instance of `goal` is `Ready`.
pub fn health_report(goal: &GoalState) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n\
         <Health xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">\n\
         \x20 <GoalStateIncarnation>{}</GoalStateIncarnation>\n\
         \x20 <Container>\n\
         \x20   <ContainerId>{}</ContainerId>\n\
         \x20   <RoleInstanceList>\n\
         \x20     <Role>\n\
         \x20       <InstanceId>{}</InstanceId>\n\
         \x20       <Health>\n\
         \x20         <State>Ready</State>\n\
         \x20       </Health>\n\
         \x20     </Role>\n\
         \x20   </RoleInstanceList>\n\
         \x20 </Container>\n\
         </Health>\n",
        escape(&goal.incarnation),
        escape(&goal.container_id),
        escape(&goal.instance_id)
    )
}

/// Reads the goal state from the wireserver and reports the machine ready.
pub fn report_ready(env: &Env) -> Result<()> {
    let addr = env.wireserver;
    let headers = [("x-ms-agent-name", "plinth"), ("x-ms-version", MS_VERSION)];
    let what = format!("azure: GET http://{addr}{GOAL_STATE_PATH}");
    let answer = request(
        env,
        "GET",
        addr,
        GOAL_STATE_PATH,
        &headers,
        b"",
        GOAL_STATE_LIMIT,
    )
    .context("azure: reading the goal state")?;
    if answer.status != 200 {
        bail!("{what}: HTTP status {}", answer.status);
    }
    let xml = String::from_utf8(answer.body).with_context(|| format!("{what}: not UTF-8"))?;
    let goal = goal_state(&xml).with_context(|| what.clone())?;
    let report = health_report(&goal);
    let mut post_headers = headers.to_vec();
    post_headers.push(("Content-Type", "text/xml; charset=utf-8"));
    let answer = request(
        env,
        "POST",
        addr,
        HEALTH_PATH,
        &post_headers,
        report.as_bytes(),
        GOAL_STATE_LIMIT,
    )
    .context("azure: reporting ready")?;
    if !(200..300).contains(&answer.status) {
        bail!(
            "azure: POST http://{addr}{HEALTH_PATH}: HTTP status {}",
            answer.status
        );
    }
    crate::info!(
        "azure: reported ready (incarnation {}, instance {})",
        goal.incarnation,
        goal.instance_id
    );
    Ok(())
}

/// Decodes standard base64 (with or without padding, whitespace ignored).
pub fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    };
    let digits: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let unpadded = digits
        .strip_suffix(b"==")
        .or_else(|| digits.strip_suffix(b"="))
        .unwrap_or(&digits);
    if unpadded.len() % 4 == 1 {
        bail!("{} base64 digits cannot encode whole bytes", unpadded.len());
    }
    let mut out = Vec::with_capacity(unpadded.len() / 4 * 3 + 2);
    for chunk in unpadded.chunks(4) {
        let mut bits = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            let v = value(*c).with_context(|| {
                format!(
                    "`{}` at digit {i} of a group is not a base64 digit",
                    char::from(*c)
                )
            })?;
            bits |= v << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::metadata::tests::{env, serve, Request};
    use super::*;

    const GOAL_STATE: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<GoalState xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="goalstate10.xsd">
  <Version>2012-11-30</Version>
  <Incarnation>3</Incarnation>
  <Machine>
    <ExpectedState>Started</ExpectedState>
  </Machine>
  <Container>
    <ContainerId>1b1e3a4c-0000-4c5e-9d0e-111122223333</ContainerId>
    <RoleInstanceList>
      <RoleInstance>
        <InstanceId>a7b4c5d6-0000-4e1f-8a9b-444455556666.vm-1</InstanceId>
        <State>Started</State>
      </RoleInstance>
    </RoleInstanceList>
  </Container>
</GoalState>
"#;

    #[test]
    fn the_goal_state_gives_incarnation_container_and_instance() {
        assert_eq!(
            goal_state(GOAL_STATE).expect("parses"),
            GoalState {
                incarnation: "3".into(),
                container_id: "1b1e3a4c-0000-4c5e-9d0e-111122223333".into(),
                instance_id: "a7b4c5d6-0000-4e1f-8a9b-444455556666.vm-1".into(),
            }
        );
        let err =
            goal_state("<GoalState><Incarnation>1</Incarnation></GoalState>").expect_err("no role");
        assert!(err.to_string().contains("<RoleInstance>"), "{err}");
        let without_container = GOAL_STATE.replace("ContainerId", "Other");
        let err = goal_state(&without_container).expect_err("no container");
        assert!(err.to_string().contains("<ContainerId>"), "{err}");
    }

    #[test]
    fn the_health_report_is_escaped() {
        let report = health_report(&GoalState {
            incarnation: "1".into(),
            container_id: "c<&>".into(),
            instance_id: "i".into(),
        });
        assert!(
            report.contains("<ContainerId>c&lt;&amp;&gt;</ContainerId>"),
            "{report}"
        );
    }

    #[test]
    fn ready_is_reported_to_the_wireserver() {
        let (addr, server) = serve(2, |r: &Request| {
            let versioned = r.headers.get("x-ms-version").map(String::as_str) == Some(MS_VERSION)
                && r.headers.get("x-ms-agent-name").map(String::as_str) == Some("plinth");
            if !versioned {
                return (400, vec![], vec![]);
            }
            match (r.method.as_str(), r.path.as_str()) {
                ("GET", GOAL_STATE_PATH) => (200, vec![], GOAL_STATE.into()),
                ("POST", HEALTH_PATH) => {
                    let body = String::from_utf8_lossy(&r.body);
                    let ok = r.headers.get("content-type").map(String::as_str)
                        == Some("text/xml; charset=utf-8")
                        && body.contains("<GoalStateIncarnation>3</GoalStateIncarnation>")
                        && body.contains(
                            "<ContainerId>1b1e3a4c-0000-4c5e-9d0e-111122223333</ContainerId>",
                        )
                        && body.contains(
                            "<InstanceId>a7b4c5d6-0000-4e1f-8a9b-444455556666.vm-1</InstanceId>",
                        )
                        && body.contains("<State>Ready</State>");
                    if ok {
                        (200, vec![], vec![])
                    } else {
                        (400, vec![], vec![])
                    }
                }
                _ => (404, vec![], vec![]),
            }
        });
        report_ready(&env(addr)).expect("reported");
        let requests = server.join().expect("server");
        assert_eq!(requests[1].method, "POST");
        // A refused report is an error naming the status.
        let (addr, server) = serve(2, |r: &Request| match r.method.as_str() {
            "GET" => (200, vec![], GOAL_STATE.into()),
            _ => (500, vec![], vec![]),
        });
        let err = format!("{:#}", report_ready(&env(addr)).expect_err("refused"));
        assert!(
            err.contains("HTTP status 500") && err.contains("comp=health"),
            "{err}"
        );
        server.join().expect("server");
    }

    #[test]
    fn base64_is_decoded_with_and_without_padding() {
        for (text, want) in [
            ("", &b""[..]),
            ("TQ==", b"M"),
            ("TWE=", b"Ma"),
            ("TWFu", b"Man"),
            ("TWE", b"Ma"),
            ("W25ldHdv\ncmtdCg==", b"[network]\n"),
            ("//79", &[0xff, 0xfe, 0xfd]),
        ] {
            assert_eq!(base64_decode(text).expect(text), want, "{text}");
        }
        assert!(base64_decode("T").is_err());
        assert!(base64_decode("TW!u").is_err());
    }
}
