//! Makes the declared `[[service]]`s exist as declared on a swarm manager, like
//! [`crate::stage2::containers`] does for containers.
//!
//! Every service Plinth creates carries [`MANAGED_LABEL`] and [`SPEC_LABEL`] (the hash of its
//! canonical declaration). A declared service whose hash is unchanged is kept; a changed one is
//! updated in place (a rolling update, as `[service.update]` says); a managed service no longer
//! declared is removed. Services without the managed label are left alone, also when they take
//! a declared name (that one is reported as failed). The overlay networks the services use are
//! made to exist first, and images a baked archive carries are loaded on this node.

#![warn(missing_docs)]

use std::collections::BTreeSet;

use os_config::definition::{published_port, ContainerNetwork, Service};
use serde_json::{json, Map, Value};

use crate::stage2::containers::{self, MANAGED_LABEL, SPEC_LABEL};
use crate::stage2::docker::ServiceSummary;
use crate::stage2::swarm::SwarmEngine;

/// What service reconciliation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Declared services found as declared.
    pub kept: Vec<String>,
    /// Declared services that did not exist.
    pub created: Vec<String>,
    /// Services whose declaration changed, updated in place.
    pub updated: Vec<String>,
    /// Managed services no longer declared.
    pub removed: Vec<String>,
    /// Overlay networks created for the services.
    pub networks_created: Vec<String>,
    /// Services that could not be brought to their declared state, with the reason.
    pub failed: Vec<(String, String)>,
    /// Problems that did not keep any service from being as declared.
    pub warnings: Vec<String>,
}

/// One log line: `kept 1, created 1, updated 0, removed 0, failed 0`.
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kept {}, created {}, updated {}, removed {}, failed {}",
            self.kept.len(),
            self.created.len(),
            self.updated.len(),
            self.removed.len(),
            self.failed.len()
        )?;
        for (name, reason) in &self.failed {
            write!(f, "; {name}: {reason}")?;
        }
        Ok(())
    }
}

/// The sha256 (hex) of a `[[service]]` declaration's canonical JSON.
pub fn spec_hash(decl: &Service) -> String {
    containers::canonical_hash(decl)
}

/// The `POST /services/create` (and update) body for a declaration.
pub fn service_body(decl: &Service, spec_hash: &str) -> Value {
    let mut container = Map::new();
    container.insert("Image".into(), json!(decl.image));
    if !decl.command.is_empty() {
        container.insert("Args".into(), json!(decl.command));
    }
    let env: Vec<String> = decl.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    container.insert("Env".into(), json!(env));
    container.insert("Mounts".into(), Value::Array(mounts(decl)));
    let networks: Vec<Value> = decl
        .networks
        .iter()
        .map(|n| json!({ "Target": n.as_str() }))
        .collect();
    let mode = match decl.replica_count() {
        Some(replicas) => json!({ "Replicated": { "Replicas": replicas } }),
        None => json!({ "Global": {} }),
    };
    let update = decl.update.unwrap_or_default();
    json!({
        "Name": decl.name.as_str(),
        "Labels": { MANAGED_LABEL: "1", SPEC_LABEL: spec_hash },
        "TaskTemplate": {
            "ContainerSpec": Value::Object(container),
            "Placement": { "Constraints": decl.constraints },
            "Networks": networks,
        },
        "Mode": mode,
        "UpdateConfig": {
            "Parallelism": update.parallelism,
            "Delay": u64::try_from(update.delay.0.as_nanos()).unwrap_or(u64::MAX),
        },
        "EndpointSpec": { "Mode": "vip", "Ports": ports(decl) },
    })
}

/// `ContainerSpec.Mounts`: bind mounts, read-only for `:ro`.
fn mounts(decl: &Service) -> Vec<Value> {
    decl.mounts
        .iter()
        .filter_map(|m| {
            let mut parts = m.split(':');
            let (source, target) = (parts.next()?, parts.next()?);
            let read_only = parts.next() == Some("ro");
            Some(json!({ "Type": "bind", "Source": source, "Target": target, "ReadOnly": read_only }))
        })
        .collect()
}

/// `EndpointSpec.Ports`: one routing-mesh entry per port of a range.
fn ports(decl: &Service) -> Vec<Value> {
    let mut out = Vec::new();
    // The definition was validated when parsed; an unparsable port cannot reach here.
    for port in decl.ports.iter().filter_map(|p| published_port(p).ok()) {
        for (published, target) in port.pairs() {
            out.push(json!({
                "Protocol": port.protocol,
                "TargetPort": target,
                "PublishedPort": published,
                "PublishMode": "ingress",
            }));
        }
    }
    out
}

