//! Builds the eBPF programs (crate `appliance-ebpf`) with the nightly toolchain and bpf-linker,
//! so that a plain `cargo build` produces a daemon with its programs embedded.

use std::process::Command;

use anyhow::{bail, Context as _};

const SETUP_HINT: &str = "run `cargo xtask setup` to install the eBPF toolchain";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(linker, Ok(ref out) if out.status.success()) {
        bail!("bpf-linker was not found on PATH; {SETUP_HINT}");
    }
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    if !matches!(nightly, Ok(ref out) if out.status.success()) {
        bail!("the nightly Rust toolchain is missing; {SETUP_HINT}");
    }
    // aya-build forwards the inner cargo's progress lines as warnings; keep only real ones.
    std::env::set_var("CARGO_TERM_QUIET", "true");
    let package = aya_build::Package {
        name: "appliance-ebpf",
        root_dir: "../appliance-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
        .context("building the eBPF programs (crate appliance-ebpf) failed")?;
    // Shared types change the programs too.
    println!("cargo:rerun-if-changed=../appliance-common/src");
    Ok(())
}
