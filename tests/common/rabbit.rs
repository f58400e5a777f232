//! A `rabbitmq-server` a test binary starts, on free loopback ports, with its data in a
//! temporary directory. It takes about 5 s to start, so one serves every test of a binary
//! ([`Rabbit::get`]), each on its own queues; a test that stops it has its own
//! ([`Rabbit::own`]). It runs under a watchdog shell that kills its whole process group
//! and removes its directory when the test binary exits (the shell's standard input closes),
//! however the binary ends.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use mayhem::{AmqpConfig, AmqpSource, PubSubMessage, Publish, Source};

use super::{free_port, kill, skip, BrokerServer, PATIENCE};

/// `rabbitmqctl`, next to the server script.
pub const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// The server script of Debian's package (the copy under /usr/sbin insists on a service
/// user).
pub const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// A `rabbitmq-server` of this test binary.
pub struct Rabbit {
    /// The AMQP port.
    pub port: u16,
    /// The Erlang distribution port: a new one at each restart, since once the node let go
    /// of the last one, any client's outgoing connection may take it as its local port
    /// (seen: a restart that failed to bind it, `BOOT FAILED`).
    dist: AtomicU16,
    /// The node's data, logs and settings.
    dir: PathBuf,
    /// How many times it was started (each start logs to its own file).
    starts: AtomicU32,
    /// Standard input of the watchdog shell: it kills the server when this closes (on
    /// [`Rabbit::kill`], or when the test binary exits), then removes the directory unless
    /// the server is to be started again.
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
    /// The TLS listener of the shared server (built with `amqp-tls`), or why there is none.
    pub tls: Result<Tls, String>,
}

/// A TLS listener whose certificate a CA of the test signed.
#[derive(Debug)]
pub struct Tls {
    /// The AMQPS port.
    pub port: u16,
    /// The CA certificate (PEM) to trust.
    pub ca: PathBuf,
}

