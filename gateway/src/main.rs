//! `airlock`: the gateway, the operator's tools, and the agent's client.

mod cli;

// The proxies allocate per message from several threads; glibc's allocator contends on
// its arena locks there (seen in profiles of the PostgreSQL gateway), mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
