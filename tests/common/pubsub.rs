//! The Google Cloud Pub/Sub emulator a test or a soak run starts, on a free loopback port
//! (about 4 s; Java 17), under a watchdog shell that kills its whole process group and
//! removes its directory when its standard input closes: when the [`Emulator`] is dropped,
//! or when the process that started it exits, however it ends.
//!
//! Standard library only, and nothing from the rest of `tests/common`: the Pub/Sub soak
//! (`examples/pubsub_soak.rs`) includes this file alone (the rest needs a test's `env!`s).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

// Also loaded by `common` and by the other soaks (see `port.rs`).
#[allow(clippy::duplicate_mod)]
#[path = "port.rs"]
mod port;

/// The emulator's launcher (Debian package `google-cloud-cli-pubsub-emulator`).
pub const EMULATOR: &str =
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator";

/// How long the emulator may take to answer after its start.
const START_PATIENCE: Duration = Duration::from_secs(60);

/// Whether the emulator is installed.
pub fn installed() -> bool {
    Path::new(EMULATOR).exists()
}

/// A running emulator.
pub struct Emulator {
    /// `127.0.0.1:PORT`, as `PUBSUB_EMULATOR_HOST` names it.
    pub host: String,
    /// Its directory, with its log and its process id (`pid`).
    pub dir: PathBuf,
    /// The watchdog shell and its standard input: the emulator is killed when it closes.
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
}

impl Emulator {
    /// Starts the emulator on a free port and waits until it answers `GET /`; an error when
    /// it is not installed or does not answer.
    pub fn start() -> Result<Emulator, String> {
        if !installed() {
            return Err(format!(
                "{EMULATOR} not found (apt-get install google-cloud-cli-pubsub-emulator)"
            ));
        }
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        for _ in 0..3 {
            let port = port::free_port()?;
            let dir = std::env::temp_dir().join(format!(
                "mayhem-pubsub-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&dir)
                .map_err(|error| format!("create the emulator's directory: {error}"))?;
            // `setsid` puts the launcher and its Java in a process group of their own, which
            // `kill -KILL -$!` ends whole once the shell's standard input closes. The shell
            // has a session of its own too: a signal to this process's group (a runner ending
            // it) must not end the shell first and leave the emulator running.
            let mut watchdog = Command::new("setsid")
                .arg("sh")
                .arg("-c")
                .arg(
                    "setsid \"$0\" --host=127.0.0.1 --port=\"$1\" >\"$2/emulator.log\" 2>&1 \
                     </dev/null & echo $! >\"$2/pid\"; cat >/dev/null; kill -KILL -$!; \
                     sleep 0.2; rm -rf \"$2\"",
                )
                .arg(EMULATOR)
                .arg(port.to_string())
                .arg(&dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|error| format!("start the emulator's watchdog shell: {error}"))?;
            let stdin = watchdog.stdin.take().expect("piped stdin");
            let end = Instant::now() + START_PATIENCE;
            while Instant::now() < end {
                if answers(port) {
                    return Ok(Emulator {
                        host: format!("127.0.0.1:{port}"),
                        dir,
                        watchdog: Mutex::new(Some((watchdog, stdin))),
                    });
                }
                let log = std::fs::read_to_string(dir.join("emulator.log")).unwrap_or_default();
                if log.contains("Address already in use") {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            drop(stdin);
            let _ = watchdog.wait();
        }
        Err("the pubsub emulator did not start".to_owned())
    }

    /// The process id of the emulator's Java (its launcher execs it), as the watchdog wrote
    /// it.
    pub fn pid(&self) -> String {
        std::fs::read_to_string(self.dir.join("pid"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Sends `kill -{name}` to the emulator's Java (`STOP` freezes it, `CONT` lets it run
    /// on); whether `kill` succeeded.
    pub fn signal(&self, name: &str) -> bool {
        let pid = self.pid();
        !pid.is_empty()
            && Command::new("kill")
                .args([&format!("-{name}"), &pid])
                .status()
                .is_ok_and(|status| status.success())
    }

    /// Whether it answers `GET /` with `Ok`.
    pub fn answers(&self) -> bool {
        self.host
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .is_some_and(answers)
    }
}

impl Drop for Emulator {
    /// Closes the watchdog's standard input (it kills the emulator and removes its
    /// directory) and waits for the watchdog.
    fn drop(&mut self) {
        let watchdog = self
            .watchdog
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((mut child, stdin)) = watchdog {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// Whether the emulator on `port` answers `GET /` with `Ok`.
pub fn answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}
