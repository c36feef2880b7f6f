//! `airlock serve`.

use std::os::unix::process::CommandExt as _;
use std::process::ExitCode;

use airlock::serve::Ended;

use super::Context;

pub(crate) fn run(context: &Context) -> anyhow::Result<ExitCode> {
    let config = context.config()?;
    let data = context.data_dir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ended = runtime.block_on(airlock::serve::run(config, data, shutdown_signal()))?;
    if ended == Ended::RecordWritableAgain {
        // The same binary, arguments and process id: a supervisor sees no exit, and
        // the new run reopens the store and reloads the gateway's state from it. The
        // runtime is not shut down first: its sockets and files close on exec, and
        // the failed store must not be flushed (see `serve::run`).
        let error = std::process::Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .exec();
        anyhow::bail!("cannot restart in place to reopen the record: {error}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
