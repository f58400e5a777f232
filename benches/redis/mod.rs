//! The Redis rows of `make bench`: mayhem against same-run references on one loopback
//! `redis-server` of its own.
//!
//! - consume: mayhem (`--publishers 0`, entries preloaded) against `reference.py`, a
//!   redis-py loop of `XREADGROUP COUNT 1000` and one `XACK` per batch;
//! - end to end: mayhem publishing and consuming against pipelined `XADD` of the same
//!   entries with `redis-cli --pipe`;
//! - the server's own cost per command (`INFO commandstats`, `usec_per_call`) over the
//!   mayhem runs, which says what bounds them on the server side.
//!
//! `MAYHEM_BENCH=redis make bench` runs these rows alone.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Runs of each measurement (the median is shown).
const REDIS_RUNS: usize = 3;
/// Flow-control window of the mayhem runs.
const WINDOW: &str = "10000";

/// A `redis-server` on a free loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Server {
    fn start() -> Option<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = std::env::temp_dir().join(format!("mayhem-bench-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = Server { child, port, dir };
        let ready = (0..500).any(|_| {
            thread::sleep(Duration::from_millis(10));
            server.cmd(&["PING"]).is_some()
        });
        ready.then_some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Runs one command; `None` when it failed.
    fn cmd(&self, args: &[&str]) -> Option<redis::Value> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut con).ok()
    }

    /// `usec_per_call` of `command` in `INFO commandstats`.
    fn usec_per_call(&self, command: &str) -> Option<f64> {
        let info: String = match self.cmd(&["INFO", "commandstats"])? {
            redis::Value::BulkString(bytes) => String::from_utf8(bytes).ok()?,
            redis::Value::VerbatimString { text, .. } => text,
            _ => return None,
        };
        let line = info
            .lines()
            .find(|line| line.starts_with(&format!("cmdstat_{command}:")))?;
        let value = line.split("usec_per_call=").nth(1)?.split(',').next()?;
        value.parse().ok()
    }

    /// Pipelines `count` `XADD`s of `payload` bytes of data each to `stream` with
    /// `redis-cli --pipe`, as any producer would write them; returns the entries added per
    /// second.
    fn pipe_payload(&self, stream: &str, count: u64, payload: usize) -> Option<f64> {
        let mut rng = fastrand::Rng::with_seed(count ^ payload as u64);
        let mut data = vec![0u8; payload];
        let mut resp = Vec::with_capacity(count as usize * (payload + 64));
        for _ in 0..count {
            rng.fill(&mut data);
            let header = format!(
                "*5\r\n$4\r\nXADD\r\n${}\r\n{stream}\r\n$1\r\n*\r\n$4\r\ndata\r\n${payload}\r\n",
                stream.len()
            );
            resp.extend_from_slice(header.as_bytes());
            resp.extend_from_slice(&data);
            resp.extend_from_slice(b"\r\n");
        }
        self.pipe(&resp, count)
    }

    /// Sends `resp` (`count` commands) with `redis-cli --pipe`; returns commands per second.
    fn pipe(&self, resp: &[u8], count: u64) -> Option<f64> {
        let mut child = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--pipe"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let started = Instant::now();
        child.stdin.take()?.write_all(resp).ok()?;
        let status = child.wait().ok()?;
        let took = started.elapsed();
        status.success().then(|| count as f64 / took.as_secs_f64())
    }

    /// Pipelines `count` `XADD`s of mayhem messages to `stream` with `redis-cli --pipe`;
    /// returns the entries added per second.
    fn pipe_xadd(&self, stream: &str, count: u64) -> Option<f64> {
        let mut rng = fastrand::Rng::with_seed(count);
        let mut resp = Vec::with_capacity(count as usize * 120);
        for _ in 0..count {
            let message = mayhem::PubSubMessage::random(&mut rng);
            let id = message.id().to_string();
            let args = [
                "XADD",
                stream,
                "*",
                "data",
                message.instance_name().unwrap_or("cattle-0000"),
                "message_id",
                &id,
            ];
            let _ = write!(resp, "*{}\r\n", args.len());
            for arg in args {
                let _ = write!(resp, "${}\r\n{arg}\r\n", arg.len());
            }
        }
        self.pipe(&resp, count)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The payload rows: payload size, entries per run (about 200 MB and 1 GB of data: runs of
/// 50,000 entries of 1 KiB and of 5,000 of 64 KiB lasted 0.3 s, where the connection and
/// the first reads weighed), and consumer threads. Entries of 64 KiB keep redis-server busy
/// (about 50 µs of its CPU per entry, measured): while it writes one consumer's reply,
/// another frames and hands off the last one. Interleaved on a quiet machine (5,000
/// entries), 2 consumers gave 653 and 1,084 MB/s, 4 gave 1,192 and 1,223.
const PAYLOADS: [(usize, u64, usize); 2] = [(1024, 200_000, 2), (64 * 1024, 15_000, 4)];

/// Messages per second a library consumer (the real pipeline: `consumers` threads, window
/// 10,000, the default 100 MiB byte window, a handler that reads the data and acks) takes
/// from `stream` of `server`, until `count` are acked.
fn library_rate(server: &Server, stream: &str, count: u64, consumers: usize) -> Option<f64> {
    use mayhem::{Config, Context, HandleError, Handler, RedisConfig, RedisSource, Shutdown};

    /// Touches every byte of the data, as a handler that decodes it would.
    struct Reader;
    impl Handler for Reader {
        async fn handle(&self, ctx: &Context<'_>) -> Result<(), HandleError> {
            let sum = ctx.data().iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
            std::hint::black_box(sum);
            Ok(())
        }
    }
    let source = RedisSource::connect(RedisConfig {
        url: server.url(),
        stream: stream.to_owned(),
        group: "mayhem".to_owned(),
        consumer: "bench".to_owned(),
        ..RedisConfig::default()
    })
    .ok()?;
    let mut config = Config::default();
    config.publish.publishers = 0;
    config.run.consumers = consumers;
    config.run.max_in_flight = 10_000;
    config.run.messages = Some(count);
    config.run.stats_interval = Duration::ZERO;
    let report = mayhem::Runner::new(&config)
        .run(&source, &Reader, &Shutdown::new())
        .ok()?;
    (report.acked >= count).then_some(report.acked as f64 / report.elapsed_secs)
}

/// The payload rows: MB/s of data consumed by the library and by the redis-py loop, on the
/// same preloaded entries of 1 KiB and 64 KiB, run by run.
fn payload_rows(server: &Server, script: &str) -> Vec<String> {
    let mut rows = Vec::new();
    for (payload, count, consumers) in PAYLOADS {
        let (mut ours, mut theirs) = (vec![], vec![]);
        for run in 0..REDIS_RUNS {
            let stream = format!("payload{payload}-{run}");
            if server.pipe_payload(&stream, count, payload).is_none() {
                continue;
            }
            server.cmd(&["XGROUP", "CREATE", &stream, "python", "0"]);
            let reference = Command::new("python3")
                .args([
                    script,
                    &server.port.to_string(),
                    &stream,
                    "python",
                    &count.to_string(),
                ])
                .stderr(Stdio::null())
                .output()
                .ok()
                .and_then(|out| {
                    String::from_utf8_lossy(&out.stdout)
                        .trim()
                        .parse::<f64>()
                        .ok()
                });
            theirs.extend(reference.map(|rate| rate * payload as f64 / 1e6));
            ours.extend(
                library_rate(server, &stream, count, consumers)
                    .map(|rate| rate * payload as f64 / 1e6),
            );
            server.cmd(&["DEL", &stream, &format!("{stream}:dead")]);
        }
        let (ours, theirs) = (median(ours), median(theirs));
        let size = if payload >= 1024 * 1024 {
            format!("{} MiB", payload / (1024 * 1024))
        } else {
            format!("{} KiB", payload / 1024)
        };
        rows.push(format!(
            "| MB/s of data, Redis consume, {size} payloads: mayhem library ({count} preloaded, {consumers} consumers, a handler reading every byte) | {} | >= 3x the redis-py loop |",
            ours.map_or_else(|| "not measured: run failed".to_owned(), |v| format!("{v:.1}"))
        ));
        rows.push(format!(
            "| MB/s of data, Redis consume, {size} payloads: same-run reference, redis-py loop | {} | |",
            theirs.map_or_else(|| "not measured: python3 with redis-py not installed".to_owned(), |v| format!("{v:.1}"))
        ));
        rows.push(format!(
            "| ratio Redis consume of {size} payloads mayhem / redis-py (medians) | {} | >= 3 |",
            ours.zip(theirs)
                .map_or_else(|| "-".to_owned(), |(a, b)| format!("{:.2}", a / b))
        ));
    }
    rows
}

/// `acked_per_sec` of a mayhem run against `server`.
fn mayhem(server: &Server, args: &[&str]) -> Option<f64> {
    super::binary_rate(&server.url(), WINDOW, args)
}

/// The median of what was measured, or `None` when nothing was.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// A figure, or why it is missing.
fn show(value: Option<f64>, why: &str) -> String {
    value.map_or_else(|| format!("not measured: {why}"), |v| format!("{v:.0}"))
}

/// `MAYHEM_BENCH=payload`: only the payload rows (1 KiB and 64 KiB entries).
pub fn payload_only() -> Vec<String> {
    let Some(server) = Server::start() else {
        return vec!["| Redis rows | not measured: redis-server not installed | |".to_owned()];
    };
    payload_rows(
        &server,
        concat!(env!("CARGO_MANIFEST_DIR"), "/benches/redis/reference.py"),
    )
}

/// The Redis rows of the bench table (`| figure | measured | target |`), measuring with
/// `messages` entries per run.
pub fn rows(messages: u64) -> Vec<String> {
    let Some(server) = Server::start() else {
        return vec!["| Redis rows | not measured: redis-server not installed | |".to_owned()];
    };
    let n = messages.to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/redis/reference.py");
    let (mut consume, mut python, mut piped, mut end_to_end) = (vec![], vec![], vec![], vec![]);
    for run in 0..REDIS_RUNS {
        // Consume: the same preloaded entries, read by two groups.
        let stream = format!("consume{run}");
        let rate = server.pipe_xadd(&stream, messages);
        piped.extend(rate);
        server.cmd(&["XGROUP", "CREATE", &stream, "python", "0"]);
        let reference = Command::new("python3")
            .args([script, &server.port.to_string(), &stream, "python", &n])
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            });
        python.extend(reference);
        server.cmd(&["CONFIG", "RESETSTAT"]);
        consume.extend(mayhem(
            &server,
            &["--stream", &stream, "--publishers", "0", "--messages", &n],
        ));
        server.cmd(&["DEL", &stream]);
        // End to end: mayhem publishes and consumes.
        let stream = format!("e2e{run}");
        end_to_end.extend(mayhem(
            &server,
            &[
                "--stream",
                &stream,
                "--publishers",
                "2",
                "--publish-interval",
                "0",
                "--messages",
                &n,
            ],
        ));
    }
    let per_call = ["xadd", "xreadgroup", "xack", "evalsha"]
        .iter()
        .map(|command| {
            format!(
                "{} {}",
                command.to_uppercase(),
                server
                    .usec_per_call(command)
                    .map_or_else(|| "-".to_owned(), |us| format!("{us:.2}"))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let (consume, python, piped, end_to_end) = (
        median(consume),
        median(python),
        median(piped),
        median(end_to_end),
    );
    let ratio = |a: Option<f64>, b: Option<f64>| {
        a.zip(b)
            .map_or_else(|| "-".to_owned(), |(a, b)| format!("{:.2}", a / b))
    };
    let payloads = payload_rows(&server, script);
    let mut rows = vec![
        format!("| messages/s, Redis consume: mayhem ({n} preloaded, 2 consumers, window {WINDOW}) | {} | >= 2x the redis-py loop |", show(consume, "mayhem run failed")),
        format!("| messages/s, Redis consume: same-run reference, redis-py loop (`XREADGROUP COUNT 1000`, one `XACK` per batch) | {} | |", show(python, "python3 with redis-py not installed (pip install redis)")),
        format!("| ratio Redis consume mayhem / redis-py (medians) | {} | >= 2 |", ratio(consume, python)),
        format!("| messages/s, Redis end to end: mayhem (2 publishers, 2 consumers, {n} messages) | {} | >= 0.3x pipelined XADD |", show(end_to_end, "mayhem run failed")),
        format!("| messages/s, Redis publish: same-run reference, pipelined `XADD` (`redis-cli --pipe`) | {} | |", show(piped, "redis-cli failed")),
        format!("| ratio Redis end to end mayhem / pipelined XADD (medians) | {} | >= 0.3 |", ratio(end_to_end, piped)),
        format!("| Redis server time per call (usec, `INFO commandstats`, consume and end-to-end runs of the last round) | {per_call} | |"),
    ];
    rows.extend(payloads);
    rows
}

impl Server {
    /// `INFO commandstats`: each command's calls and total server time (µs).
    fn commandstats(&self) -> Vec<(String, f64, f64)> {
        let info: String = match self.cmd(&["INFO", "commandstats"]) {
            Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Some(redis::Value::VerbatimString { text, .. }) => text,
            _ => return Vec::new(),
        };
        info.lines()
            .filter_map(|line| {
                let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let field = |key: &str| -> Option<f64> {
                    fields
                        .split(',')
                        .find_map(|field| field.strip_prefix(key)?.strip_prefix('='))?
                        .parse()
                        .ok()
                };
                Some((name.to_owned(), field("calls")?, field("usec")?))
            })
            .collect()
    }

    /// CPU time of redis-server so far, in seconds.
    fn cpu(&self) -> f64 {
        super::peers::processes_cpu_seconds(&[self.child.id()])
    }
}

/// The commands whose server time per message the comparison rows show.
const PEER_COMMANDS: [&str; 3] = ["xreadgroup", "xack", "evalsha"];

/// Records, for a run of `messages` entries, the server time per message of
/// [`PEER_COMMANDS`] (calls x `usec_per_call` / messages, from `INFO commandstats` since
/// the last `CONFIG RESETSTAT`) and of every command together.
fn record_commandstats(server: &Server, messages: u64, contender: &mut super::peers::Contender) {
    let stats = server.commandstats();
    let per_message = |usec: f64| usec / messages as f64;
    for command in PEER_COMMANDS {
        // Folded from +0.0: the sum of no values is -0.0, which would print as "-0".
        let (calls, usec) = stats
            .iter()
            .filter(|(name, _, _)| name == command)
            .fold((0.0, 0.0), |(calls, usec), (_, c, u)| (calls + c, usec + u));
        let label = command.to_uppercase();
        contender
            .extra
            .entry(label.clone())
            .or_default()
            .push(per_message(usec));
        contender.calls.entry(label).or_default().push(calls);
    }
    let all = stats
        .iter()
        .filter(|(name, _, _)| !name.starts_with("config") && !name.starts_with("info"))
        .map(|(_, _, usec)| *usec)
        .sum::<f64>();
    contender
        .extra
        .entry("all commands".to_owned())
        .or_default()
        .push(per_message(all));
}

/// The comparison rows on Redis: mayhem against the Rust peer (tokio + redis), in rounds of
/// one run each on a fresh stream preloaded with `messages` entries (as the consume rows
/// preload it), with the client's and redis-server's CPU per message and the server's time
/// per command (`INFO commandstats`).
pub fn peer_rows(messages: u64, peers: &super::peers::Peers) -> Vec<String> {
    use super::peers::{children_cpu_seconds, ratio, Contender, ROUNDS};
    let Some(server) = Server::start() else {
        return vec!["| Redis peer rows | NOT MEASURED: redis-server not installed | |".to_owned()];
    };
    let n = messages.to_string();
    let url = server.url();
    let (mut ours, mut theirs) = (Contender::default(), Contender::default());
    for round in 0..ROUNDS {
        for peer in [false, true] {
            let contender = if peer { &mut theirs } else { &mut ours };
            let stream = format!("peers-{}{round}", if peer { "peer" } else { "mayhem" });
            if server.pipe_xadd(&stream, messages).is_none() {
                contender.failure = Some("preloading the stream failed".to_owned());
                continue;
            }
            server.cmd(&["CONFIG", "RESETSTAT"]);
            let broker = server.cpu();
            let (result, client) = if peer {
                match peers.run(
                    "redis-peer",
                    &["--url", &url, "--stream", &stream, "--count", &n],
                ) {
                    Ok(run) => {
                        contender.left = contender.left.max(run.left);
                        (Ok(run.rate), run.client_cpu)
                    }
                    Err(why) => (Err(why), 0.0),
                }
            } else {
                let client = children_cpu_seconds();
                let rate = mayhem(
                    &server,
                    &["--stream", &stream, "--publishers", "0", "--messages", &n],
                );
                (
                    rate.ok_or_else(|| "mayhem run failed".to_owned()),
                    children_cpu_seconds() - client,
                )
            };
            let broker = server.cpu() - broker;
            let name = if peer { "tokio + redis peer" } else { "mayhem" };
            match result {
                Ok(rate) => {
                    contender.record(messages, rate, client, broker);
                    record_commandstats(&server, messages, contender);
                    println!("round {round}: Redis {name}: {rate:.0} msg/s, client {client:.2} s, redis-server {broker:.2} s CPU");
                }
                Err(why) => {
                    println!("round {round}: Redis {name}: {why}");
                    contender.failure = Some(why);
                }
            }
            server.cmd(&["DEL", &stream, &format!("{stream}:dead")]);
        }
    }
    vec![
        format!(
            "| Redis consume, mayhem ({n} preloaded, 2 consumers, window {WINDOW}; {ROUNDS} rounds alternating with the peer) | {} | >= 1.5x the peer, <= 1.0 µs of redis-server CPU per message |",
            ours.show("redis-server")
        ),
        format!(
            "| Redis consume, tokio + redis peer (2 consumers in one group, 2 tokio workers, `XREADGROUP COUNT 1000`, each batch's `XACK` pipelined with the next read) | {} | |",
            theirs.show("redis-server")
        ),
        format!(
            "| ratio Redis consume mayhem / tokio + redis peer (medians) | {} | >= 1.5 |",
            ratio(ours.rate(), theirs.rate())
        ),
    ]
}
