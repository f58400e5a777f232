//! The Google Cloud Pub/Sub rows of `make bench` (built with `--features pubsub`): mayhem
//! against same-run references on one emulator of its own, runs interleaved.
//!
//! - publish: the library's `PubSubSource::publish` in batches of [`BATCH`] (requests of 1,000,
//!   up to 4 in flight; each message
//!   carries its id as an attribute) against `reference.py publish`, Python's REST
//!   `publish` in batches of 1,000 (data only), which also preloads the consume runs;
//! - consume: mayhem (`--publishers 0`, 4 consumers, messages preloaded) against
//!   `reference.py rest`, a Python loop of REST `pull` and batched `acknowledge`, and
//!   `reference.py streaming`, python-pubsub's streaming-pull subscriber (with
//!   `MAYHEM_PUBSUB_PYTHON` naming a Python that has google-cloud-pubsub);
//! - end to end: mayhem publishing (2 publishers) and consuming (4 consumers).
//!
//! A warm-up pass of each kind comes first and is not counted.
//!
//! `MAYHEM_BENCH=pubsub cargo bench --features pubsub --bench pipeline` runs these rows alone.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use mayhem::{PubSubConfig, PubSubMessage, PubSubSource, Publish};

/// The emulator's launcher.
const EMULATOR: &str =
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator";
/// Runs of each measurement (the median is shown).
const PUBSUB_RUNS: usize = 3;
/// Messages per `publish` call of the publish runs.
const BATCH: usize = 10_000;
/// The project of every run.
const PROJECT: &str = "bench";

/// An emulator on a free loopback port, killed with its process group when the watchdog
/// shell's standard input closes (on drop, or when the bench exits however it ends).
struct Emulator {
    host: String,
    /// The JVM's process id, to read its CPU time from (`None` when it was not found).
    pid: Option<u32>,
    watchdog: Child,
    stdin: Option<ChildStdin>,
}

