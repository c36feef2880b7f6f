//! `airlock bundle …`: the operator's tools for signed policy bundles.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::Subcommand;

use airlock::bundle::{self, InstallRules, PolicyDir};
use airlock::keys::{PublicKey, SecretKey, TrustedKeys};
use airlock::policy::PolicyEngine;

use super::Context;

#[derive(Subcommand)]
pub(crate) enum BundleCommand {
    /// Create a signing key pair: DIR/bundle-signing.key (mode 0600) and its .pub.
    Keygen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Sign SRC-DIR (a bundle.toml and the modules and fixtures it names) as VERSION.
    Sign {
        src: PathBuf,
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        #[arg(long, value_name = "N")]
        version: u64,
        #[arg(long, value_name = "BUNDLE-DIR")]
        out: PathBuf,
    },
    /// Check a bundle's signature, expiry and digests against the given public keys.
    Verify {
        bundle: PathBuf,
        /// A trusted public key (its text, or a file holding it). Repeatable.
        #[arg(long = "trust", value_name = "PUBKEY", required = true)]
        trust: Vec<String>,
    },
    /// Install a bundle into the gateway's policy directory, trusting the keys in the
    /// gateway's configuration. A running gateway picks it up without restart.
    Install { bundle: PathBuf },
    /// Install a bundle over one this gateway cannot rotate from (a manifest it
    /// cannot read, or a version with no room above it), whatever its version. The
    /// reason is kept in the policy directory and recorded when the gateway activates
    /// the bundle. Refused while the active bundle can be rotated from normally.
    Recover {
        bundle: PathBuf,
        /// Why: kept with the bundle and written to the record.
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// Remove every installed bundle but the active one (and leftovers of interrupted
    /// installs).
    Prune,
    /// Show the installed bundle.
    Status,
}

pub(crate) fn run(context: &Context, command: BundleCommand) -> anyhow::Result<ExitCode> {
    match command {
        BundleCommand::Keygen { out } => {
            airlock::fsperm::create_private_dir(&out)?;
            let key = SecretKey::generate();
            let path = out.join("bundle-signing.key");
            let pub_path = key.write(&path)?;
            println!(
                "secret key: {} (mode 0600; keep it off the gateway)",
                path.display()
            );
            println!("public key: {}", pub_path.display());
            println!("key id:     {}", key.public().id());
            println!("{}", key.public().to_text());
        }
        BundleCommand::Sign {
            src,
            key,
            version,
            out,
        } => {
            let key = SecretKey::read(&key)?;
            let manifest = bundle::sign(&src, &key, version, &out, SystemTime::now())?;
            println!(
                "signed {} v{} ({} modules) with key {} → {}; expires {}",
                manifest.name,
                manifest.version,
                manifest.modules.len(),
                key.public().id(),
                out.display(),
                manifest.expires
            );
        }
        BundleCommand::Verify { bundle, trust } => {
            let trust = parse_trust(&trust)?;
            let verified = bundle::verify(&bundle, &trust, SystemTime::now())
                .with_context(|| format!("bundle {} refused", bundle.display()))?;
            println!(
                "ok: {} v{} signed by key {}; {} modules match their digests; expires {}",
                verified.manifest.name,
                verified.manifest.version,
                verified.key_id,
                verified.modules.len(),
                verified.manifest.expires
            );
        }
        BundleCommand::Install { bundle } => {
            let (dir, manifest) = installing(context, |dir, rules| {
                dir.install(&bundle, rules)
                    .with_context(|| format!("bundle {} refused", bundle.display()))
            })?;
            println!(
                "installed {} v{} into {}",
                manifest.name,
                manifest.version,
                dir.root().display()
            );
        }
        BundleCommand::Recover { bundle, reason } => {
            let operator = format!("uid:{}", rustix::process::getuid().as_raw());
            let (dir, (manifest, recovery)) = installing(context, |dir, rules| {
                dir.recover(&bundle, rules, &reason, &operator)
                    .with_context(|| format!("recovery with bundle {} refused", bundle.display()))
            })?;
            println!(
                "recovered: installed {} v{} into {} over {} ({})",
                manifest.name,
                manifest.version,
                dir.root().display(),
                recovery
                    .replaced
                    .as_deref()
                    .unwrap_or("nothing")
                    .escape_debug(),
                recovery.stuck_on.escape_debug()
            );
            println!(
                "the gateway records the recovery, with your reason, when it activates the bundle"
            );
        }
        BundleCommand::Prune => {
            let dir = PolicyDir::open(&context.data_dir()?.policy_dir())?;
            let removed = dir.prune()?;
            if removed.is_empty() {
                println!("nothing to prune in {}", dir.root().display());
            }
            for name in removed {
                println!("removed {name}");
            }
        }
        BundleCommand::Status => {
            let dir = PolicyDir::open(&context.data_dir()?.policy_dir())?;
            let status = dir.status().with_context(|| {
                "the active bundle cannot be read; if this gateway is stuck on it, see airlock bundle recover"
            })?;
            match status {
                None => println!(
                    "no bundle installed in {}: every request is denied",
                    dir.root().display()
                ),
                Some(status) => {
                    let m = &status.manifest;
                    println!("bundle:  {} v{}", m.name, m.version);
                    println!("path:    {}", status.path.display());
                    println!("created: {}", m.created);
                    println!("expires: {}", m.expires);
                    if let Some(recovery) = dir.recovery()? {
                        // Escaped: the note quotes file names and errors from a
                        // bundle this gateway refused.
                        println!(
                            "recovered {} by {} over {}: {} (reason: {})",
                            recovery.at.escape_debug(),
                            recovery.operator.escape_debug(),
                            recovery
                                .replaced
                                .as_deref()
                                .unwrap_or("nothing")
                                .escape_debug(),
                            recovery.stuck_on.escape_debug(),
                            recovery.reason.escape_debug()
                        );
                    }
                    for module in &m.modules {
                        let hooks: Vec<String> = module
                            .applies_to
                            .hooks
                            .iter()
                            .map(|h| h.to_string())
                            .collect();
                        let kinds: Vec<String> = module
                            .applies_to
                            .target_kinds
                            .iter()
                            .map(|k| format!("{k:?}").to_lowercase())
                            .collect();
                        println!(
                            "module:  {:<16} sha256 {}  hooks {}  kinds {}  targets {}",
                            module.name,
                            &module.sha256[..16],
                            hooks.join(","),
                            if kinds.is_empty() {
                                "*".to_string()
                            } else {
                                kinds.join(",")
                            },
                            module.applies_to.targets.join(",")
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the policy directory and an engine with the gateway's limits and cache, and
/// runs `install` with the gateway's install rules.
fn installing<T>(
    context: &Context,
    install: impl FnOnce(&PolicyDir, &InstallRules) -> anyhow::Result<T>,
) -> anyhow::Result<(PolicyDir, T)> {
    let config = context.config()?;
    let dir =
        PolicyDir::open(&context.data_dir()?.policy_dir())?.with_limits(config.bundle_limits());
    let engine = PolicyEngine::new(config.policy_limits(), Some(&dir.cache_dir()))?;
    let trust = config.trusted_keys()?;
    let rules = InstallRules {
        trust: &trust,
        engine: &engine,
        now: SystemTime::now(),
        max_validity: config.max_bundle_validity(),
    };
    let result = install(&dir, &rules)?;
    Ok((dir, result))
}

pub(crate) fn parse_trust(keys: &[String]) -> anyhow::Result<TrustedKeys> {
    keys.iter()
        .map(|k| PublicKey::from_arg(k).with_context(|| format!("--trust {k}")))
        .collect::<anyhow::Result<Vec<_>>>()
        .map(TrustedKeys::new)
}
