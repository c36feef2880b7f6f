//! `airlock bundle sign`: a source directory with `bundle.toml` → a signed bundle.

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

use super::manifest::{FORMAT, FileDigest, Manifest, ManifestModule, SourceBundle};
use super::verify::SignatureFile;
use super::{BundleError, MANIFEST_FILE, SIGNATURE_FILE, read};
use crate::fsperm;
use crate::keys::SecretKey;

fn unreadable(file: &Path, reason: read::ReadError) -> BundleError {
    BundleError::UnreadableFile {
        file: file.display().to_string(),
        reason,
    }
}

/// Signs the bundle described by `src_dir/bundle.toml` as `version` and writes it to
/// `out` (which must not exist yet). Returns the manifest written.
pub fn sign(
    src_dir: &Path,
    key: &SecretKey,
    version: u64,
    out: &Path,
    now: SystemTime,
) -> Result<Manifest, BundleError> {
    let source_path = src_dir.join("bundle.toml");
    let text = read::read_bounded(&source_path, read::MANIFEST_LIMIT)
        .map_err(|reason| unreadable(&source_path, reason))?;
    let text = String::from_utf8(text).map_err(|e| BundleError::BadManifest {
        file: source_path.display().to_string(),
        reason: e.to_string(),
    })?;
    let source = SourceBundle::parse(&text, &source_path)?;
    super::manifest::check_version(version).map_err(|reason| BundleError::BadManifest {
        file: source_path.display().to_string(),
        reason,
    })?;
    let valid_for = humantime::parse_duration(&source.valid_for).unwrap_or(Duration::ZERO);

    // Everything signed comes from inside the source directory, through no link, as
    // regular files within the same limits an install applies: whoever can write the
    // source directory cannot make the signer copy another of the operator's files
    // (a signing key, say) into a bundle, or hang it on a FIFO.
    let limits = read::SizeLimits::default();
    let mut budget = limits.bundle;
    let mut read_source = |path: &Path, limit: u64| {
        let bytes = read::read_in(src_dir, path, limit.min(budget))
            .map_err(|reason| unreadable(path, reason))?;
        budget -= bytes.len() as u64;
        Ok::<_, BundleError>(bytes)
    };
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut modules = Vec::new();
    for module in &source.modules {
        let bytes = read_source(&module.file, limits.module)?;
        let file = format!("modules/{}.wasm", module.name);
        let sha256 = hex::encode(Sha256::digest(&bytes));
        files.push((file.clone(), bytes));
        let mut fixtures = Vec::new();
        let mut paths = Vec::new();
        for entry in &module.fixtures {
            match read::list_in(src_dir, entry).map_err(|reason| unreadable(entry, reason))? {
                Some(names) => paths.extend(
                    names
                        .into_iter()
                        .filter(|n| n.ends_with(".toml") || n.ends_with(".json"))
                        .map(|n| entry.join(n)),
                ),
                None => paths.push(entry.clone()),
            }
        }
        for path in paths {
            let bytes = read_source(&path, limits.fixture)?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let file = format!("fixtures/{}/{name}", module.name);
            if files.iter().any(|(f, _)| *f == file) {
                return Err(BundleError::BadManifest {
                    file: source_path.display().to_string(),
                    reason: format!("two fixtures of module `{}` are named {name}", module.name),
                });
            }
            fixtures.push(FileDigest {
                file: file.clone(),
                sha256: hex::encode(Sha256::digest(&bytes)),
            });
            files.push((file, bytes));
        }
        modules.push(ManifestModule {
            name: module.name.clone(),
            file,
            sha256,
            applies_to: module.applies_to.clone(),
            fixtures,
        });
    }
    let manifest = Manifest {
        format: FORMAT,
        name: source.name,
        version,
        created: humantime::format_rfc3339_seconds(now).to_string(),
        expires: humantime::format_rfc3339_seconds(now + valid_for).to_string(),
        modules,
    };
    let manifest_text = toml::to_string(&manifest).map_err(|e| BundleError::BadManifest {
        file: MANIFEST_FILE.into(),
        reason: e.to_string(),
    })?;
    let signature = SignatureFile {
        algorithm: "ed25519".into(),
        key_id: key.public().id().to_string(),
        signature: B64.encode(key.sign(manifest_text.as_bytes())),
    };
    let signature_text = toml::to_string(&signature).expect("signature file serializes");

    if out.exists() {
        return Err(BundleError::Io {
            path: out.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output directory already exists; refusing to overwrite a bundle",
            ),
        });
    }
    files.push((MANIFEST_FILE.into(), manifest_text.into_bytes()));
    files.push((SIGNATURE_FILE.into(), signature_text.into_bytes()));
    for (file, bytes) in files {
        let path = out.join(file);
        if let Some(parent) = path.parent() {
            fsperm::create_private_dir(parent)?;
        }
        fsperm::write_private_atomic(&path, &bytes)?;
    }
    Ok(manifest)
}
