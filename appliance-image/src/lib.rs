//! cdm appliance updates (issue 18): signed update bundles, their
//! installation into the A/B slot that is not booted, systemd-boot's boot
//! assessment (bless after a healthy boot) and the status file. The
//! contract is `docs/appliance-image.md`; the `cdm-update` binary is a thin
//! shell over these modules.

pub mod bundle;
pub mod health;
pub mod install;
pub mod keys;
pub mod slots;
pub mod spool;
pub mod status;

/// The target architecture this build installs for (the manifest's `arch`).
pub const ARCH: &str = std::env::consts::ARCH;
/// The one product a bundle may be for (the manifest's `compatible`).
pub const COMPATIBLE: &str = "cdm-appliance";
/// Where the trusted public keys live in the root image.
pub const DEFAULT_KEYS_DIR: &str = "/etc/cdm/update-keys";
/// The ESP mount point.
pub const DEFAULT_ESP: &str = "/boot/efi";
/// The running version, baked into the root image.
pub const DEFAULT_VERSION_FILE: &str = "/usr/lib/cdm/version";
/// The status file: root-owned, world-readable, on tmpfs (never in the
/// cdm-owned data directory, where a symlink could redirect our writes).
pub const DEFAULT_STATUS_FILE: &str = "/run/cdm-update/status.json";

#[cfg(test)]
pub(crate) mod testutil;
