//! A `redis-server` a test starts, and what the tests ask of it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use mayhem::RedisConfig;
use redis::Value;

use super::{free_port, kill, skip, BrokerServer, Service};

/// Upper bound for anything the server's helpers wait for; only reached when something is
/// broken.
const PATIENCE: Duration = Duration::from_secs(20);

/// Whether `redis-server` is installed; says so loudly (see [`skip`]) when it is not.
pub fn installed() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !found {
        skip("redis-server not found (apt-get install redis-server)");
    }
    found
}

/// A `redis-server` on a free loopback port, killed (and its directory removed) on drop.
pub struct RedisServer {
    child: Mutex<Option<Child>>,
    pub port: u16,
    /// Its directory, with its Unix socket `redis.sock`.
    pub dir: PathBuf,
    persistent: bool,
    password: Option<String>,
}

impl RedisServer {
    /// Starts a server, or returns `None` (saying so) when `redis-server` is not installed.
    /// `persistent` servers write an append-only file synced on every write, so they keep
    /// their data across a restart.
    pub fn start(persistent: bool) -> Option<RedisServer> {
        RedisServer::start_with(persistent, None, None)
    }

    /// [`RedisServer::start`] on a given port (else a free one), with a password (else none).
    pub fn start_with(
        persistent: bool,
        port: Option<u16>,
        password: Option<&str>,
    ) -> Option<RedisServer> {
        if !installed() {
            return None;
        }
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mayhem-redis-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let mut server = RedisServer {
            child: Mutex::new(None),
            port: port.unwrap_or_else(free_port),
            dir,
            persistent,
            password: password.map(str::to_owned),
        };
        // Another test may have taken the same free port between our probe and the server's
        // bind; then our server exits, and (unless the port was given) a new port is tried.
        for _ in 0..5 {
            if server.spawn() {
                return Some(server);
            }
            if port.is_some() {
                thread::sleep(Duration::from_millis(50));
            } else {
                server.port = free_port();
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// Starts `redis-server` on `self.port` and waits until it answers PING; false when it
    /// exited instead (its port was taken).
    fn spawn(&self) -> bool {
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--dir"])
            .arg(&self.dir)
            // Also a Unix socket, for the test of `redis+unix://` addresses.
            .arg("--unixsocket")
            .arg(self.dir.join("redis.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        if self.persistent {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        let mut child = command.spawn().expect("start redis-server");
        let end = Instant::now() + PATIENCE;
        loop {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return false;
            }
            // PING, not just a connect: the port may belong to another test's server for a
            // moment, and a persistent server accepts connections before it loaded its data.
            let pong = redis::Client::open(self.url())
                .and_then(|client| client.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut con| redis::cmd("PING").query::<String>(&mut con));
            if pong.is_ok() && matches!(child.try_wait(), Ok(None)) {
                *self.child.lock().unwrap() = Some(child);
                return true;
            }
            assert!(Instant::now() < end, "redis-server did not start");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id of the running server.
    fn pid(&self) -> String {
        let child = self.child.lock().unwrap();
        child.as_ref().expect("a running server").id().to_string()
    }

    /// A source's settings for `stream` on the server: group `g`, consumer `c1`, 3 attempts.
    pub fn config(&self, stream: &str, ack_deadline: Duration) -> RedisConfig {
        RedisConfig {
            url: self.url(),
            stream: stream.to_owned(),
            group: "g".to_owned(),
            consumer: "c1".to_owned(),
            ack_deadline,
            max_attempts: 3,
            ..RedisConfig::default()
        }
    }

    /// Restarts the server under `service`, waiting until it lost Redis and has it back.
    pub fn restart_under(&self, service: &mut Service) {
        let (lost, back) = ("lost connection to redis", "reconnected to redis");
        super::restart_under(service, self, lost, back);
    }

    /// Runs one command on the server.
    pub fn cmd(&self, args: &[&str]) -> Value {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut self.connection())
            .unwrap_or_else(|error| panic!("{args:?}: {error}"))
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to the test server")
    }

    /// Adds `count` messages named `cattle-0000`, `cattle-0001`, ... to `stream`.
    pub fn publish(&self, stream: &str, count: usize) -> Vec<String> {
        self.publish_names(
            stream,
            (0..count).map(|i| format!("cattle-{i:04}")).collect(),
        )
    }

    /// Adds `count` messages named `cattle-{tag}000`, `cattle-{tag}001`, ... to `stream`.
    pub fn publish_as(&self, stream: &str, tag: char, count: usize) -> Vec<String> {
        self.publish_names(
            stream,
            (0..count).map(|i| format!("cattle-{tag}{i:03}")).collect(),
        )
    }

    /// Adds one message per name to `stream`; the message ids are derived from the names.
    pub fn publish_names(&self, stream: &str, names: Vec<String>) -> Vec<String> {
        let mut con = self.connection();
        let mut pipe = redis::pipe();
        for name in &names {
            let id = name.bytes().fold(1u128, |id, b| {
                id.wrapping_mul(131).wrapping_add(u128::from(b))
            });
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("data")
                .arg(name)
                .arg("message_id")
                .arg(mayhem::Uuid::from_u128(id).to_string())
                .ignore();
        }
        pipe.query::<()>(&mut con).expect("XADD");
        names
    }

    /// `XINFO GROUPS` of `stream` for `group`: (pending, lag, entries-read).
    pub fn group(&self, stream: &str, group: &str) -> Option<(i64, i64, i64)> {
        let reply: Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query(&mut self.connection())
            .ok()?;
        let Value::Array(groups) = reply else {
            return None;
        };
        for entry in groups {
            let Value::Array(pairs) = entry else { continue };
            let fields: HashMap<String, Value> = pairs
                .chunks(2)
                .filter_map(|pair| {
                    Some((
                        redis::from_redis_value_ref(&pair[0]).ok()?,
                        pair.get(1)?.clone(),
                    ))
                })
                .collect();
            let name: String = redis::from_redis_value_ref(fields.get("name")?).ok()?;
            if name != group {
                continue;
            }
            let number = |key: &str| match fields.get(key) {
                Some(Value::Int(n)) => *n,
                _ => -1,
            };
            return Some((number("pending"), number("lag"), number("entries-read")));
        }
        None
    }

    /// Pending entries of one consumer.
    pub fn pending_of(&self, stream: &str, group: &str, consumer: &str) -> usize {
        let reply: Vec<Value> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(10_000)
            .arg(consumer)
            .query(&mut self.connection())
            .expect("XPENDING");
        reply.len()
    }

    /// Polls until the group has delivered and acked everything in `stream`.
    pub fn wait_until_drained(&self, stream: &str, group: &str) {
        let end = Instant::now() + PATIENCE;
        loop {
            if let Some((0, 0, read)) = self.group(stream, group) {
                if read > 0 {
                    return;
                }
            }
            assert!(
                Instant::now() < end,
                "group never drained: {:?}",
                self.group(stream, group)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The distinct instance names in `stream`, sorted.
    pub fn instance_names(&self, stream: &str) -> Vec<String> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut self.connection())
            .expect("XRANGE");
        let Value::Array(entries) = reply else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .iter()
            .filter_map(|entry| {
                let Value::Array(parts) = entry else {
                    return None;
                };
                let fields: HashMap<String, String> =
                    redis::from_redis_value_ref(parts.get(1)?).ok()?;
                fields.get("data").cloned()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Entry ids of a stream, oldest first.
    pub fn entry_ids(&self, stream: &str) -> Vec<String> {
        self.range(stream, 0)
    }

    /// The entries of `stream`, oldest first: each entry's fields, in the order they were
    /// written.
    pub fn fields(&self, stream: &str) -> Vec<Vec<(String, String)>> {
        self.range(stream, 1)
    }

    /// Part `part` of each entry of `stream` (0 its id, 1 its fields), oldest first; the
    /// entries it does not fit are left out.
    fn range<T: redis::FromRedisValue>(&self, stream: &str, part: usize) -> Vec<T> {
        let reply: Value = self.cmd(&["XRANGE", stream, "-", "+"]);
        let Value::Array(entries) = reply else {
            return Vec::new();
        };
        entries
            .iter()
            .filter_map(|entry| match entry {
                Value::Array(parts) => redis::from_redis_value_ref(parts.get(part)?).ok(),
                _ => None,
            })
            .collect()
    }

    pub fn xlen(&self, stream: &str) -> i64 {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.connection())
            .expect("XLEN")
    }
}

impl BrokerServer for RedisServer {
    fn port(&self) -> u16 {
        self.port
    }

    fn url_on(&self, port: u16) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{port}/0"),
            None => format!("redis://127.0.0.1:{port}/0"),
        }
    }

    /// Kills the server hard (SIGKILL): a persistent one keeps what it synced.
    fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&self) {
        // The port may still be held for a moment; the service's URL names it: try again.
        for _ in 0..5 {
            if self.spawn() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("could not restart redis-server on port {}", self.port);
    }

    fn freeze(&self) {
        kill("STOP", &self.pid());
    }

    fn thaw(&self) {
        kill("CONT", &self.pid());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
