//! Provisioning in stage 2: before the workload starts, find the platform and the instance's data
//! ([`crate::provision`]), apply the host name, and put Plinth user data over the image
//! definition. Nothing here stops the boot: a source that fails, or user data that is invalid, is
//! reported (`provision-error`) and the image's own definition runs.
//!
//! Console lines: `platform name=…`, then `provisioned source=… platform=… user-data=plinth|
//! ignored|none|invalid [kind=…]` or `provisioned source=none platform=…`,
//! `provision-error source=… error=…` for user data that is not valid, and `hostname name=…
//! from=…` when the instance data names the host. A static network the source gives
//! (`network-config`, `network_data.json`) replaces the image's `[network]`, and user data's
//! `[network]` replaces that.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use os_config::definition::{ENGINE_TLS_IN_IMAGE, ENGINE_TLS_IN_RUN};
use os_config::userdata::{UserData, UserDataKind, USER_DATA_IN_RUN};
use os_config::Definition;

use crate::provision::{self, Env, Found, Platform};
use crate::system::{Paths, RealSystem, System as _};

/// The modules provisioning reads its local sources with: QEMU's fw_cfg and the filesystems of
/// NoCloud and config-2 volumes; and the KVM host's clock, a time source of last resort, which
/// no device announces for coldplug (it loads only on KVM).
const MODULES: [&str; 2] = ["qemu_fw_cfg", "ptp_kvm"];

/// What provisioning made of the machine.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The image definition with the user data applied (the image's own when there was none, or
    /// it was not valid).
    pub definition: Definition,
    /// The platform found.
    pub platform: Platform,
    /// The folder of the engine's TLS files (`ca.pem`, `cert.pem`, `key.pem`): the user data's,
    /// written under `/run`, else the image's when `[engine] tls` is set.
    pub engine_tls: Option<PathBuf>,
}

/// Finds and applies the instance's data over `image`. Never fails: every problem is reported
/// on the console and the image's definition is used.
pub fn provision(paths: &Paths, image: Definition) -> Instance {
    load_modules(paths);
    let env = Env::default();
    let platform = provision::detect_platform(&env);
    crate::status::status("platform", &[("name", platform.name())]);
    let found = find(paths, &env, platform, &image);
    let mut instance = Instance {
        engine_tls: image
            .engine
            .tls
            .as_ref()
            .map(|_| PathBuf::from(ENGINE_TLS_IN_IMAGE)),
        definition: image,
        platform,
    };
    let Some(found) = found else {
        crate::status::status(
            "provisioned",
            &[("source", "none"), ("platform", platform.name())],
        );
        return instance;
    };
    if let Some(network) = &found.network {
        // The platform's static configuration; user data may still replace it.
        instance.definition.network = network.clone();
    }
    let user_data = apply_user_data(&found, &mut instance);
    let hostname = user_data
        .as_ref()
        .and_then(|u| {
            u.hostname
                .as_ref()
                .map(|h| (h.as_str().to_owned(), "user-data"))
        })
        .or_else(|| found.hostname.clone().map(|h| (h, "meta-data")));
    if let Some((name, from)) = hostname {
        match RealSystem::default().set_hostname(&name) {
            Ok(()) => crate::status::status("hostname", &[("name", &name), ("from", from)]),
            Err(e) => crate::info!("setting host name {name:?} from the {from} failed: {e}"),
        }
    }
    if platform == Platform::Azure {
        match provision::azure_report_ready(&env) {
            Ok(()) => crate::status::status("provision-reported", &[("platform", "azure")]),
            Err(e) => crate::info!("reporting ready to Azure failed: {e:#}"),
        }
    }
    instance
}

/// Loads the modules the local sources need; a missing one only narrows the sources.
fn load_modules(paths: &Paths) {
    let sys = RealSystem::default();
    let Some(mut loader) = super::open_modules(&sys, paths) else {
        return;
    };
    let mut wanted: Vec<&str> = MODULES.to_vec();
    wanted.extend(os_config::modules::MEDIA);
    let report = loader.load(&sys, &wanted);
    crate::coldplug::log_report("provisioning modules", &report);
}

