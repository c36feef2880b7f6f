//! `airlock`: the gateway, the operator's tools, and the agent's client.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
