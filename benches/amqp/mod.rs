//! The RabbitMQ rows of `make bench` (built with `--features amqp`): mayhem against a
//! same-run reference on one loopback `rabbitmq-server` of its own.
//!
//! - publish: the library's `AmqpSource::publish` in batches of [`BATCH`] (confirm mode,
//!   persistent messages) into a fresh quorum queue, over the default publishing connections
//!   (these runs also preload the consume runs) and, as the same-run reference, over one;
//! - consume: mayhem (`--publishers 0`, messages preloaded) against `reference.py`, a plain
//!   pika consumer with prefetch 200 and one `basic.ack` per message, on the same messages;
//! - end to end: mayhem publishing (2 publishers) and consuming (2 consumers).
//!
//! `MAYHEM_BENCH=amqp cargo bench --features amqp --bench pipeline` runs these rows alone.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use mayhem::{AmqpConfig, AmqpSource, PubSubMessage, Publish};

/// Runs of each measurement (the median is shown).
const AMQP_RUNS: usize = 3;
/// Flow-control window of the mayhem runs (the binary makes it the prefetch).
const WINDOW: &str = "10000";
/// Messages per `publish` call of the publish runs.
const BATCH: usize = 1000;
/// The server script of Debian's package (the copy under /usr/sbin insists on a service
/// user).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// A free loopback port (free when asked).
fn free_port() -> Option<u16> {
    Some(
        TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port(),
    )
}

/// A `rabbitmq-server` on free loopback ports, with its data in a temporary directory.
///
/// It runs under a watchdog shell that kills its whole process group (the script, the Erlang
/// VM and its helpers) and removes the directory when its standard input closes: on drop,
/// or when the bench exits however it ends.
struct Server {
    port: u16,
    watchdog: Child,
    stdin: Option<ChildStdin>,
}

impl Server {
    /// Starts the server and waits until it accepts AMQP connections; `None` when it is not
    /// installed or did not start within a minute.
    fn start() -> Option<Server> {
        if !Path::new(SERVER).exists() {
            return None;
        }
        let dir: PathBuf =
            std::env::temp_dir().join(format!("mayhem-bench-rabbitmq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok()?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n").ok()?;
        let (port, dist) = (free_port()?, free_port()?);
        let log = dir.join("server.log");
        let name = dir.file_name()?.to_str()?.to_owned();
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                "setsid \"$0\" >\"$1\" 2>&1 </dev/null & \
                 cat >/dev/null; kill -KILL -$!; sleep 0.2; rm -rf \"$2\"",
            )
            .arg(SERVER)
            .arg(&log)
            .arg(&dir)
            .env("HOME", &dir)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_NODENAME", format!("{name}@localhost"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdin = watchdog.stdin.take();
        let server = Server {
            port,
            watchdog,
            stdin,
        };
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Server startup complete")
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return Some(server);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Publishes `count` mayhem messages to `queue` through the library, in batches of
    /// [`BATCH`] over `connections` publishing connections, and waits for the last confirms;
    /// returns the messages published (confirmed) per second.
    fn publish(&self, queue: &str, count: u64, connections: usize) -> Option<f64> {
        let source = AmqpSource::connect(AmqpConfig {
            url: self.url(),
            queue: queue.to_owned(),
            publish_connections: connections,
            ..AmqpConfig::default()
        })
        .ok()?;
        let mut rng = fastrand::Rng::with_seed(count);
        let messages: Vec<PubSubMessage> = (0..count)
            .map(|_| PubSubMessage::random(&mut rng))
            .collect();
        let started = Instant::now();
        for batch in messages.chunks(BATCH) {
            source.publish(batch).ok()?;
        }
        // The last batches' confirms are still outstanding: the time counts them too.
        if source.wait_confirmed(Duration::from_secs(30)) > 0 {
            return None;
        }
        Some(count as f64 / started.elapsed().as_secs_f64())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.watchdog.wait();
    }
}

/// `acked_per_sec` of a mayhem run against `server`.
fn mayhem(server: &Server, args: &[&str]) -> Option<f64> {
    super::binary_rate(&server.url(), WINDOW, args)
}

/// What `reference.py` printed: a rate, or why it measured nothing.
fn reference(server: &Server, queue: &str, n: &str) -> Result<f64, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/amqp/reference.py");
    let output = Command::new("python3")
        .args([script, &server.port.to_string(), queue, n])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|_| "python3 not installed".to_owned())?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    text.parse::<f64>().map_err(|_| {
        if text.is_empty() {
            "pika consumer failed".to_owned()
        } else {
            text
        }
    })
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

