//! The shipped container image, built and run for real with podman: `make container` builds
//! it, a counted run completes inside it, and `podman stop` ends a long run gracefully.
//!
//! Where podman or the musl target is missing the image tests print SKIPPED and pass, unless
//! `MAYHEM_REQUIRE_CONTAINER=1` is set (CI sets it), which turns the skip into a failure. The
//! checks of the Dockerfile itself need neither and always run.
// The image holds the binary, which only the `cli` feature builds.
#![cfg(feature = "cli")]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::*;

/// The tag the tests build, apart from the `mayhem` tag `make container` gives by default.
const IMAGE: &str = "localhost/mayhem-test";
/// The static target the image's binary is built for.
const MUSL: &str = "x86_64-unknown-linux-musl";
/// The image size goal, in bytes.
const MAX_IMAGE_BYTES: u64 = 3_000_000;
/// Podman's global flags on these machines: crun refuses their hybrid cgroups, runc works.
const PODMAN_FLAGS: [&str; 3] = ["--runtime", "runc", "--cgroup-manager=cgroupfs"];
/// Limits given to every container, as a production engine would.
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// Prints a line on the test process's stderr even when the harness captures output, so that
/// a skip and the measured figures show in `make test` and CI logs.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(PODMAN_FLAGS);
    command
}

fn run(command: &mut Command) -> Output {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Why the image cannot be built here, if it cannot.
fn missing_tools() -> Option<String> {
    if Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Some("podman is not installed (apt-get install podman runc)".to_owned());
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default();
    let target = PathBuf::from(sysroot).join("lib/rustlib").join(MUSL);
    if !target.is_dir() {
        return Some(format!(
            "the {MUSL} target is not installed (rustup target add {MUSL})"
        ));
    }
    None
}

/// Why the image could not be built.
enum NoImage {
    /// A tool is missing: a skip, unless the tests are required.
    Missing(String),
    /// `make container` failed: always a failure.
    BuildFailed(String),
}

/// Builds the image once for all the tests of this file, with `make container`; `None` when
/// the tools are missing and the tests are not required (the skip is printed).
fn image(test: &str) -> Option<MutexGuard<'static, ()>> {
    static BUILT: OnceLock<Result<(), NoImage>> = OnceLock::new();
    // The tests share the image and the machine's two cores: they run one at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let built = BUILT.get_or_init(|| {
        if let Some(reason) = missing_tools() {
            return Err(NoImage::Missing(reason));
        }
        let started = Instant::now();
        let output = Command::new("make")
            .arg("--no-print-directory")
            .arg("container")
            .arg(format!("IMAGE={IMAGE}"))
            .current_dir(root())
            .stdin(Stdio::null())
            .output()
            .map_err(|error| NoImage::BuildFailed(format!("cannot run make: {error}")))?;
        if !output.status.success() {
            return Err(NoImage::BuildFailed(format!(
                "make container failed with {}:\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        say(&format!(
            "container: make container took {:.1?}",
            started.elapsed()
        ));
        Ok(())
    });
    match built {
        Ok(()) => Some(
            ONE_AT_A_TIME
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        ),
        Err(NoImage::BuildFailed(text)) => panic!("{test}: {text}"),
        // The common rule: SKIPPED on stderr and in the log `make test` counts (this test
        // once said SKIPPED while `make test` reported 0 skipped), or a failure under
        // MAYHEM_REQUIRE_CONTAINER=1.
        Err(NoImage::Missing(reason)) => {
            skip(reason);
            None
        }
    }
}

