//! Installation from a live boot: with `plinth.install=` on the kernel command line (or, on
//! QEMU, in the fw_cfg item `opt/plinth/cmdline`), stage 2 starts no engine. It brings the
//! network up, runs `plinth-update install` (which streams the image to the disk and makes it
//! bootable last) and reboots into the installed disk when that succeeds. A failed installation
//! leaves the machine running, its `install-failed` line on the console.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use os_config::cmdline::{format_arg, Cmdline as Args};
use os_config::definition::Definition;
use os_config::live::{
    ARG_INSTALL, ARG_INSTALL_IMAGE, ARG_INSTALL_SHA256, ARG_INSTALL_WIPE, FW_CFG_ALLOWED,
    FW_CFG_CMDLINE,
};

use crate::stage2::supervise::{command, Service};
use crate::stage2::workload::{start_network, UPDATE_AGENT};
use crate::stage2::Workload;

/// Where the kernel shows a QEMU fw_cfg item's bytes (`qemu_fw_cfg` module).
pub fn fw_cfg_item(sys: &Path, name: &str) -> PathBuf {
    sys.join("firmware/qemu_fw_cfg/by_name")
        .join(name)
        .join("raw")
}

/// What to install, from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRequest {
    /// `plinth.install=`: the target disk or rule.
    pub target: String,
    /// `plinth.install.image=`: the compressed image.
    pub image: String,
    /// `plinth.install.sha256=`: its sha256.
    pub sha256: String,
    /// `plinth.install.wipe`: overwrite a disk that is not empty.
    pub wipe: bool,
}

impl InstallRequest {
    /// Reads the request from the kernel command line `cmdline` plus the installation arguments
    /// of `fw_cfg` (the text of [`FW_CFG_CMDLINE`], if QEMU gave one; other keys in it are
    /// ignored and named in the log). `Ok(None)` without `plinth.install=`.
    pub fn from_cmdline(cmdline: &str, fw_cfg: Option<&str>) -> Result<Option<InstallRequest>> {
        let mut text = cmdline.trim().to_owned();
        if let Some(extra) = fw_cfg {
            for (key, value) in Args::parse(extra).args() {
                if FW_CFG_ALLOWED.contains(&key.as_str()) {
                    text.push(' ');
                    text.push_str(&format_arg(key, value.as_deref()));
                } else {
                    crate::info!(
                        "fw_cfg {FW_CFG_CMDLINE}: ignoring {key}: only {} are taken from it",
                        FW_CFG_ALLOWED.join(", ")
                    );
                }
            }
        }
        let args = Args::parse(&text);
        let Some(target) = args.value(ARG_INSTALL) else {
            return Ok(None);
        };
        let required = |key: &str| -> Result<String> {
            match args.value(key) {
                Some(value) if !value.is_empty() => Ok(value.to_owned()),
                _ => bail!("{ARG_INSTALL}={target} needs {key}= on the kernel command line"),
            }
        };
        Ok(Some(InstallRequest {
            target: target.to_owned(),
            image: required(ARG_INSTALL_IMAGE)?,
            sha256: required(ARG_INSTALL_SHA256)?,
            wipe: args.has(ARG_INSTALL_WIPE),
        }))
    }

    /// The installer's arguments: `install --target … --image … --sha256 … [--wipe]`.
    pub fn installer_args(&self) -> Vec<String> {
        let mut args = vec![
            "install".to_owned(),
            "--target".to_owned(),
            self.target.clone(),
            "--image".to_owned(),
            self.image.clone(),
            "--sha256".to_owned(),
            self.sha256.clone(),
        ];
        if self.wipe {
            args.push("--wipe".to_owned());
        }
        args
    }
}

/// The installation request of this boot, from `/proc/cmdline` and QEMU's fw_cfg.
pub fn requested() -> Result<Option<InstallRequest>> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let fw_cfg = std::fs::read(fw_cfg_item(Path::new("/sys"), FW_CFG_CMDLINE))
        .ok()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    InstallRequest::from_cmdline(&cmdline, fw_cfg.as_deref())
}

/// Stage 2's workload while installing: the network, then the installer, then a reboot.
#[derive(Debug)]
pub struct InstallWorkload {
    /// What to install.
    pub request: InstallRequest,
    /// The image definition (for `[network]`).
    pub definition: Definition,
    /// The installer's executable.
    pub installer: PathBuf,
}

