//! `airlock policy build`: a policy crate → a Wasm component with no WASI imports.
//!
//! The crate is compiled for `wasm32-unknown-unknown` (no WASI in the standard library),
//! and the core module is turned into a component with `wit-component`, using the world
//! that `wit-bindgen` embedded in it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a policy crate could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot run cargo: {0}")]
    Cargo(std::io::Error),
    #[error(
        "cargo build of {crate_dir} failed (is the target installed? `rustup target add wasm32-unknown-unknown`)"
    )]
    CargoFailed { crate_dir: PathBuf },
    #[error("{crate_dir} built no cdylib .wasm; a policy crate needs `crate-type = [\"cdylib\"]`")]
    NoArtifact { crate_dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("componentizing {path}: {reason}")]
    Componentize { path: PathBuf, reason: String },
}

/// Builds the policy crate in `crate_dir` (release, `wasm32-unknown-unknown`) and returns
/// the component's bytes.
pub fn build_policy_crate(crate_dir: &Path) -> Result<Vec<u8>, BuildError> {
    let manifest = crate_dir.join("Cargo.toml");
    let output = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--target", "wasm32-unknown-unknown"])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&manifest)
        .stderr(Stdio::inherit())
        .output()
        .map_err(BuildError::Cargo)?;
    if !output.status.success() {
        return Err(BuildError::CargoFailed {
            crate_dir: crate_dir.to_path_buf(),
        });
    }
    let manifest = manifest.canonicalize().map_err(|source| BuildError::Io {
        path: manifest.clone(),
        source,
    })?;
    let wasm =
        cdylib_artifact(&output.stdout, &manifest).ok_or_else(|| BuildError::NoArtifact {
            crate_dir: crate_dir.to_path_buf(),
        })?;
    let module = std::fs::read(&wasm).map_err(|source| BuildError::Io {
        path: wasm.clone(),
        source,
    })?;
    componentize(&module).map_err(|reason| BuildError::Componentize { path: wasm, reason })
}

/// Finds, in cargo's JSON messages, the `.wasm` cdylib of the package at `manifest`.
fn cdylib_artifact(messages: &[u8], manifest: &Path) -> Option<PathBuf> {
    #[derive(serde::Deserialize)]
    struct Message {
        reason: String,
        manifest_path: Option<PathBuf>,
        #[serde(default)]
        filenames: Vec<PathBuf>,
    }
    messages
        .split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Message>(line).ok())
        .filter(|m| m.reason == "compiler-artifact" && m.manifest_path.as_deref() == Some(manifest))
        .flat_map(|m| m.filenames)
        .find(|f| f.extension().is_some_and(|e| e == "wasm"))
}

/// Turns a core module with an embedded `component-type` section into a component.
pub fn componentize(module: &[u8]) -> Result<Vec<u8>, String> {
    wit_component::ComponentEncoder::default()
        .module(module)
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(|e| format!("{e:#}"))
}
