//! `airlock bundle sign`: a source directory with `bundle.toml` → a signed bundle.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

use super::manifest::{FORMAT, FileDigest, Manifest, ManifestModule, SourceBundle};
use super::verify::SignatureFile;
use super::{BundleError, MANIFEST_FILE, SIGNATURE_FILE, io_err};
use crate::fsperm;
use crate::keys::SecretKey;
use crate::policy::fixture;

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
    let text = fs::read_to_string(&source_path).map_err(io_err(&source_path))?;
    let source = SourceBundle::parse(&text, &source_path)?;
    super::manifest::check_version(version).map_err(|reason| BundleError::BadManifest {
        file: source_path.display().to_string(),
        reason,
    })?;
    let valid_for = humantime::parse_duration(&source.valid_for).unwrap_or(Duration::ZERO);

    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut modules = Vec::new();
    for module in &source.modules {
        let path = src_dir.join(&module.file);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let file = format!("modules/{}.wasm", module.name);
        let sha256 = hex::encode(Sha256::digest(&bytes));
        files.push((file.clone(), bytes));
        let mut fixtures = Vec::new();
        let entries: Vec<PathBuf> = module.fixtures.iter().map(|f| src_dir.join(f)).collect();
        for fixture in fixture::expand_paths(&entries).map_err(io_err(src_dir))? {
            let bytes = fs::read(&fixture).map_err(io_err(&fixture))?;
            let name = fixture
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
