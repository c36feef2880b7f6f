//! Helpers for SSH actions: command lines as the host parsed them, and SFTP operations.

use crate::{SftpOp, ShellFeature, SshCommand};

impl SshCommand {
    /// Only commands and operators: the upstream runs exactly [`SshCommand::commands`],
    /// quoted by the host, and nothing the remote shell would decide at run time.
    pub fn is_plain(&self) -> bool {
        self.features.is_empty()
    }

    /// What the command line holds beyond plain commands, as words for a denial:
    /// `"substitution, redirection"`.
    pub fn features_text(&self) -> String {
        self.features
            .iter()
            .map(|f| feature_name(*f))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The feature's name as the WIT contract spells it.
pub fn feature_name(feature: ShellFeature) -> &'static str {
    match feature {
        ShellFeature::Substitution => "substitution",
        ShellFeature::Redirection => "redirection",
        ShellFeature::HereDoc => "here-doc",
        ShellFeature::Expansion => "expansion",
        ShellFeature::Glob => "glob",
        ShellFeature::Assignment => "assignment",
        ShellFeature::Newline => "newline",
        ShellFeature::Compound => "compound",
        ShellFeature::Unparsable => "unparsable",
    }
}

impl SftpOp {
    /// Reads and nothing else: no file's content, name, attributes or links change.
    pub fn reads_only(self) -> bool {
        matches!(
            self,
            SftpOp::OpenRead | SftpOp::ReadDir | SftpOp::Stat | SftpOp::Readlink | SftpOp::Realpath
        )
    }
}

/// A path with a `..` component: a glob on the text would match it while the server
/// resolves it elsewhere.
pub fn climbs(path: &str) -> bool {
    path.split('/').any(|part| part == "..")
}
