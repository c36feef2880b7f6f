//! `airlock policy …`: the policy author's tools.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::Subcommand;

use airlock::bundle;
use airlock::policy::fixture::{self, CaseResult, Subject};
use airlock::policy::{PolicyEngine, Scope, build_policy_crate};

use super::Context;
use super::bundle::parse_trust;

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Build a policy crate into a Wasm component (no WASI imports).
    Build {
        crate_dir: PathBuf,
        #[arg(long, value_name = "FILE.wasm")]
        out: PathBuf,
    },
    /// Run fixtures. For a .wasm, FIXTURES run against that module. For a bundle, each
    /// module's own fixtures run against it, then FIXTURES against the whole bundle.
    Test {
        /// A bundle directory or a .wasm component.
        subject: PathBuf,
        /// Fixture files, or directories of them.
        fixtures: Vec<PathBuf>,
        /// Keys to verify a bundle with (default: the gateway configuration's).
        #[arg(long = "trust", value_name = "PUBKEY")]
        trust: Vec<String>,
    },
}

pub(crate) fn run(context: &Context, command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Build { crate_dir, out } => {
            let component = build_policy_crate(&crate_dir)?;
            // Refuse a component the gateway would refuse, now rather than at install.
            let engine = PolicyEngine::new(Default::default(), None)?;
            let name = crate_dir
                .canonicalize()
                .ok()
                .and_then(|dir| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "built".into());
            engine.load_module(&name, &component, Scope::everything())?;
            std::fs::write(&out, &component).with_context(|| out.display().to_string())?;
            println!("built {} ({} bytes)", out.display(), component.len());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Test {
            subject,
            fixtures,
            trust,
        } => test(context, &subject, &fixtures, &trust),
    }
}

fn test(
    context: &Context,
    subject: &Path,
    fixtures: &[PathBuf],
    trust: &[String],
) -> anyhow::Result<ExitCode> {
    let config = context.config()?;
    let engine = PolicyEngine::new(config.policy_limits(), None)?;
    let mut tally = Tally::default();
    if subject.is_dir() {
        let trust = if trust.is_empty() {
            config.trusted_keys()?
        } else {
            parse_trust(trust)?
        };
        let verified = bundle::verify(subject, &trust, SystemTime::now())?;
        let set = match bundle::load_reporting(&engine, &verified, |r| tally.record(r)) {
            Ok(set) => Arc::new(set),
            Err(e) => {
                println!("bundle refused: {e}");
                return Ok(tally.finish());
            }
        };
        run_files(&Subject::Set(&set), fixtures, &mut tally)?;
    } else {
        let bytes = std::fs::read(subject).with_context(|| subject.display().to_string())?;
        let module = engine.load_module(
            &subject.file_stem().unwrap_or_default().to_string_lossy(),
            &bytes,
            Scope::everything(),
        )?;
        run_files(&Subject::Module(&module), fixtures, &mut tally)?;
    }
    Ok(tally.finish())
}

fn run_files(subject: &Subject, fixtures: &[PathBuf], tally: &mut Tally) -> anyhow::Result<()> {
    for path in fixture::expand_paths(fixtures)? {
        let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
        let name = path.display().to_string();
        let results = fixture::run(subject, &name, &bytes)
            .map_err(|reason| anyhow::anyhow!("{name}: {reason}"))?;
        results.iter().for_each(|r| tally.record(r));
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

impl Tally {
    fn record(&mut self, result: &CaseResult) {
        match &result.failure {
            None => {
                self.passed += 1;
                println!("ok    {}: {}", result.file, result.name);
            }
            Some(why) => {
                self.failed += 1;
                println!("FAIL  {}: {}: {why}", result.file, result.name);
            }
        }
    }

    fn finish(&self) -> ExitCode {
        println!("{} passed, {} failed", self.passed, self.failed);
        if self.failed == 0 && self.passed > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}
