//! Project tasks: `cargo xtask setup | build | run | test`.
//!
//! `setup` installs what a fresh machine lacks to build and test the appliance. Every step
//! checks first, so a second run does nothing and takes a second.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

mod hygiene;

/// bpf-linker release verified with the nightly toolchain's LLVM on these machines.
const BPF_LINKER_VERSION: &str = "0.13";
/// cargo-fuzz release verified with the nightly toolchain on these machines.
const CARGO_FUZZ_VERSION: &str = "0.13";
/// The fuzz targets in fuzz/fuzz_targets.
const FUZZ_TARGETS: &[&str] = &[
    "secret_definition",
    "config",
    "request_path",
    "redactor",
    "request_head",
    "websocket_frames",
];

/// A program that a test, the demo, the bench or an operator runs, and the Debian package
/// that ships it. `cargo xtask setup` installs the package of every command it cannot find,
/// and `cargo xtask test` refuses to start while one is still missing. A unit test below
/// reads the tests' sources and fails when they start a program this list does not name.
/// Entries are (command, package).
const TOOLS: &[(&str, &str)] = &[
    // Inspect the eBPF programs and maps the capture tests check.
    ("bpftool", "bpftool"),
    // Network inspection for operators (docs/operations.md); the daemon's container rules.
    ("ip", "iproute2"),
    ("nft", "nftables"),
    // Real clients and helpers of the end-to-end tests.
    ("curl", "curl"),
    ("git", "git"),
    ("git-lfs", "git-lfs"),
    ("python3", "python3"),
    // The system Python, for tests that run as an unprivileged user (root's may be private).
    ("/usr/bin/python3", "python3"),
    ("gzip", "gzip"),
    ("grep", "grep"),
    ("sh", "dash"),
    ("bash", "bash"),
    ("timeout", "coreutils"),
    ("true", "coreutils"),
    ("sleep", "coreutils"),
    ("mkfifo", "coreutils"),
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
    ("mount", "mount"),
    // A real container runtime, and what the test's locally built image is made with. runc
    // because crun refuses hosts that mount cgroup v1 beside v2.
    ("podman", "podman"),
    ("runc", "runc"),
    ("tar", "tar"),
    ("ldd", "libc-bin"),
    // The demo's test CA.
    ("openssl", "openssl"),
    // Checks the systemd unit.
    ("systemd-analyze", "systemd"),
    // Scrapes the daemon's metrics and checks their exposition.
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // Runtimes whose trust of the appliance CA the trust test checks: Go, a JDK (java runs
    // the probe's source, keytool builds the daemon's Java trust store), Node.
    ("go", "golang-go"),
    ("java", "default-jdk-headless"),
    ("javac", "default-jdk-headless"),
    ("keytool", "default-jdk-headless"),
    ("node", "nodejs"),
    // NSS databases, for appliance trust install.
    ("certutil", "libnss3-tools"),
    ("update-ca-certificates", "ca-certificates"),
    // The peers bench (bench/peers.sh): the proxies the appliance is measured against, the
    // nginx upstream, the load generators, and the pinning and namespace tools it runs.
    ("nginx", "nginx"),
    ("haproxy", "haproxy"),
    ("wrk", "wrk"),
    ("h2load", "nghttp2-client"),
    ("taskset", "util-linux"),
    ("ss", "iproute2"),
];

/// Python modules of the system Python that tests import, and their Debian packages.
const PYTHON_MODULES: &[(&str, &str)] = &[
    ("requests", "python3-requests"),
    ("httpx", "python3-httpx"),
    // httpx's HTTP/2.
    ("h2", "python3-h2"),
    // python3 -m venv, for the SDKs' venv.
    ("ensurepip", "python3-venv"),
];

/// The Python SDKs (from PyPI; Debian packages neither) the trust test runs, in a venv of
/// their own under target/.
const PYTHON_SDKS: &[&str] = &["anthropic", "openai"];
const SDK_VENV: &str = "target/python-sdks";