/// A figure, or why it is missing.
fn show(value: Option<f64>, why: &str) -> String {
    value.map_or_else(|| format!("not measured: {why}"), |v| format!("{v:.0}"))
}

/// The RabbitMQ rows of the bench table (`| figure | measured | target |`), measuring with
/// `messages` messages per run.
pub fn rows(messages: u64) -> Vec<String> {
    let Some(server) = Server::start() else {
        let why = if Path::new(SERVER).exists() {
            "rabbitmq-server did not start within 60 s"
        } else {
            "rabbitmq-server not installed"
        };
        return vec![format!("| RabbitMQ rows | not measured: {why} | |")];
    };
    let n = messages.to_string();
    let connections = AmqpConfig::default().publish_connections;
    let (mut publish, mut publish_one, mut consume, mut python, mut end_to_end) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut python_missing = "pika consumer failed".to_owned();
    for run in 0..AMQP_RUNS {
        // Publish, which preloads the consume run of mayhem.
        let queue = format!("consume{run}");
        publish.extend(server.publish(&queue, messages, connections));
        consume.extend(mayhem(
            &server,
            &["--stream", &queue, "--publishers", "0", "--messages", &n],
        ));
        // The same messages again for the pika consumer (its rate is not a publish figure).
        // Published over one connection, the same-run reference of the publish row.
        let queue = format!("pika{run}");
        if let Some(rate) = server.publish(&queue, messages, 1) {
            publish_one.push(rate);
            match reference(&server, &queue, &n) {
                Ok(rate) => python.push(rate),
                Err(why) => python_missing = why,
            }
        }
        // End to end: mayhem publishes and consumes.
        let queue = format!("e2e{run}");
        end_to_end.extend(mayhem(
            &server,
            &[
                "--stream",
                &queue,
                "--publishers",
                "2",
                "--publish-interval",
                "0",
                "--messages",
                &n,
            ],
        ));
    }
    let (publish_runs, publish_one_runs) = (runs(&publish), runs(&publish_one));
    let (publish, publish_one, consume, python, end_to_end) = (
        median(publish),
        median(publish_one),
        median(consume),
        median(python),
        median(end_to_end),
    );
    let ratio = consume
        .zip(python)
        .map_or_else(|| "-".to_owned(), |(a, b)| format!("{:.2}", a / b));
    vec![
        format!("| messages/s, RabbitMQ consume: mayhem ({n} preloaded, 2 consumers, window and prefetch {WINDOW}) | {} | >= 1.5x the pika consumer |", show(consume, "mayhem run failed")),
        format!("| messages/s, RabbitMQ consume: same-run reference, pika consumer (prefetch 200, one `basic.ack` per message) | {} | |", show(python, &python_missing)),
        format!("| ratio RabbitMQ consume mayhem / pika (medians) | {ratio} | >= 1.5 |"),
        format!("| messages/s, RabbitMQ publish: `AmqpSource::publish` (batches of {BATCH}, confirmed, persistent, quorum queue, {connections} connections; runs {publish_runs}) | {} | >= 50,000 |", show(publish, "publish failed")),
        format!("| messages/s, RabbitMQ publish: same-run reference, 1 connection (runs {publish_one_runs}) | {} | |", show(publish_one, "publish failed")),
        format!("| messages/s, RabbitMQ end to end: mayhem (2 publishers, 2 consumers, {n} messages) | {} | |", show(end_to_end, "mayhem run failed")),
    ]
}

/// The peers' configurations on RabbitMQ: a label, the peer's flags.
const PEER_CONFIGS: [(&str, &[&str]); 3] = [
    (
        "tokio + lapin peer, inline, prefetch 1,000, `multiple` ack every 100",
        &[
            "--mode",
            "inline",
            "--prefetch",
            "1000",
            "--ack-every",
            "100",
        ],
    ),
    (
        "tokio + lapin peer, inline, prefetch 10,000, `multiple` ack every 1,000",
        &[
            "--mode",
            "inline",
            "--prefetch",
            "10000",
            "--ack-every",
            "1000",
        ],
    ),
    (
        "tokio + lapin peer, one task per delivery acking it alone, prefetch 1,000",
        &["--mode", "spawn", "--prefetch", "1000"],
    ),
];

/// The CPU time of the broker's Erlang VM so far, in seconds.
fn broker_cpu() -> f64 {
    let name = format!("mayhem-bench-rabbitmq-{}", std::process::id());
    super::peers::processes_cpu_seconds(&super::peers::pids_with(&name))
}

