//! The `appliance` command: daemon and client. [`cli`] parses and dispatches.

mod cli;

/// glibc malloc serialized the engine's worker threads on its arena locks under load
/// (futex waits in the profile); mimalloc keeps per-thread heaps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