#[derive(Parser)]
#[command(about = "Project tasks for the appliance")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test tools a fresh machine lacks.
    Setup,
    /// Set up, then build the release binary (target/release/appliance).
    Build,
    /// Set up, build, and run the daemon in the foreground (needs root).
    Run {
        /// Arguments passed to `appliance daemon`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, check formatting and lints, and run every test, privileged ones included
    /// (needs root).
    Test,
    /// Run the fuzz targets (cargo-fuzz, libFuzzer with AddressSanitizer), each for a while;
    /// a crash is minimized, and the command that adds it to the regression inputs
    /// (fuzz/seeds/<target>) is printed.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Only replay every regression input once, exactly as `cargo xtask test` does.
        #[arg(long, conflicts_with = "seconds")]
        ci: bool,
        /// Targets to run (all when none): secret_definition, config, request_path,
        /// redactor, request_head, websocket_frames.
        targets: Vec<String>,
    },
    /// Measure the engine against a direct connection on loopback, and, as root, the
    /// container path against the host path through the real daemon (BENCH_SECONDS per
    /// figure). With --peers: the release daemon against nginx and HAProxy doing the same
    /// work, and direct (bench/peers.sh, root).
    Bench {
        /// Run the peers comparison (bench/peers.sh) instead.
        #[arg(long)]
        peers: bool,
    },
    /// Show the appliance at work: an agent with a placeholder key calls a local stand-in
    /// for api.anthropic.com; the upstream receives the real key (needs root).
    Demo,
    /// Build the release binary and install it with its unit, configuration, master key,
    /// completion and man page (`appliance install`).
    Install {
        /// Root to install under.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Detach every eBPF program and remove the installed files (`appliance uninstall`).
    Uninstall {
        /// Root the appliance was installed under.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Also remove configuration, master key and store.
        #[arg(long)]
        purge: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build_release()
        }
        Task::Run { args } => {
            setup()?;
            build_release()?;
            require_root("running the daemon")?;
            let binary = workspace_root().join("target/release/appliance");
            run(Command::new(binary).arg("daemon").args(args))
        }
        Task::Test => {
            setup()?;
            require_root("the privileged tests (cgroups, eBPF)")?;
            test()
        }
        Task::Install { root } => {
            setup()?;
            build_release()?;
            run(
                Command::new(workspace_root().join("target/release/appliance"))
                    .arg("install")
                    .arg("--root")
                    .arg(root),
            )
        }
        Task::Uninstall { root, purge } => {
            let binary = workspace_root().join("target/release/appliance");
            let mut command = Command::new(binary);
            command.arg("uninstall").arg("--root").arg(root);
            if purge {
                command.arg("--purge");
            }
            run(&mut command)
        }
        Task::Demo => {
            setup()?;
            require_root("the demo (it attaches eBPF programs)")?;
            demo()
        }
        Task::Fuzz {
            seconds,
            ci,
            targets,
        } => {
            setup()?;
            let targets: Vec<&str> = if targets.is_empty() {
                FUZZ_TARGETS.to_vec()
            } else {
                targets.iter().map(String::as_str).collect()
            };
            if ci {
                replay_fuzz_inputs(&targets)
            } else {
                fuzz(&targets, seconds)
            }
        }
        Task::Bench { peers: true } => {
            setup()?;
            require_root("the peers bench (eBPF capture, a private mount namespace)")?;
            build_release()?;
            run(Command::new("bash")
                .arg(workspace_root().join("bench/peers.sh"))
                .current_dir(workspace_root()))
        }
        Task::Bench { peers: false } => {
            setup()?;
            run(cargo().args(["bench", "--package", "appliance", "--bench", "proxy"]))?;
            run(cargo().args([
                "bench",
                "--package",
                "appliance",
                "--bench",
                "secrets",
                "--",
                "100",
                "1000",
                "10000",
            ]))?;
            if is_root() {
                run(cargo().args(["bench", "--package", "appliance", "--bench", "containers"]))
            } else {
                step("skipping the container bench: it needs root (eBPF, network namespaces)");
                Ok(())
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or `None` when it cannot run or fails.
fn output_of(program: impl AsRef<OsStr>, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn is_root() -> bool {
    output_of("id", &["-u"]).is_some_and(|uid| uid.trim() == "0")
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} need root; run again with sudo");
    }
    Ok(())
}

fn step(name: &str) {
    eprintln!("xtask: {name}");
}

fn setup() -> anyhow::Result<()> {
    if output_of("rustup", &["--version"]).is_none() {
        bail!("rustup is not installed; the eBPF build needs rustup's nightly toolchain (see https://rustup.rs)");
    }
    if output_of("rustup", &["run", "nightly", "rustc", "--version"]).is_none() {
        step("installing the nightly toolchain (the eBPF programs need -Z build-std)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let installed = output_of(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if !installed.lines().any(|line| line.starts_with("rust-src")) {
        step("adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    install_bpf_linker()?;
    install_cargo_fuzz()?;
    install_debian_packages()?;
    install_python_sdks()
}

fn install_cargo_fuzz() -> anyhow::Result<()> {
    let wanted = format!("cargo-fuzz {CARGO_FUZZ_VERSION}.");
    if output_of("cargo-fuzz", &["--version"]).is_some_and(|version| version.starts_with(&wanted)) {
        return Ok(());
    }
    step("installing cargo-fuzz (about a minute)");
    run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        &format!("^{CARGO_FUZZ_VERSION}"),
    ]))
}

/// How the fuzz targets are compiled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    /// Optimized: slow to build (12 minutes on 2 cores), fast to run; for long runs.
    Optimized,
    /// Unoptimized: quicker to build; for replaying the regression inputs.
    Quick,
}

/// `cargo +nightly fuzz VERB` in the workspace, for `build`.
fn cargo_fuzz(verb: &str, build: Build) -> Command {
    // `cargo +nightly` goes through rustup's proxy, not the cargo running xtask.
    let mut command = Command::new("cargo");
    command
        .current_dir(workspace_root())
        .args(["+nightly", "fuzz", verb]);
    if build == Build::Quick {
        command.arg("--dev");
    }
    command
}

fn check_fuzz_targets(targets: &[&str]) -> anyhow::Result<()> {
    match targets.iter().find(|target| !FUZZ_TARGETS.contains(target)) {
        Some(target) => bail!("no fuzz target {target:?}; the targets are {FUZZ_TARGETS:?}"),
        None => Ok(()),
    }
}

/// The fuzz step of `cargo xtask test` (and `cargo xtask fuzz --ci`): every committed input
/// in fuzz/seeds/<target> runs once (`-runs=0`: libFuzzer executes the corpus it is given,
/// then stops before mutating anything). Nothing random and no earlier run's corpus takes
/// part, so the same tree always gives the same answer. Exploring is `cargo xtask fuzz`'s.
fn replay_fuzz_inputs(targets: &[&str]) -> anyhow::Result<()> {
    check_fuzz_targets(targets)?;
    step("building the fuzz targets (nightly, AddressSanitizer, unoptimized)");
    run(&mut cargo_fuzz("build", Build::Quick))?;
    for target in targets {
        let seeds = workspace_root().join("fuzz/seeds").join(target);
        step(&format!(
            "replaying the regression inputs of {target} ({})",
            seeds.display()
        ));
        run(cargo_fuzz("run", Build::Quick)
            .arg(target)
            .arg(&seeds)
            .args(["--", "-runs=0"]))?;
    }
    Ok(())
}

/// Builds the fuzz targets optimized, then runs each for `seconds`, starting from the seeds
/// in fuzz/seeds/<target> and the corpus earlier runs grew in fuzz/corpus/<target>. A target
/// that crashes does not stop the others: its crash is minimized and reported at the end,
/// with the command that makes it a regression input.
fn fuzz(targets: &[&str], seconds: u64) -> anyhow::Result<()> {
    check_fuzz_targets(targets)?;
    let root = workspace_root();
    step("building the fuzz targets (nightly, AddressSanitizer, optimized)");
    run(&mut cargo_fuzz("build", Build::Optimized))?;
    let mut findings = Vec::new();
    for target in targets {
        step(&format!("fuzzing {target} for {seconds} s"));
        let corpus = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let artifacts = root.join("fuzz/artifacts").join(target);
        let before = newest_file(&artifacts, |_| true);
        let status = cargo_fuzz("run", Build::Optimized)
            .arg(target)
            .arg(&corpus)
            .arg(root.join("fuzz/seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .status()
            .context("starting cargo fuzz run")?;
        if status.success() {
            continue;
        }
        let crash = newest_file(&artifacts, |name| !name.starts_with("minimized-"))
            .filter(|crash| Some(crash) != before.as_ref())
            .with_context(|| {
                format!(
                    "fuzzing {target} failed with {status} and left no new input in {}",
                    artifacts.display()
                )
            })?;
        findings.push(minimize_finding(target, &crash)?);
    }
    if findings.is_empty() {
        return Ok(());
    }
    bail!(
        "the fuzz targets found {} fault(s); fix each, then keep its input as a regression input (cargo xtask test replays them):\n{}",
        findings.len(),
        findings.join("\n")
    )
}

/// Minimizes a crash with `cargo fuzz tmin` and returns the line that reports it: where the
/// input is and the command that adds it to the target's regression inputs.
fn minimize_finding(target: &str, crash: &Path) -> anyhow::Result<String> {
    step(&format!("minimizing {}", crash.display()));
    let artifacts = crash.parent().context("an artifact lies in a directory")?;
    // tmin's own status only says whether the input still crashes; either way the smallest
    // input it reached (or the crash itself) is what to keep.
    let _ = cargo_fuzz("tmin", Build::Optimized)
        .arg(target)
        .arg(crash)
        .args(["--runs", "10000"])
        .status();
    let crash_name = crash
        .file_name()
        .and_then(OsStr::to_str)
        .context("artifact names are text")?;
    let minimized = newest_file(artifacts, |name| name.starts_with("minimized-from-"))
        .filter(|path| path.metadata().is_ok_and(|meta| meta.len() > 0))
        .unwrap_or_else(|| crash.to_path_buf());
    let date = output_of("date", &["+%F"]).unwrap_or_default();
    let seed = workspace_root()
        .join("fuzz/seeds")
        .join(target)
        .join(format!("found-{}-{crash_name}", date.trim()));
    Ok(format!(
        "  {target}: {} (minimized from {}); add it with: cp {} {}",
        minimized.display(),
        crash.display(),
        minimized.display(),
        seed.display()
    ))
}

/// The most recently modified file in `dir` whose name passes `wanted`.
fn newest_file(dir: &Path, wanted: impl Fn(&str) -> bool) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_str().is_some_and(&wanted))
        .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
        .max()
        .map(|(_, path)| path)
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}.");
    if output_of("bpf-linker", &["--version"]).is_some_and(|version| version.starts_with(&wanted)) {
        return Ok(());
    }
    step("building bpf-linker against the nightly toolchain's LLVM (about a minute)");
    let sysroot = output_of("rustc", &["+nightly", "--print", "sysroot"])
        .context("cannot ask the nightly rustc for its sysroot")?;
    let sysroot = PathBuf::from(sysroot.trim());
    let lib_dir = sysroot.join("lib");
    let llvm_library = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .find_map(|name| {
            let stem = name.strip_prefix("lib")?.strip_suffix(".so")?;
            stem.starts_with("LLVM-").then(|| stem.to_owned())
        })
        .with_context(|| {
            format!(
                "the nightly toolchain ships no libLLVM in {}; bpf-linker cannot be built",
                lib_dir.display()
            )
        })?;
    let version = output_of("rustc", &["+nightly", "-vV"]).unwrap_or_default();
    let llvm_major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|full| full.split('.').next())
        .context("cannot read the nightly toolchain's LLVM version")?;
    let lib_dir = lib_dir.display();
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            &format!("^{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major},no-llvm-linking"),
        ])
        .env(
            "RUSTFLAGS",
            format!("-L {lib_dir} -l dylib={llvm_library} -C link-arg=-Wl,-rpath,{lib_dir}"),
        ))
}