/// The comparison rows on RabbitMQ: mayhem against the Rust peers (tokio + lapin), in
/// rounds of one run each on a fresh quorum queue preloaded with `messages` messages (as
/// the consume rows preload it), with the client's and the Erlang VM's CPU per message.
pub fn peer_rows(messages: u64, peers: &super::peers::Peers) -> Vec<String> {
    use super::peers::{children_cpu_seconds, ratio, Contender, ROUNDS};
    let Some(server) = Server::start() else {
        let why = if Path::new(SERVER).exists() {
            "rabbitmq-server did not start within 60 s"
        } else {
            "rabbitmq-server not installed"
        };
        return vec![format!("| RabbitMQ peer rows | NOT MEASURED: {why} | |")];
    };
    let n = messages.to_string();
    let connections = AmqpConfig::default().publish_connections;
    let url = server.url();
    let mut ours = Contender::default();
    let mut theirs: Vec<Contender> = PEER_CONFIGS.iter().map(|_| Contender::default()).collect();
    for round in 0..ROUNDS {
        let queue = format!("peers-mayhem{round}");
        if server.publish(&queue, messages, connections).is_none() {
            ours.failure = Some("preloading the queue failed".to_owned());
        } else {
            let (client, broker) = (children_cpu_seconds(), broker_cpu());
            let rate = mayhem(
                &server,
                &["--stream", &queue, "--publishers", "0", "--messages", &n],
            );
            let (client, broker) = (children_cpu_seconds() - client, broker_cpu() - broker);
            match rate {
                Some(rate) => {
                    ours.record(messages, rate, client, broker);
                    println!("round {round}: RabbitMQ mayhem {rate:.0} msg/s, client {client:.2} s, broker {broker:.2} s CPU");
                }
                None => ours.failure = Some("mayhem run failed".to_owned()),
            }
        }
        for (index, (label, flags)) in PEER_CONFIGS.iter().enumerate() {
            let queue = format!("peers-{index}-{round}");
            let contender = &mut theirs[index];
            if server.publish(&queue, messages, connections).is_none() {
                contender.failure = Some("preloading the queue failed".to_owned());
                continue;
            }
            let mut args = vec!["--url", &url, "--queue", &queue, "--count", &n];
            args.extend_from_slice(flags);
            let broker = broker_cpu();
            match peers.run("amqp-peer", &args) {
                Ok(run) => {
                    let broker = broker_cpu() - broker;
                    contender.record(messages, run.rate, run.client_cpu, broker);
                    contender.left = contender.left.max(run.left);
                    println!(
                        "round {round}: RabbitMQ {label}: {:.0} msg/s, client {:.2} s, broker {broker:.2} s CPU, {} left",
                        run.rate, run.client_cpu, run.left
                    );
                }
                Err(why) => {
                    println!("round {round}: RabbitMQ {label}: {why}");
                    contender.failure = Some(why);
                }
            }
        }
    }
    let mut rows = vec![format!(
        "| RabbitMQ consume, mayhem ({n} preloaded in a quorum queue, 2 consumers, window and prefetch {WINDOW}, `multiple` acks over the settled prefix of delivery tags; {ROUNDS} rounds alternating with the peers) | {} | >= 1.0x the best inline peer, >= 1.5x the task-per-delivery peer |",
        ours.show("Erlang VM")
    )];
    for ((label, _), contender) in PEER_CONFIGS.iter().zip(&theirs) {
        rows.push(format!(
            "| RabbitMQ consume, {label} (2 tokio workers, same queue shape) | {} | |",
            contender.show("Erlang VM")
        ));
    }
    // The best of the inline configurations by median rate.
    let inline = theirs[..2]
        .iter()
        .max_by(|a, b| a.rate().unwrap_or(0.0).total_cmp(&b.rate().unwrap_or(0.0)))
        .expect("two inline configurations");
    rows.push(format!(
        "| ratio RabbitMQ consume mayhem / best inline tokio + lapin peer (medians) | {} | >= 1.0 |",
        ratio(ours.rate(), inline.rate())
    ));
    rows.push(format!(
        "| ratio RabbitMQ consume mayhem / task-per-delivery tokio + lapin peer (medians) | {} | >= 1.5 |",
        ratio(ours.rate(), theirs[2].rate())
    ));
    rows.push(format!(
        "| Erlang VM CPU per message, mayhem / best inline peer (µs, medians) | {} / {} | mayhem <= the peer |",
        ours.broker_cpu().map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
        inline.broker_cpu().map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
    ));
    rows
}