impl Emulator {
    /// Starts the emulator and waits until it answers; `None` when it is not installed or
    /// did not start within a minute.
    fn start() -> Option<Emulator> {
        if !Path::new(EMULATOR).exists() {
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut watchdog = Command::new("setsid")
            .args(["sh", "-c"])
            .arg(
                "setsid \"$0\" --host=127.0.0.1 --port=\"$1\" >/dev/null 2>&1 </dev/null & \
                 cat >/dev/null; kill -KILL -$!",
            )
            .arg(EMULATOR)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdin = watchdog.stdin.take();
        let mut emulator = Emulator {
            host: format!("127.0.0.1:{port}"),
            pid: None,
            watchdog,
            stdin,
        };
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if answers(port) {
                emulator.pid = jvm(port);
                return Some(emulator);
            }
            thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Publishes `count` mayhem messages to topic and subscription `name` through the
    /// library, in batches of [`BATCH`]; returns the messages published per second.
    fn publish(&self, name: &str, count: u64) -> Option<f64> {
        self.publish_measured(name, count, true).map(|run| run.rate)
    }

    /// [`publish`](Self::publish) of messages without ids of their own (data only, as the
    /// Python reference publishes): no id attribute, Pub/Sub's ids stand in.
    fn publish_data_only(&self, name: &str, count: u64) -> Option<f64> {
        self.publish_measured(name, count, false)
            .map(|run| run.rate)
    }

    /// [`publish`](Self::publish), with the CPU it took.
    fn publish_measured(&self, name: &str, count: u64, with_ids: bool) -> Option<PublishRun> {
        let source = PubSubSource::connect(PubSubConfig {
            url: format!("pubsub://{PROJECT}/{name}"),
            emulator_host: Some(self.host.clone()),
            ..PubSubConfig::default()
        })
        .ok()?;
        let mut rng = fastrand::Rng::with_seed(count);
        let messages: Vec<PubSubMessage> = (0..count)
            .map(|_| PubSubMessage::random(&mut rng))
            .map(|message| {
                if with_ids {
                    message
                } else {
                    PubSubMessage::copy_from_slice(message.data())
                }
            })
            .collect();
        let (emulator, client) = (self.cpu(), cpu_of("/proc/self/stat", 14));
        let started = Instant::now();
        for batch in messages.chunks(BATCH) {
            source.publish(batch).ok()?;
        }
        let took = started.elapsed();
        Some(PublishRun::new(
            count,
            took,
            self.cpu() - emulator,
            cpu_of("/proc/self/stat", 14) - client,
        ))
    }

    /// `reference.py publish`, with the CPU it took (the Python process's, start-up and
    /// topic creation included).
    fn reference_publish(&self, name: &str, count: u64) -> Result<PublishRun, String> {
        let (emulator, client) = (self.cpu(), cpu_of("/proc/self/stat", 16));
        let rate = self.reference("publish", name, &count.to_string())?;
        Ok(PublishRun {
            rate,
            emulator: per_message(self.cpu() - emulator, count),
            client: per_message(cpu_of("/proc/self/stat", 16) - client, count),
        })
    }

    /// The emulator's CPU time so far (user and system), or zero when it cannot be read.
    fn cpu(&self) -> Duration {
        self.pid.map_or(Duration::ZERO, |pid| {
            cpu_of(&format!("/proc/{pid}/stat"), 14)
        })
    }

    /// `acked_per_sec` of a run of the binary on subscription `name`, without latency or
    /// failures, 4 consumers and 5,000 messages in flight, plus `args`.
    fn mayhem(&self, name: &str, args: &[&str]) -> Option<f64> {
        let output = Command::new(env!("CARGO_BIN_EXE_mayhem"))
            .args(["--source", &format!("pubsub://{PROJECT}/{name}")])
            .args(["--handler-latency", "0", "--restart-failure-rate", "0"])
            .args(["--save-failure-rate", "0", "--log-level", "warn"])
            .args(["--report", "json", "--ack-deadline", "10s"])
            .args(["--extend-interval", "5s", "--max-in-flight", "5000"])
            .args(["--consumers", "4"])
            .args(args)
            .env("PUBSUB_EMULATOR_HOST", &self.host)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let key = "\"acked_per_sec\":";
        let rest = &stdout[stdout.find(key)? + key.len()..];
        rest[..rest.find([',', '}'])?].parse().ok()
    }

    /// What `reference.py MODE` printed: a rate, or why it measured nothing.
    fn reference(&self, mode: &str, name: &str, n: &str) -> Result<f64, String> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/pubsub/reference.py");
        let python = std::env::var("MAYHEM_PUBSUB_PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let output = Command::new(python)
            .args([script, &self.host, PROJECT, mode, name, n])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|_| "python3 not installed".to_owned())?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        text.parse::<f64>().map_err(|_| {
            if text.is_empty() {
                format!("reference.py {mode} failed")
            } else {
                text
            }
        })
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.watchdog.wait();
    }
}

/// Whether the emulator on `port` answers `GET /`.
fn answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = [0u8; 16];
    stream
        .read(&mut answer)
        .is_ok_and(|n| answer[..n].starts_with(b"HTTP/1.1 200"))
}

/// The process id of the JVM listening on `port`: the process whose command line names
/// `--port=PORT` and runs `java`.
fn jvm(port: u16) -> Option<u32> {
    let flag = format!("--port={port}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&byte| byte == 0).collect();
            let java = args.first()?.ends_with(b"java");
            (java && args.contains(&flag.as_bytes())).then_some(pid)
        })
}

/// CPU time from a `/proc/.../stat` file: the sum of fields `first` and `first + 1`,
/// numbered as in proc(5) (14 and 15 are the process's user and system time, 16 and 17 those
/// of its waited-for children), in clock ticks of 10 ms (USER_HZ is 100 on Linux).
fn cpu_of(path: &str, first: usize) -> Duration {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Duration::ZERO;
    };
    let Some((_, fields)) = text.rsplit_once(')') else {
        return Duration::ZERO;
    };
    // After the command's closing parenthesis comes field 3, the state.
    let fields: Vec<&str> = fields.split_whitespace().collect();
    let ticks = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|field| field.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(first) + ticks(first + 1)) * 10)
}

/// One publish run.
struct PublishRun {
    /// Messages per second.
    rate: f64,
    /// The emulator's CPU per message, in microseconds.
    emulator: f64,
    /// The publishing client's CPU per message, in microseconds.
    client: f64,
}