/// Makes a CA and a server certificate for 127.0.0.1 signed by it, with `openssl`, in
/// `dir`; returns the CA file, the certificate and the key.
fn make_certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    std::fs::create_dir_all(dir).map_err(|error| format!("create {}: {error}", dir.display()))?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|error| format!("write server.ext: {error}"))?;
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=mayhem test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    ];
    for args in steps {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("openssl not found ({error}): apt-get install openssl"))?;
        if !output.status.success() {
            return Err(format!(
                "openssl {} failed: {}",
                args[0],
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    Ok((
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    ))
}

impl Rabbit {
    /// Whether `rabbitmq-server` is installed; says so loudly (see [`skip`]) when it is not.
    pub fn installed() -> bool {
        let found = Path::new(SERVER).exists();
        if !found {
            skip(&format!(
                "{SERVER} not found (apt-get install rabbitmq-server)"
            ));
        }
        found
    }

    /// The shared server, started by the first test that asks (with a TLS listener when
    /// built with `amqp-tls`); `None` (said loudly by every test that asks) when
    /// `rabbitmq-server` is not installed.
    pub fn get() -> Option<&'static Rabbit> {
        static SERVER_CELL: OnceLock<Option<Rabbit>> = OnceLock::new();
        if !Rabbit::installed() {
            return None;
        }
        SERVER_CELL
            .get_or_init(|| Some(Rabbit::new("shared", cfg!(feature = "amqp-tls"))))
            .as_ref()
    }

    /// A server of its own (for a test that stops it), or `None` (said loudly).
    pub fn own(tag: &str) -> Option<Rabbit> {
        Rabbit::installed().then(|| Rabbit::new(tag, false))
    }

    /// A server on free ports; with `tls` also a TLS listener (when `openssl` can make
    /// its certificates).
    fn new(tag: &str, tls: bool) -> Rabbit {
        let dir =
            std::env::temp_dir().join(format!("mayhem-rabbitmq-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write the plugins file");
        let tls = if tls {
            make_certificates(&dir.join("tls")).map(|(ca, certificate, key)| {
                let port = free_port();
                let settings = format!(
                    "listeners.ssl.default = 127.0.0.1:{port}\n\
                     ssl_options.cacertfile = {}\n\
                     ssl_options.certfile = {}\n\
                     ssl_options.keyfile = {}\n\
                     ssl_options.verify = verify_none\n\
                     ssl_options.fail_if_no_peer_cert = false\n",
                    ca.display(),
                    certificate.display(),
                    key.display()
                );
                std::fs::write(dir.join("rabbitmq.conf"), settings)
                    .expect("write the server's settings");
                Tls { port, ca }
            })
        } else {
            Err("the server of this test has no TLS listener".to_owned())
        };
        let server = Rabbit {
            port: free_port(),
            dist: AtomicU16::new(free_port()),
            dir,
            starts: AtomicU32::new(0),
            watchdog: Mutex::new(None),
            tls,
        };
        server.spawn();
        server
    }

    /// Starts the server and waits until it accepts AMQP connections.
    fn spawn(&self) {
        let dir = &self.dir;
        let log = dir.join(format!(
            "server-{}.log",
            self.starts.fetch_add(1, Ordering::SeqCst)
        ));
        let node = self.node();
        // `setsid` runs the server in a session and process group of its own, which
        // `kill -KILL -$!` ends whole (the script, the Erlang VM and its helpers; epmd, the
        // Erlang port mapper, detaches and stays, as for every Erlang node) once standard
        // input closes. The directory is removed unless `keep` exists (a restart is coming).
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                "setsid \"$0\" >\"$1\" 2>&1 </dev/null & echo $! >\"$2/group\"; \
                 cat >/dev/null; kill -KILL -$!; sleep 0.2; \
                 [ -e \"$2/keep\" ] || rm -rf \"$2\"",
            )
            .arg(SERVER)
            .arg(&log)
            .arg(dir)
            .env("HOME", dir)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env(
                "RABBITMQ_DIST_PORT",
                self.dist.load(Ordering::SeqCst).to_string(),
            )
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            // A node that fails to boot writes its crash dump here, not into the checkout.
            .env("ERL_CRASH_DUMP", dir.join("erl_crash.dump"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rabbitmq-server");
        let stdin = watchdog.stdin.take().expect("piped stdin");
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Server startup complete")
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.tls.as_ref().map_or(true, |tls| {
                    TcpStream::connect(("127.0.0.1", tls.port)).is_ok()
                })
            {
                break;
            }
            if matches!(watchdog.try_wait(), Ok(Some(_))) || Instant::now() > end {
                panic!("rabbitmq-server did not start:\n{text}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        *self.watchdog.lock().unwrap() = Some((watchdog, stdin));
    }

    /// The process group of the server (`-PGID`).
    fn group(&self) -> String {
        let group = std::fs::read_to_string(self.dir.join("group")).expect("the server's group");
        format!("-{}", group.trim())
    }

    /// Stops the server the way a service manager does (SIGTERM to its process group: the
    /// script stops the node cleanly) and keeps its data for [`Rabbit::spawn`]. (A
    /// SIGKILL is no restart test on a single 3.10 node: its quorum queues' registry is left
    /// unsynced and they stay without a leader after the restart.)
    fn stop_cleanly(&self) {
        std::fs::write(self.dir.join("keep"), "").expect("mark the directory kept");
        let group = self.group();
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let end = Instant::now() + PATIENCE;
        while Command::new("kill")
            .args(["-0", "--", &group])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
        {
            assert!(Instant::now() < end, "rabbitmq-server did not stop");
            thread::sleep(Duration::from_millis(50));
        }
        if let Some((mut watchdog, stdin)) = self.watchdog.lock().unwrap().take() {
            drop(stdin);
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("keep"));
    }

    /// The Erlang node name of the server.
    pub fn node(&self) -> String {
        let name = self
            .dir
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("mayhem-rabbitmq");
        format!("{name}@localhost")
    }

    /// Runs `rabbitmqctl` on the server (the copy next to the server script: the one under
    /// /usr/sbin insists on a service user).
    pub fn ctl(&self, args: &[&str]) {
        let output = Command::new(CTL)
            .arg("-n")
            .arg(self.node())
            .args(args)
            .env("HOME", &self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run rabbitmqctl");
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A queue name no other test uses.
    pub fn queue(&self, prefix: &str) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::SeqCst))
    }

    /// A source on `queue`.
    pub fn source(&self, queue: &str, ack_deadline: Duration, max_attempts: u32) -> AmqpSource {
        AmqpSource::connect(AmqpConfig {
            ack_deadline,
            max_attempts,
            ..config(&self.url(), queue)
        })
        .expect("connect")
    }

    /// Caps `queue` at `max_length` messages under `x-overflow: reject-publish` (a policy):
    /// the broker nacks what is published to it while it is full.
    pub fn cap(&self, queue: &str, max_length: usize) {
        let definition = format!(r#"{{"max-length":{max_length},"overflow":"reject-publish"}}"#);
        let (name, pattern) = (format!("cap-{queue}"), format!("^{queue}$"));
        self.ctl(&[
            "set_policy",
            &name,
            &pattern,
            &definition,
            "--apply-to",
            "queues",
        ]);
    }

    /// Runs `work` on a channel of a plain lapin connection (another AMQP client, no
    /// mayhem), then closes the connection.
    pub fn with_lapin<F: std::future::Future<Output = ()>>(
        &self,
        work: impl FnOnce(lapin::Channel) -> F,
    ) {
        smol::block_on(async {
            let connection = lapin::Connection::connect(&self.url(), Default::default())
                .await
                .expect("connect");
            let channel = connection.create_channel().await.expect("a channel");
            // The channel is kept open until the connection closes (its last handle dropped
            // closes it, and a connection closing with a channel closing fails).
            work(channel.clone()).await;
            connection.close(200, "done".into()).await.expect("close");
        });
    }

    /// Publishes `messages` to `queue` as another AMQP client would (lapin, no mayhem), each
    /// confirmed by the broker before the connection closes. In confirm mode a publish's
    /// confirm says the broker has the message; without it the confirm resolves at once, and
    /// the close could overtake the last message (a CI run once pulled 1 of 2).
    pub fn publish_with_lapin<'a>(
        &self,
        queue: &str,
        messages: impl IntoIterator<Item = (&'a [u8], lapin::BasicProperties)>,
    ) {
        self.with_lapin(|channel| async move {
            channel
                .confirm_select(Default::default())
                .await
                .expect("confirm mode");
            for (body, properties) in messages {
                let confirmation = channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        Default::default(),
                        body,
                        properties,
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("the broker takes it");
                assert!(confirmation.is_ack(), "{confirmation:?}");
            }
        });
    }

    /// Publishes `count` messages named `cattle-0000`, `cattle-0001`, ... to `queue`.
    /// (`max_attempts` must be the queue's, as the service declared it.)
    pub fn publish_names(&self, queue: &str, count: usize, max_attempts: u32) -> Vec<String> {
        let source = self.source(queue, Duration::from_secs(60), max_attempts);
        let names: Vec<String> = (0..count).map(|i| format!("cattle-{i:04}")).collect();
        let batch: Vec<PubSubMessage> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let id = mayhem::Uuid::from_u128(i as u128 + 1);
                PubSubMessage::new(name.to_string()).with_id(id)
            })
            .collect();
        source.publish(&batch).expect("publish");
        assert_eq!(source.wait_confirmed(Duration::from_secs(10)), 0);
        names
    }

    /// Polls until `queue` holds nothing, ready or leased.
    pub fn wait_until_empty(&self, queue: &str, max_attempts: u32) {
        let probe = self.source(queue, Duration::from_secs(60), max_attempts);
        Source::interrupt(&probe);
        let end = Instant::now() + PATIENCE;
        while probe.stats().remaining > 0 {
            assert!(Instant::now() < end, "the queue never drained");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A source's settings for `queue` on `url` (the server's, or a proxy's in front of it),
/// giving up after 10 s without the broker.
pub fn config(url: &str, queue: &str) -> AmqpConfig {
    AmqpConfig {
        url: url.to_owned(),
        queue: queue.to_owned(),
        reconnect_limit: Duration::from_secs(10),
        ..AmqpConfig::default()
    }
}

impl BrokerServer for Rabbit {
    fn port(&self) -> u16 {
        self.port
    }

    fn url_on(&self, port: u16) -> String {
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    }

    fn stop(&self) {
        self.stop_cleanly();
    }

    fn restart(&self) {
        self.dist.store(free_port(), Ordering::SeqCst);
        self.spawn();
    }

    fn freeze(&self) {
        kill("STOP", &self.group());
    }

    fn thaw(&self) {
        kill("CONT", &self.group());
    }
}
