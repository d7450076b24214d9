//! The fixed shape of every image's root tree: the merged-/usr mapping, the directories that are
//! always there, the ones mounted over at run time, and the files the build writes itself. The
//! builder makes the tree from these; the definition rules keep `[[file]]` entries out of their way.

/// Top-level directories that live under `/usr` in a merged-/usr tree (`/bin` is `/usr/bin`).
pub const MERGED_USR_DIRS: [&str; 6] = ["bin", "sbin", "lib", "lib64", "lib32", "libx32"];

/// Top-level directories that something is mounted over when the system runs: a file placed
/// there by the build would be hidden.
pub const RUNTIME_MOUNTS: [&str; 7] = ["proc", "sys", "dev", "run", "var", "tmp", "sysroot"];

/// Empty directories the build creates for the system to mount over or write at run time.
pub const MOUNTPOINTS: [&str; 9] = [
    "proc",
    "sys",
    "dev",
    "run",
    "var",
    "tmp",
    "sysroot",
    "root",
    "usr/lib/plinth",
];

/// Directories every root tree has (relative, merged-/usr form; `""` is the root itself).
pub const DIRECTORIES: [&str; 13] = [
    "",
    "etc",
    "etc/docker",
    "usr",
    "usr/bin",
    "usr/sbin",
    "usr/lib",
    "usr/lib64",
    "usr/lib32",
    "usr/libx32",
    "usr/lib/modules",
    "usr/lib/plinth",
    "usr/lib/plinth/images",
];

/// Files and symlinks the build writes itself, with what a definition uses to change them.
pub const OWNED_FILES: [(&str, &str); 11] = [
    ("etc/hostname", "set [image] hostname"),
    ("etc/os-release", "it is Plinth's own, from [image]"),
    ("usr/lib/os-release", "it is Plinth's own, from [image]"),
    ("etc/docker/daemon.json", "set [engine] settings"),
    (
        "etc/resolv.conf",
        "it links to /run, written from [network]",
    ),
    ("etc/machine-id", "it links to /run, made at boot"),
    ("etc/mtab", "it links to /proc/self/mounts"),
    ("usr/bin/plinth-init", "it is Plinth's own program"),
    ("usr/bin/plinth-update", "it is Plinth's own program"),
    ("usr/share/plinth/update-ca.pem", "set [update] ca"),
    ("usr/lib/plinth/engine-tls", "set [engine] tls"),
];

/// Plinth's own file: the definition the image was built from.
pub const IMAGE_DEFINITION: &str = "usr/lib/plinth/image.toml";

/// Plinth's own folder of container image archives, `<container name>.tar` each.
pub const IMAGE_ARCHIVES: &str = "usr/lib/plinth/images";

/// Maps a relative, normalised path to its merged-/usr location: `bin/x` → `usr/bin/x`,
/// `lib` → `usr/lib`.
pub fn merge_usr(path: &str) -> String {
    let top = path.split('/').next().unwrap_or(path);
    if MERGED_USR_DIRS.contains(&top) {
        format!("usr/{path}")
    } else {
        path.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_usr_mapping() {
        assert_eq!(merge_usr("bin/busybox"), "usr/bin/busybox");
        assert_eq!(merge_usr("lib64"), "usr/lib64");
        assert_eq!(merge_usr("library/x"), "library/x");
        assert_eq!(merge_usr("etc/x"), "etc/x");
        for dir in MERGED_USR_DIRS {
            assert!(DIRECTORIES.contains(&merge_usr(dir).as_str()), "{dir}");
        }
    }
}