impl PublishRun {
    fn new(count: u64, took: Duration, emulator: Duration, client: Duration) -> Self {
        PublishRun {
            rate: count as f64 / took.as_secs_f64(),
            emulator: per_message(emulator, count),
            client: per_message(client, count),
        }
    }

    /// The run as a line.
    fn line(&self, who: &str) -> String {
        format!(
            "{who}: {:.0} msg/s, emulator {:.1} us/msg, client {:.1} us/msg, load {}",
            self.rate,
            self.emulator,
            self.client,
            load()
        )
    }
}

/// Microseconds per message.
fn per_message(cpu: Duration, count: u64) -> f64 {
    cpu.as_secs_f64() * 1e6 / count.max(1) as f64
}

/// The 1-minute load average.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

/// `MAYHEM_PUBSUB_PUBLISH_ROUNDS=N`: only the publish comparison, `N` rounds of the library
/// and `reference.py publish` on `messages` messages each, alternating which goes first, one
/// line per run (rate, the emulator's and the client's CPU per message, the load average),
/// then the medians.
fn publish_rounds(emulator: &Emulator, messages: u64, rounds: usize) -> Vec<String> {
    let _ = emulator.publish("warmup", messages);
    let _ = emulator.reference("publish", "warmup-rest", &messages.to_string());
    let (mut ours, mut theirs, mut lines) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        for turn in 0..2 {
            if (round + turn) % 2 == 0 {
                match emulator.publish_measured(&format!("mayhem{round}"), messages, true) {
                    Some(run) => {
                        lines.push(run.line(&format!("round {round} mayhem")));
                        ours.push(run);
                    }
                    None => lines.push(format!("round {round} mayhem: publish failed")),
                }
            } else {
                match emulator.reference_publish(&format!("rest{round}"), messages) {
                    Ok(run) => {
                        lines.push(run.line(&format!("round {round} python")));
                        theirs.push(run);
                    }
                    Err(why) => lines.push(format!("round {round} python: {why}")),
                }
            }
            eprintln!("{}", lines.last().map_or("", String::as_str));
        }
    }
    let medians = |runs: &[PublishRun]| {
        let of = |field: fn(&PublishRun) -> f64| median(runs.iter().map(field).collect());
        (
            of(|run| run.rate),
            of(|run| run.emulator),
            of(|run| run.client),
        )
    };
    for (who, runs) in [("mayhem", &ours), ("python", &theirs)] {
        if let (Some(rate), Some(emulator), Some(client)) = medians(runs) {
            lines.push(format!(
                "median {who}: {rate:.0} msg/s, emulator {emulator:.1} us/msg, client {client:.1} us/msg"
            ));
        }
    }
    let rates = |runs: &[PublishRun]| runs.iter().map(|run| run.rate).collect::<Vec<_>>();
    lines.push(format!(
        "ratio mayhem / python (median rates): {}",
        ratio(&rates(&ours), &rates(&theirs))
    ));
    lines
}

