//! Signed policy bundles and the gateway-owned policy directory.
//!
//! A bundle is a directory: `manifest.toml` (name, monotonically increasing version,
//! created and expiry times, and every module and fixture file with its sha256),
//! `manifest.sig` (a detached Ed25519 signature over the manifest's exact bytes, with
//! the signing key's id), `modules/*.wasm` and `fixtures/<module>/*`.
//!
//! Verification reads every file once, into memory, and checks that in-memory copy: what
//! is verified is exactly what is installed and loaded.

mod dir;
mod manifest;
mod read;
mod sign;
mod verify;
mod watch;

pub use dir::{BundleStatus, InstallRules, PolicyDir, Recovery, load, load_reporting};
pub use manifest::{FileDigest, MAX_VERSION, Manifest, ManifestModule, SourceBundle, SourceModule};
pub use read::SizeLimits;
pub use sign::sign;
pub use verify::{VerifiedBundle, VerifiedModule, verify, verify_within};
pub use watch::{Reloader, ReloaderHandle, activated_event, refused_event};

use std::path::PathBuf;

use crate::policy::LoadError;

pub const MANIFEST_FILE: &str = "manifest.toml";
pub const SIGNATURE_FILE: &str = "manifest.sig";

/// Why a bundle was refused. Each variant says exactly what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir} is not a bundle: it has no {MANIFEST_FILE}")]
    NoManifest { dir: PathBuf },
    #[error("bundle {dir} is unsigned: {SIGNATURE_FILE} is missing")]
    Unsigned { dir: PathBuf },
    #[error("{SIGNATURE_FILE} is malformed: {reason}")]
    BadSignatureFile { reason: String },
    #[error("no trusted keys are configured; refusing every bundle")]
    NoTrustedKeys,
    #[error("bundle is signed by key {key_id}, which is not trusted (trusted: {trusted})")]
    UnknownKey { key_id: String, trusted: String },
    #[error(
        "signature by key {key_id} does not verify: {MANIFEST_FILE} was changed after signing, or the signature is forged"
    )]
    BadSignature { key_id: String },
    #[error("{file} is malformed: {reason}")]
    BadManifest { file: String, reason: String },
    #[error("bundle {name} v{version} expired at {expires}")]
    Expired {
        name: String,
        version: u64,
        expires: String,
    },
    #[error("{file}: path must be relative and stay inside the bundle")]
    UnsafePath { file: String },
    #[error("{file} is listed in the manifest but cannot be read: {source}")]
    MissingFile {
        file: String,
        source: std::io::Error,
    },
    #[error("{file} {reason}")]
    UnreadableFile {
        file: String,
        reason: read::ReadError,
    },
    #[error("{file} does not match its digest: manifest says sha256 {expected}, file has {actual}")]
    DigestMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error(
        "bundle {name} v{version} is not newer than the installed v{installed}; refusing a rollback{}",
        if *stuck { " (the installed version leaves no room above it: see airlock bundle recover)" } else { "" }
    )]
    Rollback {
        name: String,
        version: u64,
        installed: u64,
        /// The installed version is at the limit: no newer one can be signed.
        stuck: bool,
    },
    #[error(
        "the active bundle cannot be read, so no install can be checked against it ({reason}); if this gateway is stuck on it, see airlock bundle recover"
    )]
    ActiveUnreadable { reason: String },
    #[error("no recovery needed: {0}")]
    NotStuck(String),
    #[error("{0}")]
    TooLong(String),
    #[error("bundle v{version} is already installed")]
    AlreadyInstalled { version: u64 },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Permissions(#[from] crate::fsperm::PermError),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
}

fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}
