//! Verifying a bundle: signature by a trusted key, expiry, and every file's digest.

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::manifest::{Manifest, ManifestModule, inside};
use super::read::SizeLimits;
use super::{BundleError, MANIFEST_FILE, SIGNATURE_FILE, io_err, read};
use crate::fsperm;
use crate::keys::TrustedKeys;

/// `manifest.sig`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct SignatureFile {
    pub algorithm: String,
    pub key_id: String,
    pub signature: String,
}

/// A bundle whose signature, expiry and digests all checked out, held in memory.
#[derive(Debug)]
pub struct VerifiedBundle {
    pub manifest: Manifest,
    /// The id of the trusted key that signed it.
    pub key_id: String,
    pub modules: Vec<VerifiedModule>,
    manifest_bytes: Vec<u8>,
    signature_bytes: Vec<u8>,
}

#[derive(Debug)]
pub struct VerifiedModule {
    pub entry: ManifestModule,
    pub bytes: Vec<u8>,
    /// (file name inside the bundle, contents)
    pub fixtures: Vec<(String, Vec<u8>)>,
}

/// Reads a file the manifest lists, under `dir` and through no link, and checks its
/// digest. `budget` is what is left of the bundle's size limit.
fn read_listed(
    dir: &Path,
    file: &str,
    expected: &str,
    limit: u64,
    budget: &mut u64,
) -> Result<Vec<u8>, BundleError> {
    inside(dir, file)?;
    // The limit checked (and named in a refusal) is the file's own or what is left of
    // the bundle's, whichever is smaller.
    let bytes = read::read_in(dir, Path::new(file), limit.min(*budget))
        .map_err(|reason| read_error(file, reason))?;
    *budget -= bytes.len() as u64;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != expected {
        return Err(BundleError::DigestMismatch {
            file: file.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(bytes)
}

/// Reads one of the bundle's files, named `file` in errors: a regular file within
/// `limit` bytes, or a refusal naming the problem.
fn read_file(path: &Path, file: &str, limit: u64) -> Result<Vec<u8>, BundleError> {
    read::read_bounded(path, limit).map_err(|reason| read_error(file, reason))
}

fn read_error(file: &str, reason: read::ReadError) -> BundleError {
    match reason {
        read::ReadError::Io(source) => BundleError::MissingFile {
            file: file.to_string(),
            source,
        },
        reason => BundleError::UnreadableFile {
            file: file.to_string(),
            reason,
        },
    }
}

/// Verifies the bundle in `dir` against the gateway's trusted keys, at time `now`.
pub fn verify(
    dir: &Path,
    trust: &TrustedKeys,
    now: SystemTime,
) -> Result<VerifiedBundle, BundleError> {
    verify_within(dir, trust, now, &SizeLimits::default())
}

/// [`verify`], with the gateway's size limits.
pub fn verify_within(
    dir: &Path,
    trust: &TrustedKeys,
    now: SystemTime,
    limits: &SizeLimits,
) -> Result<VerifiedBundle, BundleError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if manifest_path.symlink_metadata().is_err() {
        return Err(BundleError::NoManifest {
            dir: dir.to_path_buf(),
        });
    }
    let manifest_bytes = read_file(&manifest_path, MANIFEST_FILE, read::MANIFEST_LIMIT)?;
    let sig_path = dir.join(SIGNATURE_FILE);
    if sig_path.symlink_metadata().is_err() {
        return Err(BundleError::Unsigned {
            dir: dir.to_path_buf(),
        });
    }
    let signature_bytes = read_file(&sig_path, SIGNATURE_FILE, read::SIGNATURE_LIMIT)?;
    let bad_sig = |reason: String| BundleError::BadSignatureFile { reason };
    let sig: SignatureFile = std::str::from_utf8(&signature_bytes)
        .map_err(|e| bad_sig(e.to_string()))
        .and_then(|text| toml::from_str(text).map_err(|e| bad_sig(e.to_string())))?;
    if sig.algorithm != "ed25519" {
        return Err(bad_sig(format!(
            "algorithm `{}` is not supported (expected ed25519)",
            sig.algorithm
        )));
    }
    let signature: [u8; 64] = B64
        .decode(&sig.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad_sig("signature is not 64 bytes of base64".into()))?;
    if trust.is_empty() {
        return Err(BundleError::NoTrustedKeys);
    }
    let key = trust
        .get(&sig.key_id)
        .ok_or_else(|| BundleError::UnknownKey {
            key_id: sig.key_id.clone(),
            trusted: trust.ids().join(", "),
        })?;
    if !key.verify(&manifest_bytes, &signature) {
        return Err(BundleError::BadSignature {
            key_id: sig.key_id.clone(),
        });
    }

    // Only now, with the signature checked, is the manifest's content trusted.
    let text = std::str::from_utf8(&manifest_bytes).map_err(|e| BundleError::BadManifest {
        file: MANIFEST_FILE.into(),
        reason: e.to_string(),
    })?;
    let manifest = Manifest::parse(text)?;
    let expires = manifest
        .expires_at()
        .map_err(|reason| BundleError::BadManifest {
            file: MANIFEST_FILE.into(),
            reason,
        })?;
    if now >= expires {
        return Err(BundleError::Expired {
            name: manifest.name.clone(),
            version: manifest.version,
            expires: manifest.expires.clone(),
        });
    }
    manifest
        .check_created(now)
        .map_err(|reason| BundleError::BadManifest {
            file: MANIFEST_FILE.into(),
            reason,
        })?;
    // Each file once: a manifest that lists one file many times would multiply the
    // per-file limits.
    let mut listed = std::collections::HashSet::new();
    for file in manifest
        .modules
        .iter()
        .flat_map(|m| std::iter::once(&m.file).chain(m.fixtures.iter().map(|f| &f.file)))
    {
        if !listed.insert(file) {
            return Err(BundleError::BadManifest {
                file: MANIFEST_FILE.into(),
                reason: format!("lists the file {file:?} more than once"),
            });
        }
    }
    let mut budget = limits.bundle;
    let modules = manifest
        .modules
        .iter()
        .map(|entry| {
            let bytes = read_listed(dir, &entry.file, &entry.sha256, limits.module, &mut budget)?;
            let fixtures = entry
                .fixtures
                .iter()
                .map(|f| {
                    let bytes = read_listed(dir, &f.file, &f.sha256, limits.fixture, &mut budget)?;
                    Ok((f.file.clone(), bytes))
                })
                .collect::<Result<_, BundleError>>()?;
            Ok(VerifiedModule {
                entry: entry.clone(),
                bytes,
                fixtures,
            })
        })
        .collect::<Result<_, BundleError>>()?;
    Ok(VerifiedBundle {
        key_id: sig.key_id,
        manifest,
        modules,
        manifest_bytes,
        signature_bytes,
    })
}

impl VerifiedBundle {
    /// Writes exactly the verified bytes into `dir` (created 0700, files 0600).
    pub(crate) fn write_to(&self, dir: &Path) -> Result<(), BundleError> {
        fsperm::create_private_dir(dir)?;
        let write = |file: &str, bytes: &[u8]| -> Result<(), BundleError> {
            let path = inside(dir, file)?;
            if let Some(parent) = path.parent() {
                fsperm::create_private_dir(parent)?;
            }
            fsperm::write_private_atomic(&path, bytes)?;
            Ok(())
        };
        write(MANIFEST_FILE, &self.manifest_bytes)?;
        write(SIGNATURE_FILE, &self.signature_bytes)?;
        for module in &self.modules {
            write(&module.entry.file, &module.bytes)?;
            for (file, bytes) in &module.fixtures {
                write(file, bytes)?;
            }
        }
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    }
}