/// The median of what was measured, or `None` when nothing was.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Every run's figure, in the order measured.
fn runs(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A figure with its runs, or why it is missing.
fn show(values: &[f64], why: &str) -> String {
    median(values.to_vec()).map_or_else(
        || format!("not measured: {why}"),
        |v| format!("{v:.0} (runs {})", runs(values)),
    )
}

/// The ratio of two medians.
fn ratio(a: &[f64], b: &[f64]) -> String {
    median(a.to_vec())
        .zip(median(b.to_vec()))
        .map_or_else(|| "-".to_owned(), |(a, b)| format!("{:.2}", a / b))
}

/// The Pub/Sub rows of the bench table (`| figure | measured | target |`), measuring with
/// `messages` messages per run.
pub fn rows(messages: u64) -> Vec<String> {
    let Some(emulator) = Emulator::start() else {
        let why = if Path::new(EMULATOR).exists() {
            "the emulator did not start within 60 s"
        } else {
            "the Pub/Sub emulator is not installed"
        };
        return vec![format!("| Pub/Sub rows | not measured: {why} | |")];
    };
    if let Some(rounds) = std::env::var("MAYHEM_PUBSUB_PUBLISH_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
    {
        let messages = std::env::var("MAYHEM_PUBSUB_PUBLISH_MESSAGES")
            .ok()
            .and_then(|count| count.parse().ok())
            .unwrap_or(messages);
        return publish_rounds(&emulator, messages, rounds);
    }
    let n = messages.to_string();
    let (mut publish, mut python_publish, mut consume, mut rest, mut streaming, mut end_to_end) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut data_only = vec![];
    let (mut rest_missing, mut streaming_missing, mut python_missing) =
        (String::new(), String::new(), String::new());
    // One pass of each kind first, not counted: the emulator's JVM compiles its hot paths
    // during the first runs (measured here: the first run of a fresh emulator consumed at a
    // third to two thirds of the later ones' rate, and published at a tenth to a sixth).
    let _ = emulator.publish("warmup", messages);
    let _ = emulator.mayhem("warmup", &["--publishers", "0", "--messages", &n]);
    let _ = emulator.reference("publish", "warmup-rest", &n);
    let _ = emulator.reference("rest", "warmup-rest", &n);
    for run in 0..PUBSUB_RUNS {
        // Mayhem (its messages with ids, then data only as Python's) and Python publish
        // back to back, taking turns at going first (the run after another on the emulator
        // pays for its collections and compilations); then mayhem consumes what it published
        // with ids and Python's REST loop what Python published.
        let (ours, theirs) = (format!("mayhem{run}"), format!("rest{run}"));
        for turn in 0..3 {
            match (run + turn) % 3 {
                0 => publish.extend(emulator.publish(&ours, messages)),
                1 => match emulator.reference("publish", &theirs, &n) {
                    Ok(rate) => python_publish.push(rate),
                    Err(why) => python_missing = why,
                },
                _ => data_only.extend(emulator.publish_data_only(&format!("plain{run}"), messages)),
            }
        }
        consume.extend(emulator.mayhem(&ours, &["--publishers", "0", "--messages", &n]));
        match emulator.reference("rest", &theirs, &n) {
            Ok(rate) => rest.push(rate),
            Err(why) => rest_missing = why,
        }
        // The streaming-pull subscriber on messages Python published.
        let name = format!("streaming{run}");
        if emulator.reference("publish", &name, &n).is_ok() {
            match emulator.reference("streaming", &name, &n) {
                Ok(rate) => streaming.push(rate),
                Err(why) => streaming_missing = why,
            }
        }
        let name = format!("e2e{run}");
        end_to_end.extend(emulator.mayhem(
            &name,
            &[
                "--publishers",
                "2",
                "--publish-interval",
                "0",
                "--messages",
                &n,
            ],
        ));
    }
    vec![
        format!("| messages/s, Pub/Sub consume: mayhem ({n} preloaded, 4 consumers, window 5000, emulator) | {} | >= 3x streaming pull, >= 1.5x REST loop |", show(&consume, "mayhem run failed")),
        format!("| messages/s, Pub/Sub consume: same-run reference, Python REST `pull` loop (1,000, one `acknowledge` per batch) | {} | |", show(&rest, &rest_missing)),
        format!("| messages/s, Pub/Sub consume: same-run reference, python-pubsub streaming pull (callback acks) | {} | |", show(&streaming, &streaming_missing)),
        format!("| ratio Pub/Sub consume mayhem / REST loop, / streaming pull (medians) | {} / {} | >= 1.5 / >= 3 |", ratio(&consume, &rest), ratio(&consume, &streaming)),
        format!("| messages/s, Pub/Sub publish: `PubSubSource::publish` (batches of {BATCH}: requests of 1,000, up to 4 in flight; data only, 11 bytes, as the Python reference) | {} | >= the Python REST publish |", show(&data_only, "publish failed")),
        format!("| messages/s, Pub/Sub publish: the same, each message with an id of its own (the attribute `mayhem_message_id`, 36 bytes more; as the service's publishers send them) | {} | |", show(&publish, "publish failed")),
        format!("| messages/s, Pub/Sub publish: same-run reference, Python REST `publish` (batches of 1,000, data only, 11 bytes) | {} | |", show(&python_publish, &python_missing)),
        format!("| ratio Pub/Sub publish mayhem data only / Python REST publish (medians) | {} | >= 1.0 |", ratio(&data_only, &python_publish)),
        format!("| messages/s, Pub/Sub end to end: mayhem (2 publishers, 4 consumers, {n} messages) | {} | |", show(&end_to_end, "mayhem run failed")),
    ]
}