/// The local sources, then (on a platform with a metadata service) the network's.
fn find(paths: &Paths, env: &Env, platform: Platform, image: &Definition) -> Option<Found> {
    match provision::find_local(env) {
        Ok(Some(found)) => return Some(found),
        Ok(None) => {}
        Err(e) => crate::info!("reading local instance data failed: {e:#}"),
    }
    if !provision::needs_network(platform) {
        return None;
    }
    // The metadata service is on the network: its NIC driver and an address first. The
    // device-module thread finds this coldplug done and does not repeat it.
    super::coldplug_devices(&RealSystem::default(), paths, &super::BOOT_COLDPLUG);
    super::workload::start_network(&image.network);
    match provision::find_network(env, platform) {
        Ok(found) => found,
        Err(e) => {
            crate::status::status(
                "provision-error",
                &[("source", platform.name()), ("error", &format!("{e:#}"))],
            );
            None
        }
    }
}

/// Classifies and applies the user data of `found`; returns it when it was Plinth's and valid.
fn apply_user_data(found: &Found, instance: &mut Instance) -> Option<UserData> {
    let source = found.source;
    let platform = instance.platform.name();
    let provisioned = |user_data: &str, kind: Option<&str>| {
        let mut fields = vec![
            ("source", source),
            ("platform", platform),
            ("user-data", user_data),
        ];
        fields.extend(kind.map(|k| ("kind", k)));
        crate::status::status("provisioned", &fields);
    };
    let Some(bytes) = found.user_data.as_deref() else {
        provisioned("none", None);
        return None;
    };
    let file = format!("{source}:user-data");
    let error = |message: String| {
        crate::status::status(
            "provision-error",
            &[("source", source), ("error", &message)],
        );
        provisioned("invalid", None);
    };
    let user_data = match os_config::userdata::classify(&file, bytes) {
        Ok(UserDataKind::Plinth(user_data)) => user_data,
        Ok(UserDataKind::Foreign(kind)) => {
            crate::info!("the {source} user data is {kind}, not Plinth's: ignored");
            provisioned("ignored", Some(kind));
            return None;
        }
        Ok(UserDataKind::Empty) => {
            provisioned("none", None);
            return None;
        }
        Err(e) => {
            error(e.to_string());
            return None;
        }
    };
    let definition = match user_data.apply(&instance.definition) {
        Ok(definition) => definition,
        Err(e) => {
            error(format!("{file}: {e}"));
            return None;
        }
    };
    if let Some(tls) = user_data.engine.as_ref().and_then(|e| e.tls.as_ref()) {
        match write_engine_tls(Path::new(ENGINE_TLS_IN_RUN), tls) {
            Ok(()) => instance.engine_tls = Some(PathBuf::from(ENGINE_TLS_IN_RUN)),
            Err(e) => {
                error(format!("{file}: engine.tls: {e:#}"));
                return None;
            }
        }
    }
    if let Err(e) = keep_user_data(bytes) {
        crate::info!("{e:#}: the update agent sees the image's [update] only");
    }
    instance.definition = definition;
    provisioned("plinth", None);
    Some(user_data)
}

/// Writes the user data's engine certificates and key into `dir` (the key readable by root only).
fn write_engine_tls(dir: &Path, tls: &os_config::userdata::EngineTlsPem) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text, mode) in [
        ("ca.pem", &tls.ca, 0o644),
        ("cert.pem", &tls.cert, 0o644),
        ("key.pem", &tls.key, 0o600),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    Ok(())
}

/// Keeps the accepted user data under `/run` for the update agent, which applies its `[update]`.
fn keep_user_data(bytes: &[u8]) -> Result<()> {
    let path = Path::new("/run").join(USER_DATA_IN_RUN);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
}