impl InstallWorkload {
    /// Reads the image definition at `path` for the network settings.
    pub fn load(request: InstallRequest, path: &Path) -> Result<InstallWorkload> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the image definition {}: {e}", path.display()))?;
        let definition = Definition::parse(&path.display().to_string(), &text)?;
        Ok(InstallWorkload {
            request,
            definition,
            installer: PathBuf::from(UPDATE_AGENT),
        })
    }
}

impl Workload for InstallWorkload {
    fn services(&self) -> Vec<Box<dyn Service>> {
        Vec::new()
    }

    fn after_start(&self) -> Result<()> {
        crate::info!(
            "installing {} to {}{}",
            self.request.image,
            self.request.target,
            if self.request.wipe { " (wipe)" } else { "" }
        );
        start_network(&self.definition.network);
        let mut installer = command(&self.installer);
        installer.args(self.request.installer_args());
        let pid = match crate::stage2::shutdown::spawn_watched(&mut installer) {
            Ok(pid) => pid,
            Err(e) => {
                crate::status::status(
                    "install-failed",
                    &[
                        ("reason", "no-installer"),
                        (
                            "error",
                            &format!("starting {}: {e}", self.installer.display()),
                        ),
                    ],
                );
                return Ok(());
            }
        };
        let status = loop {
            if let Some(status) = crate::stage2::shutdown::watched_exit(pid) {
                break status;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        match status.as_str() {
            "exit 0" => {
                crate::info!("installed: rebooting into the disk");
                // plinth-init reboots on SIGINT, as on Ctrl-Alt-Del.
                let me = rustix::process::getpid();
                if let Err(e) = rustix::process::kill_process(me, rustix::process::Signal::Int) {
                    crate::info!("asking for the reboot failed: {e}");
                }
            }
            // The installer reported why with its own install-failed line.
            "exit 1" | "exit 3" => {
                crate::info!("the installation failed ({status}): not rebooting")
            }
            other => crate::status::status(
                "install-failed",
                &[
                    ("reason", "installer-crashed"),
                    (
                        "error",
                        &format!("plinth-update install ended with {other}"),
                    ),
                ],
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_request_comes_from_the_command_line_and_fw_cfg() {
        assert_eq!(
            InstallRequest::from_cmdline("plinth.live console=ttyS0", None).expect("parses"),
            None
        );
        let line = format!("plinth.live plinth.install=first-empty:4G plinth.install.image=http://10.0.2.100:8000/a.raw.zst plinth.install.sha256={SHA}");
        let request = InstallRequest::from_cmdline(&line, None)
            .expect("parses")
            .expect("requested");
        assert_eq!(request.target, "first-empty:4G");
        assert!(!request.wipe);
        assert_eq!(
            request.installer_args(),
            [
                "install",
                "--target",
                "first-empty:4G",
                "--image",
                "http://10.0.2.100:8000/a.raw.zst",
                "--sha256",
                SHA
            ]
        );
        // fw_cfg adds the installation arguments only: never a root hash.
        let extra = format!("plinth.install=vda plinth.install.wipe plinth.roothash={SHA} plinth.install.image=file:///i.zst plinth.install.sha256={SHA}\n");
        let request = InstallRequest::from_cmdline("plinth.live plinth.roothash=00", Some(&extra))
            .expect("parses")
            .expect("requested");
        assert_eq!(request.target, "vda");
        assert!(request.wipe);
        assert_eq!(
            request.installer_args().last().map(String::as_str),
            Some("--wipe")
        );
    }

    #[test]
    fn a_request_without_image_or_checksum_names_what_is_missing() {
        let err = InstallRequest::from_cmdline("plinth.install=vda", None).expect_err("no image");
        assert!(
            format!("{err:#}").contains("plinth.install.image="),
            "{err:#}"
        );
        let err = InstallRequest::from_cmdline(
            "plinth.install=vda plinth.install.image=http://h/i",
            None,
        )
        .expect_err("no sha");
        assert!(
            format!("{err:#}").contains("plinth.install.sha256="),
            "{err:#}"
        );
    }
}