/// Creates the overlay networks the services use that do not exist yet (a changed one is left
/// to the container reconciliation, which recreates declared networks).
fn ensure_networks(
    engine: &dyn SwarmEngine,
    decls: &[Service],
    networks: &[ContainerNetwork],
    report: &mut Report,
) -> Result<(), String> {
    let used: BTreeSet<&str> = decls
        .iter()
        .flat_map(|s| s.networks.iter().map(|n| n.as_str()))
        .collect();
    if used.is_empty() {
        return Ok(());
    }
    let managed = engine.list_managed_networks().map_err(|e| e.to_string())?;
    for network in networks.iter().filter(|n| used.contains(n.name.as_str())) {
        let name = network.name.as_str();
        if managed.iter().any(|n| n.name == name) {
            continue;
        }
        let hash = containers::network_spec_hash(network);
        engine
            .create_network(name, &containers::network_body(network, &hash))
            .map_err(|e| e.to_string())?;
        report.networks_created.push(name.to_owned());
    }
    Ok(())
}

/// Loads the image of each service the engine lacks from a baked archive that carries it; one
/// that no archive carries is left to the engine, which pulls it on every node a task runs on.
fn load_images(
    engine: &dyn SwarmEngine,
    decls: &[Service],
    options: &containers::Options,
    report: &mut Report,
) {
    for decl in decls {
        match engine.image_id(&decl.image) {
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(e) => {
                report.warnings.push(e.to_string());
                continue;
            }
        }
        let Some(archive) = containers::baked_archive_of(&decl.image, &options.images_dir) else {
            continue;
        };
        if let Err(e) = engine.load_image(&archive) {
            report.warnings.push(e.to_string());
        }
    }
}