fn inspect(format: &str) -> String {
    let output = run(podman().args(["image", "inspect", "--format", format, IMAGE]));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn the_image_is_small_static_and_unprivileged() {
    let Some(_turn) = image("the_image_is_small_static_and_unprivileged") else {
        return;
    };
    let size: u64 = inspect("{{.Size}}").parse().expect("image size in bytes");
    say(&format!("container: image size {size} bytes"));
    assert!(
        size <= MAX_IMAGE_BYTES,
        "image is {size} bytes, over {MAX_IMAGE_BYTES}"
    );
    assert_eq!(inspect("{{.Config.User}}"), "65534:65534");
    assert_eq!(inspect("{{json .Config.Entrypoint}}"), "[\"/mayhem\"]");
    // One layer: the binary alone, no base image.
    assert_eq!(inspect("{{len .RootFS.Layers}}"), "1");
}

#[test]
fn a_counted_run_completes_in_the_container() {
    let Some(_turn) = image("a_counted_run_completes_in_the_container") else {
        return;
    };
    let started = Instant::now();
    let output = podman()
        .args(["run", "--rm"])
        .args(ULIMITS)
        // Configuration through the environment, as an orchestrator gives it.
        .args(["-e", "MAYHEM_MESSAGES=5", "-e", "MAYHEM_REPORT=json"])
        .arg(IMAGE)
        .args([
            "--publish-interval",
            "1ms",
            "--handler-latency",
            "5ms",
            "--seed",
            "7",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run podman");
    say(&format!(
        "container: counted run took {:.1?}",
        started.elapsed()
    ));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let lines: Vec<String> = stderr.lines().map(str::to_owned).collect();
    assert_shutdown_sequence(&lines, "Settled all 5 messages");
    assert_no_panic_text(&lines);
    let report = stdout.trim();
    assert_eq!(field(report, "published"), 5.0, "{report}");
    assert!(report.contains("\"reason\":\"completed\""), "{report}");
    assert_eq!(
        field(report, "acked") + field(report, "dead_lettered"),
        5.0,
        "{report}"
    );
    assert_balanced(report);
}

/// Removes the named container if a failed test left it behind.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--ignore", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn podman_stop_shuts_a_long_run_down_gracefully() {
    let Some(_turn) = image("podman_stop_shuts_a_long_run_down_gracefully") else {
        return;
    };
    let name = format!("mayhem-test-stop-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let mut command = podman();
    command
        .args(["run", "--rm", "--name", &name])
        .args(ULIMITS)
        .arg(IMAGE)
        .args([
            "--publish-interval",
            "5ms",
            "--handler-latency",
            "20ms",
            "--report",
            "json",
        ]);
    let mut service = Service::spawn(command);
    // Messages are being handled: the service is past its start-up.
    service.wait_for("Done. Acked");
    let started = Instant::now();
    run(podman().args(["stop", "--time", "10", &name]));
    let stop_took = started.elapsed();
    let (status, _, lines, stdout) = service.finish();
    say(&format!("container: podman stop took {stop_took:.2?}"));
    assert_eq!(status.code(), Some(0), "{lines:#?}\n{stdout}");
    // Well before podman's 10 s SIGKILL: the SIGTERM path ended it.
    assert!(
        stop_took < Duration::from_secs(8),
        "stop took {stop_took:?}"
    );
    assert_shutdown_sequence(&lines, "Received exit signal SIGTERM");
    assert_no_panic_text(&lines);
    let report = stdout.trim();
    assert!(report.contains("\"reason\":\"signal\""), "{report}");
    assert!(field(report, "acked") > 0.0, "{report}");
    assert_balanced(report);
}

/// The runtime stage after this marker line must be the same in both files.
const RUNTIME_MARKER: &str = "# --- runtime stage";

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn runtime_stage(text: &str) -> &str {
    let start = text.find(RUNTIME_MARKER).expect("runtime stage marker");
    &text[start..]
}

#[test]
fn the_dockerfile_ships_the_same_runtime_stage() {
    let dockerfile = read("Dockerfile");
    let containerfile = read("container/Containerfile");
    assert_eq!(
        runtime_stage(&dockerfile),
        runtime_stage(&containerfile),
        "the runtime stages of Dockerfile and container/Containerfile differ"
    );
    assert!(runtime_stage(&dockerfile).contains("\nFROM scratch\n"));
    assert!(runtime_stage(&dockerfile).contains("\nUSER 65534:65534\n"));
}

#[test]
fn the_dockerfile_builder_copies_no_tests_and_its_manifest_parses() {
    let dockerfile = read("Dockerfile");
    let copies: Vec<&str> = dockerfile
        .lines()
        .filter(|line| line.starts_with("COPY ") && !line.contains("--from="))
        .collect();
    assert_eq!(
        copies,
        [
            "COPY Cargo.toml Cargo.lock ./",
            "COPY src ./src",
            "COPY vendor ./vendor"
        ],
        "the builder copies only the manifest, the lock file, the sources and the vendored crate"
    );
    // Rebuild the builder's context: the copied files, then its stand-in files, then check
    // that cargo parses the manifest there (it fails on a declared target's missing file).
    let stubs = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("RUN mkdir tests benches && "))
        .expect("the builder's stand-in files");
    let dir = std::env::temp_dir().join(format!("mayhem-dockerfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tests")).expect("temp dir");
    std::fs::create_dir_all(dir.join("benches")).expect("temp dir");
    for file in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(root().join(file), dir.join(file)).expect("copy manifest");
    }
    for copied in ["src", "vendor"] {
        run(Command::new("cp")
            .arg("-r")
            .arg(root().join(copied))
            .arg(&dir));
    }
    run(Command::new("sh").args(["-c", stubs]).current_dir(&dir));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&dir)
        .output()
        .expect("run cargo metadata");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "the builder's manifest does not parse: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
