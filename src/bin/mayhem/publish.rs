//! `mayhem publish`: publishes messages to a broker from a shell and prints their ids once
//! the broker confirmed them, so that an operator can restart a host without a script.
//!
//! Each DATA argument is one message; without any, each line of standard input is one (its
//! `\n` or `\r\n` removed, a last line without one included, empty lines skipped). Every
//! message gets a random UUID v4 id, the same attributes (`--attribute KEY=VALUE`) and
//! ordering key. Exit codes: 0 when every message was confirmed, 1 on a broker error (or
//! unreadable standard input), 2 on bad input (nothing is sent for bad flags or a bad DATA;
//! on standard input, the lines before a bad one are published), 130 after a signal.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::LevelFilter;
use mayhem::message::MAX_DATA_BYTES;
use mayhem::{
    Attributes, LeaseConfig, MessageError, PubSubMessage, Publish, Shutdown, ShutdownReason,
    SourceError,
};

use crate::cli::{self, LogLevel, SourceKind};
use crate::{logger, usage_error, EXIT_USAGE};

/// What `mayhem publish --help` shows after the flags.
const AFTER_HELP: &str = "\
Each DATA is one message; without DATA, each line of standard input is one (the line end
removed; empty lines are skipped). Every message gets a random UUID v4 id, printed on stdout,
one per line, once the broker confirmed the message.

Exit codes: 0 every message confirmed, 1 a broker error (unreachable past --reconnect-limit,
refused), 2 bad input (a flag, KEY=VALUE, a message over Pub/Sub's limits, a reserved
attribute key, --source memory), 130 interrupted by a signal.";

/// Most messages in one batch read from standard input.
const BATCH_MESSAGES: usize = 1000;
/// Most bytes of data in one batch read from standard input (a larger message goes alone).
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// How long confirms may take beyond `--reconnect-limit` (a broker that answers but is slow
/// to confirm, a reconnection that sends a batch again).
const CONFIRM_MARGIN: Duration = Duration::from_secs(10);
/// Exit code after a signal, as shells report death by SIGINT.
const EXIT_INTERRUPTED: u8 = 130;

/// `mayhem publish`: publishes messages and prints their ids.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub(crate) struct PublishArgs {
    /// Where to publish: redis://HOST:PORT/DB, amqp://USER:PASS@HOST:PORT/VHOST (RabbitMQ,
    /// feature amqp; amqps://, feature amqp-tls) or pubsub://PROJECT/SUBSCRIPTION (Google
    /// Cloud Pub/Sub, feature pubsub: its topic; PUBSUB_EMULATOR_HOST selects the emulator).
    /// memory is refused: the embedded pub/sub lives inside one running service.
    #[arg(long, env = "MAYHEM_SOURCE", value_name = "SOURCE", default_value = "memory", value_parser = cli::SourceParser)]
    source: SourceKind,
    /// Redis stream, or RabbitMQ quorum queue, to publish to (Pub/Sub: unused, the URL names
    /// the subscription).
    #[arg(long, env = "MAYHEM_STREAM", value_name = "NAME", default_value = "mayhem", value_parser = cli::name)]
    stream: String,
    /// Sets attribute KEY to VALUE on every message; repeat it for more attributes.
    #[arg(long = "attribute", value_name = "KEY=VALUE")]
    attributes: Vec<String>,
    /// Ordering key of every message.
    #[arg(long, value_name = "KEY")]
    ordering_key: Option<String>,
    /// How long the broker may stay unreachable (or keep failing) before publish gives up
    /// and exits 1.
    #[arg(long, env = "MAYHEM_RECONNECT_LIMIT", value_name = "DUR", default_value = "30s", value_parser = cli::duration, allow_hyphen_values = true)]
    reconnect_limit: Duration,
    /// RabbitMQ: deliveries before dead-lettering, 1 to 1000; the queue is declared with it
    /// when it does not exist, so give the service's value.
    #[arg(
        long,
        env = "MAYHEM_MAX_ATTEMPTS",
        value_name = "N",
        default_value_t = LeaseConfig::default().max_attempts,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    max_attempts: u32,
    /// PEM file of CA certificates to trust for an amqps:// source, besides the system's.
    #[cfg(feature = "amqp")]
    #[arg(long, env = "MAYHEM_AMQP_CA_FILE", value_name = "PATH", value_parser = cli::ca_file)]
    amqp_ca_file: Option<std::path::PathBuf>,
    /// Most verbose log level written to stderr (warn shows the connection retries).
    #[arg(long, value_name = "LEVEL", value_enum, ignore_case = true, default_value_t = LogLevel::Error)]
    log_level: LogLevel,
    /// The messages' data, one message each [default: one message per line of stdin].
    #[arg(value_name = "DATA")]
    data: Vec<String>,
}