/// Whether `command` (a name looked up on PATH, or an absolute path) can be run.
fn is_on_path(command: &str) -> bool {
    let executable = |path: &Path| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    if command.starts_with('/') {
        return executable(Path::new(command));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(command))))
}

/// (command or module, package) of the tools whose command is not on PATH, and the Python
/// modules the system Python cannot import.
fn missing_tools() -> Vec<(&'static str, &'static str)> {
    let python_has = |module: &str| {
        Command::new("/usr/bin/python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|output| output.status.success())
    };
    TOOLS
        .iter()
        .copied()
        .filter(|(command, _)| !is_on_path(command))
        .chain(
            PYTHON_MODULES
                .iter()
                .copied()
                .filter(|(module, _)| !python_has(module)),
        )
        .collect()
}

fn sdk_python() -> PathBuf {
    workspace_root().join(SDK_VENV).join("bin/python")
}

/// Whether the SDK venv imports every SDK.
fn sdks_installed() -> bool {
    let imports = PYTHON_SDKS.join(", ");
    Command::new(sdk_python())
        .args(["-c", &format!("import {imports}")])
        .output()
        .is_ok_and(|output| output.status.success())
}

fn install_python_sdks() -> anyhow::Result<()> {
    if sdks_installed() {
        return Ok(());
    }
    step(&format!(
        "installing the Python SDKs {PYTHON_SDKS:?} from PyPI into {SDK_VENV}"
    ));
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(workspace_root().join(SDK_VENV)))?;
    run(
        Command::new(workspace_root().join(SDK_VENV).join("bin/pip"))
            .args(["install", "--quiet"])
            .args(PYTHON_SDKS),
    )
}