/// Makes every declared service exist as declared and removes managed services no longer
/// declared. Fails only when the overlay networks cannot be made or the services cannot be
/// listed; a service that cannot be created or updated is recorded in the report.
pub fn reconcile(
    engine: &dyn SwarmEngine,
    decls: &[Service],
    networks: &[ContainerNetwork],
    options: &containers::Options,
) -> Result<Report, String> {
    let mut report = Report::default();
    ensure_networks(engine, decls, networks, &mut report)?;
    load_images(engine, decls, options, &mut report);
    let existing = engine.list_services().map_err(|e| e.to_string())?;
    let managed =
        |s: &ServiceSummary| s.spec.labels.get(MANAGED_LABEL).map(String::as_str) == Some("1");
    for stale in existing
        .iter()
        .filter(|s| managed(s) && !decls.iter().any(|d| d.name.as_str() == s.spec.name))
    {
        match engine.remove_service(&stale.id) {
            Ok(()) => report.removed.push(stale.spec.name.clone()),
            Err(e) => report.warnings.push(e.to_string()),
        }
    }
    for decl in decls {
        let name = decl.name.as_str();
        let hash = spec_hash(decl);
        let body = service_body(decl, &hash);
        let result = match existing.iter().find(|s| s.spec.name == name) {
            None => engine
                .create_service(name, &body)
                .map(|_| report.created.push(name.to_owned())),
            Some(current) if !managed(current) => {
                report.failed.push((name.to_owned(), "a service of that name exists that Plinth did not create: it is left alone (remove it to let Plinth create the declared one)".to_owned()));
                continue;
            }
            Some(current) if current.spec.labels.get(SPEC_LABEL) == Some(&hash) => {
                report.kept.push(name.to_owned());
                continue;
            }
            Some(current) => engine
                .update_service(&current.id, current.version.index, &body)
                .map(|()| report.updated.push(name.to_owned())),
        };
        if let Err(e) = result {
            report.failed.push((name.to_owned(), e.to_string()));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage2::docker::{ObjectVersion, ServiceSpecSummary};
    use crate::stage2::swarm::tests::{definition, FakeSwarm};
    use std::collections::BTreeMap;

    const MANAGER: &str = "[swarm]\nrole = \"manager\"\ninit = true\n";

    fn summary(id: &str, name: &str, labels: &[(&str, &str)], version: u64) -> ServiceSummary {
        ServiceSummary {
            id: id.into(),
            version: ObjectVersion { index: version },
            spec: ServiceSpecSummary {
                name: name.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            },
        }
    }

    #[test]
    fn service_body_matches_the_engine_api() {
        let def = definition(&format!(
            "{MANAGER}[[container-network]]\nname = \"mesh\"\ndriver = \"overlay\"\n[[service]]\nname = \"web\"\nimage = \"nginx:1\"\nreplicas = 3\nports = [\"8080:80\", \"53-54:53-54/udp\"]\nenv = {{ B = \"2\", A = \"1\" }}\nmounts = [\"/var/lib/web:/www:ro\"]\nnetworks = [\"mesh\"]\nconstraints = [\"node.role==worker\"]\ncommand = [\"nginx\", \"-g\", \"daemon off;\"]\nupdate = {{ parallelism = 2, delay = \"10s\" }}\n[[service]]\nname = \"agent\"\nimage = \"agent:1\"\nmode = \"global\"\n"
        ));
        let body = service_body(&def.services[0], "HASH");
        assert_eq!(
            body,
            json!({
                "Name": "web",
                "Labels": { "plinth.managed": "1", "plinth.spec": "HASH" },
                "TaskTemplate": {
                    "ContainerSpec": {
                        "Image": "nginx:1",
                        "Args": ["nginx", "-g", "daemon off;"],
                        "Env": ["A=1", "B=2"],
                        "Mounts": [{ "Type": "bind", "Source": "/var/lib/web", "Target": "/www", "ReadOnly": true }],
                    },
                    "Placement": { "Constraints": ["node.role==worker"] },
                    "Networks": [{ "Target": "mesh" }],
                },
                "Mode": { "Replicated": { "Replicas": 3 } },
                "UpdateConfig": { "Parallelism": 2, "Delay": 10_000_000_000u64 },
                "EndpointSpec": { "Mode": "vip", "Ports": [
                    { "Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress" },
                    { "Protocol": "udp", "TargetPort": 53, "PublishedPort": 53, "PublishMode": "ingress" },
                    { "Protocol": "udp", "TargetPort": 54, "PublishedPort": 54, "PublishMode": "ingress" },
                ] },
            })
        );
        let global = service_body(&def.services[1], "H");
        assert_eq!(global["Mode"], json!({ "Global": {} }));
        assert_eq!(
            global["UpdateConfig"],
            json!({ "Parallelism": 1, "Delay": 0 })
        );
        assert!(global["TaskTemplate"]["ContainerSpec"]
            .get("Args")
            .is_none());
        let mut changed = def.services[0].clone();
        assert_eq!(spec_hash(&changed), spec_hash(&def.services[0]));
        changed.replicas = Some(4);
        assert_ne!(spec_hash(&changed), spec_hash(&def.services[0]));
    }

    #[test]
    fn services_are_created_updated_removed_and_foreign_ones_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let def = definition(&format!(
            "{MANAGER}[[container-network]]\nname = \"mesh\"\ndriver = \"overlay\"\n[[service]]\nname = \"new\"\nimage = \"new:1\"\nnetworks = [\"mesh\"]\n[[service]]\nname = \"same\"\nimage = \"same:1\"\n[[service]]\nname = \"changed\"\nimage = \"changed:2\"\n[[service]]\nname = \"theirs\"\nimage = \"theirs:1\"\n"
        ));
        let same_hash = spec_hash(&def.services[1]);
        let engine = FakeSwarm::default();
        *engine.services.lock().expect("lock") = vec![
            summary(
                "s-same",
                "same",
                &[("plinth.managed", "1"), ("plinth.spec", &same_hash)],
                5,
            ),
            summary(
                "s-changed",
                "changed",
                &[("plinth.managed", "1"), ("plinth.spec", "old")],
                7,
            ),
            summary(
                "s-gone",
                "gone",
                &[("plinth.managed", "1"), ("plinth.spec", "x")],
                2,
            ),
            summary("s-theirs", "theirs", &[], 3),
            summary("s-other", "other", &[("team", "ops")], 3),
        ];
        let options = containers::Options {
            images_dir: dir.path().join("images"),
            ..containers::Options::default()
        };
        let report =
            reconcile(&engine, &def.services, &def.container_networks, &options).expect("lists");
        assert_eq!(
            engine.calls(),
            [
                "create network mesh \"overlay\"",
                "remove service s-gone",
                "create service new",
                "update service s-changed version 7",
            ]
        );
        assert_eq!(report.created, ["new"]);
        assert_eq!(report.kept, ["same"]);
        assert_eq!(report.updated, ["changed"]);
        assert_eq!(report.removed, ["gone"]);
        assert_eq!(report.networks_created, ["mesh"]);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, "theirs");
        assert!(report.failed[0].1.contains("did not create"), "{report}");
        let bodies = engine.bodies.lock().expect("lock").clone();
        assert_eq!(
            bodies[1]["TaskTemplate"]["ContainerSpec"]["Image"],
            "changed:2"
        );

        // The overlay network exists now: the next round creates nothing.
        let again = FakeSwarm::default();
        *again.networks.lock().expect("lock") = engine.networks.lock().expect("lock").clone();
        reconcile(
            &again,
            &def.services[..1],
            &def.container_networks,
            &options,
        )
        .expect("again");
        assert_eq!(again.calls(), ["create service new"]);
    }

    #[test]
    fn a_service_image_from_a_baked_archive_is_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).expect("mkdir");
        // A `docker save` archive of a container's image, tagged app:1.
        let manifest = format!(
            "[{{\"Config\":\"{}.json\",\"RepoTags\":[\"app:1\"],\"Layers\":[]}}]",
            "a".repeat(64)
        );
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(manifest.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "manifest.json", manifest.as_bytes())
            .expect("tar");
        std::fs::write(images.join("app.tar"), builder.into_inner().expect("tar")).expect("w");
        let def = definition(&format!(
            "{MANAGER}[[service]]\nname = \"web\"\nimage = \"app:1\"\n[[service]]\nname = \"db\"\nimage = \"postgres:17\"\n"
        ));
        let engine = FakeSwarm::default();
        let options = containers::Options {
            images_dir: images.clone(),
            ..containers::Options::default()
        };
        reconcile(&engine, &def.services, &[], &options).expect("reconciles");
        let load = format!("load {}", images.join("app.tar").display());
        assert_eq!(
            engine.calls(),
            [load.as_str(), "create service web", "create service db"],
            "postgres:17 is left to the engine's pull"
        );
    }
}