/// `mayhem publish` parsed on its own, so that the service's flags and variables play no
/// part (`mayhem --help` lists it through [`crate::cli::Command`]).
#[derive(Debug, clap::Parser)]
#[command(
    name = "mayhem publish",
    bin_name = "mayhem publish",
    about = "Publish messages to a broker (Redis, RabbitMQ or Google Cloud Pub/Sub) and print their ids once confirmed",
    long_about = None,
    max_term_width = 100
)]
struct PublishCli {
    /// The flags and DATA.
    #[command(flatten)]
    args: PublishArgs,
}

/// Why publishing stopped.
enum Stop {
    /// Bad input: one line, exit 2.
    Usage(String),
    /// The broker failed (or standard input could not be read): one line, exit 1.
    Broker(String),
    /// A signal: exit 130.
    Interrupted,
}

/// Checks a message as the broker's `publish` would, before anything is sent.
type Check = fn(&PubSubMessage) -> Result<(), MessageError>;

/// `mayhem publish ...`: parses its arguments (the first is `publish`), then [`run`].
pub(crate) fn main(shutdown: &Shutdown) -> ExitCode {
    let command = <PublishCli as clap::CommandFactory>::command();
    let args = || std::env::args_os().skip(1);
    if let Err(error) = cli::check_utf8_for(&command, args(), |name| std::env::var_os(name)) {
        usage_error(&format!("error: {error}"));
        return ExitCode::from(EXIT_USAGE);
    }
    match <PublishCli as clap::Parser>::try_parse_from(args()) {
        Ok(parsed) => run(&parsed.args, shutdown),
        Err(error) => {
            // Clap's whole message; help goes to stdout with exit 0.
            let _ = error.print();
            if error.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

/// Runs `mayhem publish`: checks the input, connects, publishes, prints the ids.
pub(crate) fn run(args: &PublishArgs, shutdown: &Shutdown) -> ExitCode {
    let code = match publish(args, shutdown) {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Stop::Usage(line)) => {
            usage_error(&format!("error: {line}"));
            EXIT_USAGE
        }
        Err(Stop::Broker(line)) => {
            // The log's lines (retries, at warn) come first.
            logger::flush(Duration::from_millis(500), Duration::from_secs(2));
            usage_error(&format!("error: {line}"));
            1
        }
        Err(Stop::Interrupted) => {
            logger::flush(Duration::from_millis(500), Duration::from_secs(2));
            let name = match shutdown.reason() {
                Some(ShutdownReason::Signal(name)) => name,
                _ => "a signal".to_owned(),
            };
            usage_error(&format!(
                "error: interrupted by {name}: the messages whose ids were printed were \
                 confirmed, the others may or may not have been published"
            ));
            EXIT_INTERRUPTED
        }
    };
    ExitCode::from(code)
}

/// The whole subcommand, up to the first stop.
fn publish(args: &PublishArgs, shutdown: &Shutdown) -> Result<(), Stop> {
    let check = check_for(&args.source)?;
    #[cfg(feature = "amqp")]
    if let SourceKind::Amqp(_) = &args.source {
        cli::check_queue(&args.stream).map_err(Stop::Usage)?;
    }
    let template = template(args, check)?;
    // Every DATA is checked before anything is sent.
    let given = args
        .data
        .iter()
        .enumerate()
        .map(|(index, data)| {
            let message = with_data(&template, data.as_bytes().to_vec());
            check(&message).map(|()| message).map_err(|error| {
                Stop::Usage(format!(
                    "DATA {} of {} ('{}'): {error}",
                    index + 1,
                    args.data.len(),
                    shorten(data)
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let filter = logger::filter(level(args.log_level), None).map_err(Stop::Usage)?;
    logger::init(filter).map_err(Stop::Broker)?;
    let publisher = connect(args, shutdown)?;
    // A signal interrupts a publish blocked on the broker. The thread holds the publisher
    // weakly, so that it is dropped (its connections closed) when publishing is done.
    let weak = Arc::downgrade(&publisher);
    let watcher = shutdown.clone();
    let _ = thread::Builder::new()
        .name("mayhem-publish-signal".into())
        .spawn(move || {
            watcher.wait();
            if let Some(publisher) = weak.upgrade() {
                publisher.interrupt();
            }
        });
    let mut sender = Sender {
        publisher: &*publisher,
        confirm_timeout: args.reconnect_limit.saturating_add(CONFIRM_MARGIN),
        shutdown,
    };
    if args.data.is_empty() {
        // A buffer of our own, whose fill level says whether more input is waiting.
        let input = BufReader::with_capacity(64 * 1024, std::io::stdin());
        sender.lines(input, &template, check)
    } else {
        // Batches of at most BATCH_MESSAGES: each is confirmed and printed before the next.
        for batch in given.chunks(BATCH_MESSAGES) {
            sender.send(batch)?;
        }
        Ok(())
    }
}

/// The check of the broker of `--source`; `memory` is refused.
fn check_for(source: &SourceKind) -> Result<Check, Stop> {
    match source {
        SourceKind::Memory => Err(Stop::Usage(
            "mayhem publish needs a broker: --source memory is the embedded pub/sub of one \
             running service, which no other process reaches (give --source redis://..., \
             amqp://... or pubsub://...)"
                .to_owned(),
        )),
        #[cfg(feature = "redis")]
        SourceKind::Redis(_) => Ok(mayhem::source::redis::check_message),
        #[cfg(feature = "amqp")]
        SourceKind::Amqp(_) => Ok(mayhem::source::amqp::check_message),
        #[cfg(feature = "pubsub")]
        SourceKind::PubSub(_) => {
            cli::check_emulator_host().map_err(Stop::Usage)?;
            Ok(mayhem::source::pubsub::check_message)
        }
        #[allow(unreachable_patterns)]
        _ => Err(Stop::Usage(
            "this build does not support that --source".to_owned(),
        )),
    }
}

/// A message without data carrying the attributes and ordering key of the flags, checked.
fn template(args: &PublishArgs, check: Check) -> Result<PubSubMessage, Stop> {
    let mut attributes = Attributes::new();
    for pair in &args.attributes {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(Stop::Usage(format!(
                "invalid value '{}' for '--attribute': expected KEY=VALUE, like origin=ops",
                shorten(pair)
            )));
        };
        if attributes.get(key).is_some() {
            return Err(Stop::Usage(format!(
                "invalid value '{}' for '--attribute': attribute '{}' is given twice",
                shorten(pair),
                shorten(key)
            )));
        }
        attributes.insert(key, value);
    }
    let mut template = PubSubMessage::new(Vec::new()).with_attributes(attributes);
    if let Some(key) = &args.ordering_key {
        template = template.with_ordering_key(key.clone());
    }
    check(&template).map_err(|error| {
        let flag = match error {
            MessageError::OrderingKeyTooLong { .. } => "--ordering-key",
            _ => "--attribute",
        };
        Stop::Usage(format!("invalid '{flag}': {error}"))
    })?;
    Ok(template)
}

/// `template` with `data` and a new random (version 4) UUID id.
fn with_data(template: &PubSubMessage, data: Vec<u8>) -> PubSubMessage {
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    PubSubMessage::new(data)
        .with_attributes(template.attributes().clone())
        .with_ordering_key(template.ordering_key().unwrap_or_default())
        .with_id(id)
}

/// Connects to the broker of `--source`, retrying within `--reconnect-limit`.
fn connect(args: &PublishArgs, shutdown: &Shutdown) -> Result<Arc<dyn Publish>, Stop> {
    let connected: Result<Arc<dyn Publish>, SourceError> = match &args.source {
        #[cfg(feature = "redis")]
        SourceKind::Redis(url) => mayhem::RedisPublisher::connect_with(
            mayhem::RedisConfig {
                url: url.clone(),
                stream: args.stream.clone(),
                reconnect_limit: args.reconnect_limit,
                ..mayhem::RedisConfig::default()
            },
            shutdown,
        )
        .map(|publisher| Arc::new(publisher) as Arc<dyn Publish>),
        #[cfg(feature = "amqp")]
        SourceKind::Amqp(url) => mayhem::AmqpSource::connect_with(
            mayhem::AmqpConfig {
                url: url.clone(),
                queue: args.stream.clone(),
                max_attempts: args.max_attempts,
                reconnect_limit: args.reconnect_limit,
                ca_file: args.amqp_ca_file.clone(),
                // One message at a time from a shell: one connection keeps them in order.
                publish_connections: 1,
                ..mayhem::AmqpConfig::default()
            },
            shutdown,
        )
        .map(|source| Arc::new(source) as Arc<dyn Publish>),
        // Creates the subscription (and its topic) when missing, as the consuming service
        // does: Pub/Sub keeps a message only for the subscriptions that exist when it is
        // published.
        #[cfg(feature = "pubsub")]
        SourceKind::PubSub(url) => mayhem::PubSubSource::connect_with(
            mayhem::PubSubConfig {
                url: url.clone(),
                max_attempts: args.max_attempts,
                reconnect_limit: args.reconnect_limit,
                ..mayhem::PubSubConfig::default()
            },
            shutdown,
        )
        .map(|source| Arc::new(source) as Arc<dyn Publish>),
        // `check_for` refused every other source already.
        #[allow(unreachable_patterns)]
        _ => Err(SourceError::Backend(
            "this build does not support that --source".to_owned(),
        )),
    };
    connected.map_err(|error| stop(&error, shutdown))
}

/// The stop an error of the broker means.
fn stop(error: &SourceError, shutdown: &Shutdown) -> Stop {
    match error {
        _ if shutdown.is_triggered() => Stop::Interrupted,
        SourceError::Closed => Stop::Interrupted,
        SourceError::Message(error) => Stop::Usage(format!("message refused: {error}")),
        SourceError::Backend(text) | SourceError::Unavailable(text) => Stop::Broker(text.clone()),
        other => Stop::Broker(other.to_string()),
    }
}

/// Publishes batches and prints the ids of the confirmed ones.
struct Sender<'a> {
    /// The broker's client.
    publisher: &'a dyn Publish,
    /// How long the confirms of one batch may take.
    confirm_timeout: Duration,
    /// Triggered by a signal.
    shutdown: &'a Shutdown,
}

impl Sender<'_> {
    /// Publishes `batch`, waits for its confirms, then prints its ids.
    fn send(&mut self, batch: &[PubSubMessage]) -> Result<(), Stop> {
        if batch.is_empty() {
            return Ok(());
        }
        self.publisher
            .publish(batch)
            .map_err(|error| stop(&error, self.shutdown))?;
        let unconfirmed = self.publisher.wait_confirmed(self.confirm_timeout);
        if self.shutdown.is_triggered() {
            return Err(Stop::Interrupted);
        }
        if unconfirmed > 0 {
            return Err(Stop::Broker(format!(
                "the broker did not confirm {unconfirmed} of the last {} messages (waited up \
                 to {}; their ids are not printed, and they may still arrive; --log-level warn \
                 says why)",
                batch.len(),
                humantime::format_duration(self.confirm_timeout)
            )));
        }
        let mut text = String::with_capacity(batch.len() * 37);
        for message in batch {
            text.push_str(&message.id().to_string());
            text.push('\n');
        }
        // A closed stdout (`| head -1`) does not make the publish fail: the broker has them.
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
        Ok(())
    }

    /// Publishes one message per line of `input`, in batches: a batch goes out when it is
    /// full or when no more input is buffered, so that lines typed at a terminal are sent
    /// at once and a pipe is sent in batches.
    fn lines<R: Read>(
        &mut self,
        mut input: BufReader<R>,
        template: &PubSubMessage,
        check: Check,
    ) -> Result<(), Stop> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut number = 0u64;
        loop {
            let data = match read_line(&mut input, number + 1) {
                Ok(Some(data)) => data,
                Ok(None) => break,
                Err(stop) => {
                    // The lines before it are published; none after it.
                    self.send(&batch)?;
                    return Err(stop);
                }
            };
            number += 1;
            if !data.is_empty() {
                let message = with_data(template, data);
                if let Err(error) = check(&message) {
                    // The lines before it are published; none after it.
                    self.send(&batch)?;
                    return Err(Stop::Usage(format!(
                        "line {number} of standard input: {error}"
                    )));
                }
                bytes += message.data().len();
                batch.push(message);
            }
            if batch.len() >= BATCH_MESSAGES || bytes >= BATCH_BYTES || input.buffer().is_empty() {
                self.send(&batch)?;
                batch.clear();
                bytes = 0;
            }
        }
        self.send(&batch)
    }
}

/// Reads one line, without its `\n` or `\r\n`; `None` at the end of the input. A line over
/// Pub/Sub's data limit is refused without reading the rest of it.
fn read_line<R: Read>(input: &mut BufReader<R>, number: u64) -> Result<Option<Vec<u8>>, Stop> {
    let mut line = Vec::new();
    // One byte past the limit (plus the line end) tells a line that is too long.
    let limit = MAX_DATA_BYTES as u64 + 3;
    let read = input
        .by_ref()
        .take(limit)
        .read_until(b'\n', &mut line)
        .map_err(|error| Stop::Broker(format!("cannot read standard input: {error}")))?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    if line.len() > MAX_DATA_BYTES {
        return Err(Stop::Usage(format!(
            "line {number} of standard input: data over the limit of {MAX_DATA_BYTES} bytes"
        )));
    }
    Ok(Some(line))
}

/// The first 40 characters of `text`, marked when cut: a value in an error line.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// The log filter of `--log-level`.
fn level(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Off => LevelFilter::Off,
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warn => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
        LogLevel::Trace => LevelFilter::Trace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_lose_their_line_ends_and_a_last_line_without_one_counts() {
        let mut input = BufReader::new(&b"web-01\nweb-02\r\n\nweb-03"[..]);
        let mut lines = Vec::new();
        while let Some(line) = read_line(&mut input, 1).ok().flatten() {
            lines.push(String::from_utf8(line).expect("utf-8"));
        }
        assert_eq!(lines, ["web-01", "web-02", "", "web-03"]);
    }

    #[test]
    fn a_line_over_the_data_limit_is_refused_without_reading_it_all() {
        let long = vec![b'x'; MAX_DATA_BYTES + 10];
        let mut input = BufReader::new(&long[..]);
        let Err(Stop::Usage(line)) = read_line(&mut input, 7) else {
            panic!("a long line is refused");
        };
        assert!(
            line.starts_with("line 7 of standard input: data over the limit"),
            "{line}"
        );
        let longest = vec![b'x'; MAX_DATA_BYTES];
        let mut input = BufReader::new(&longest[..]);
        assert_eq!(
            read_line(&mut input, 1)
                .ok()
                .flatten()
                .map(|line| line.len()),
            Some(MAX_DATA_BYTES)
        );
    }

    #[test]
    fn ids_are_random_uuid_v4() {
        let template = PubSubMessage::new(Vec::new());
        let a = with_data(&template, b"web-01".to_vec());
        let b = with_data(&template, b"web-01".to_vec());
        let uuid = a.id().as_uuid().expect("a uuid");
        assert_eq!(uuid.get_version_num(), 4);
        assert_ne!(a.id(), b.id());
    }
}