fn install_debian_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = missing_tools()
        .iter()
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if output_of("apt-get", &["--version"]).is_none() {
        bail!("missing packages {missing:?} and no apt-get to install them; install them by hand");
    }
    if !is_root() {
        bail!(
            "missing packages {missing:?}; install them with: sudo apt-get install {}",
            missing.join(" ")
        );
    }
    step(&format!("installing Debian packages {missing:?}"));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Fails, naming each missing command and its package, when setup left one out.
fn require_tools() -> anyhow::Result<()> {
    if !sdks_installed() {
        bail!(
            "the Python SDKs {PYTHON_SDKS:?} are not installed in {SDK_VENV}; run cargo xtask setup"
        );
    }
    let missing = missing_tools();
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(command, package)| format!("{command} (Debian package {package})"))
        .collect();
    let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    bail!(
        "the tests need commands that are not on PATH: {}; install them with: apt-get install {}",
        list.join(", "),
        packages.join(" ")
    )
}

fn build_release() -> anyhow::Result<()> {
    step("building target/release/appliance");
    run(cargo().args(["build", "--release", "--package", "appliance"]))
}

fn demo() -> anyhow::Result<()> {
    run(cargo().args(["build", "--package", "appliance"]))?;
    run(Command::new("bash")
        .arg(workspace_root().join("xtask/demo.sh"))
        .arg(workspace_root().join("target/debug/appliance")))
}

