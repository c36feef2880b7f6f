//! `airlock serve`.

use std::process::ExitCode;

use super::Context;

pub(crate) fn run(context: &Context) -> anyhow::Result<ExitCode> {
    let config = context.config()?;
    let data = context.data_dir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(airlock::serve::run(config, data, shutdown_signal()))?;
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