fn test() -> anyhow::Result<()> {
    require_tools()?;
    hygiene::sweep_leftovers()?;
    hygiene::adopt_orphans()?;
    step("checking formatting");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("linting");
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    step("running every test, the privileged suites included (feature privileged-tests)");
    let counted =
        run_counting_tests(cargo().args(["test", "--features", "appliance/privileged-tests"]));
    let leaked = hygiene::reap_orphans();
    let (passed, failed) = counted?;
    if !leaked.is_empty() {
        println!("tests: {passed} passed, {failed} failed");
        bail!(
            "the tests left processes running (killed now): {}",
            leaked.join("; ")
        );
    }
    step("running the demo");
    demo()?;
    let leaked = hygiene::reap_orphans();
    if !leaked.is_empty() {
        bail!(
            "the demo left processes running (killed now): {}",
            leaked.join("; ")
        );
    }
    step("replaying every fuzz target's regression inputs (cargo xtask fuzz explores)");
    replay_fuzz_inputs(FUZZ_TARGETS)?;
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines (one per test
/// binary), so the run can close with a single total.
fn run_counting_tests(command: &mut Command) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let stdout = child
        .stdout
        .take()
        .context("capturing cargo test's output")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            let count = |label: &str| -> u64 {
                summary
                    .split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(label)
                    })
                    .and_then(|number| number.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        println!("tests: {passed} passed, {failed} failed");
        bail!("cargo test failed with {status}");
    }
    Ok((passed, failed))
}

#[cfg(test)]
mod tests {
    use super::TOOLS;

    /// Programs the tests, the bench and the demo start, read from their sources: the first
    /// argument of `test_command`/`Command::new`, the first quoted one of `command_in_cgroup`
    /// and `Container::command`, the program after `"--"`
    /// in an argument list, and git-lfs wherever `git lfs` is run.
    fn programs_started() -> Vec<String> {
        let root = super::workspace_root();
        let mut sources = Vec::new();
        for dir in [
            "tests",
            "tests/common",
            "tests/https",
            "tests/network",
            "tests/redirect",
            "tests/onepassword",
            "appliance/benches",
        ] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
                if entry.path().extension().is_some_and(|ext| ext == "rs") {
                    sources.push(std::fs::read_to_string(entry.path()).unwrap());
                }
            }
        }
        let mut programs = Vec::new();
        for source in &sources {
            for marker in ["test_command(\"", "Command::new(\"", "\"--\", \""] {
                for (index, _) in source.match_indices(marker) {
                    let rest = &source[index + marker.len()..];
                    programs.push(rest[..rest.find('"').unwrap()].to_owned());
                }
            }
            // Calls whose first quoted argument is the program: in a cgroup, and in a test
            // container (`Container::command`).
            for marker in ["command_in_cgroup(", ".command("] {
                for (index, _) in source.match_indices(marker) {
                    let rest = &source[index..];
                    let call = &rest[..rest.find(')').unwrap()];
                    if let Some((_, quoted)) = call.split_once('"') {
                        programs.push(quoted[..quoted.find('"').unwrap()].to_owned());
                    }
                }
            }
            if source.contains("\"lfs\"") {
                programs.push("git-lfs".to_owned());
            }
        }
        programs.sort();
        programs.dedup();
        programs
    }

    #[test]
    fn setup_installs_every_program_the_tests_start() {
        let programs = programs_started();
        for expected in ["curl", "git", "git-lfs", "python3", "bpftool", "setpriv"] {
            assert!(
                programs.iter().any(|p| p == expected),
                "scan missed {expected}: {programs:?}"
            );
        }
        let unlisted: Vec<&String> = programs
            .iter()
            .filter(|program| !TOOLS.iter().any(|(command, _)| command == program))
            .collect();
        assert!(
            unlisted.is_empty(),
            "tests start {unlisted:?}, which xtask's TOOLS does not list (so setup would not install them)"
        );
    }
}
