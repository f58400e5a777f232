//! The `mayhem` binary: install the signal handlers, parse the command line, install the logger,
//! run the service on the embedded in-memory pub/sub (or a Redis stream, or a RabbitMQ queue),
//! print the report; or, with `publish`, publish messages to a broker (see `publish.rs`).
//!
//! Exit codes: 0 after a graceful shutdown (a signal during start-up included), 1 when a
//! handler panicked or the source failed for good (the service still shut down gracefully)
//! or when the shutdown did not finish within --grace-period + 5 s (a handler blocking its
//! thread), 2 for bad flags or environment variables, 130 when a second signal forced the
//! exit.

mod cli;
mod http;
mod logger;
mod publish;

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use clap::Parser;
use log::{debug, error, info, warn};
use mayhem::{
    layer, Broker, MayhemHandler, Metrics, Pause, Publish, Runner, Shutdown, ShutdownReason,
    Source, Subscription,
};
use signal_hook::consts::{SIGCONT, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTSTP, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use crate::cli::{Cli, ReportFormat, SourceKind};

/// Exit code of bad input.
const EXIT_USAGE: u8 = 2;
/// Exit code of a forced exit (second signal), as shells report death by SIGINT.
const EXIT_FORCED: i32 = 130;
/// The signals that start the graceful shutdown (a second one forces the exit).
const HANDLED: [i32; 4] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT];
/// Signals that mean nothing to the service and are logged and ignored. Their default action
/// ends the process at once, without the shutdown: no lease given back, no report. A stray
/// one (a log rotation's `kill -USR1` aimed at another program) must not do that.
const IGNORED: [i32; 2] = [SIGUSR1, SIGUSR2];
/// The signals of quiet mode: SIGTSTP stops pulling and publishing (held messages are still
/// handled and settled, the process stays up), SIGCONT resumes. Handled, SIGTSTP no longer
/// stops the process: Ctrl-Z on a terminal makes the service quiet instead of suspending it.
const QUIET: [i32; 2] = [SIGTSTP, SIGCONT];
/// How often quiet mode looks whether every held message is settled, to say so once.
const DRAIN_CHECK: Duration = Duration::from_millis(10);
/// The least time between two lines about ignored signals (a flood of them is no log storm).
const IGNORED_LOG_EVERY: Duration = Duration::from_secs(1);
/// On a forced exit, how long the source may take to give its leases back.
const FORCED_NACK_WAIT: Duration = Duration::from_secs(1);
/// Exit code when the shutdown did not finish in time (a handler blocking its thread).
const EXIT_STUCK: i32 = 1;
/// Past the grace period, how long a shutdown may still take before the watchdog forces the
/// exit. The graceful path needs at most 1 s to cancel handlers and 1 s to send the last
/// lease operations; the rest is margin.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

/// The connected source, shared between `main` and the signal thread.
type SourceSlot = Arc<Mutex<Option<Arc<dyn Broker>>>>;

/// What the start-up waits for: the source connected, or a signal.
enum Startup {
    /// The connect thread finished.
    #[cfg_attr(
        not(any(feature = "redis", feature = "amqp", feature = "pubsub")),
        allow(dead_code)
    )]
    Connected(Result<Arc<dyn Broker>, String>),
    /// The first signal arrived.
    Signal,
}

fn main() -> ExitCode {
    // The very first statement: from here on every handled signal takes the graceful path,
    // during start-up too. (Before `main`, the loader and the Rust runtime run with the
    // default actions; no program can close that window, about a millisecond after exec.)
    let signals = match Signals::new(HANDLED.iter().chain(&IGNORED).chain(&QUIET)) {
        Ok(signals) => signals,
        Err(error) => {
            usage_error(&format!("error: cannot install signal handlers: {error}"));
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = unblock_signals() {
        usage_error(&format!(
            "error: cannot unblock the handled signals: {error}"
        ));
        return ExitCode::FAILURE;
    }
    let shutdown = Shutdown::new();
    // Quiet mode (the signal thread sets it) and the readiness the endpoint reports.
    let pause = Pause::new();
    // Created before the signal thread, which reads the leases held while quiet.
    let metrics = Arc::new(Metrics::default());
    // The source, once connected and until the run is over, for the forced exit's nacks.
    // Taken out again after the run, so that the source is dropped (a Redis source then
    // frees its consumer name) before the process exits.
    let source_slot: SourceSlot = Arc::new(Mutex::new(None));
    // An mpsc channel because the connect thread and the signal thread both report to the
    // start-up, which waits for whichever comes first; sends never block.
    let (startup, startup_events) = mpsc::channel();
    if let Err(error) = spawn_signal_thread(
        signals,
        shutdown.clone(),
        Quiet {
            pause: pause.clone(),
            metrics: Arc::clone(&metrics),
            generation: Arc::default(),
        },
        Arc::clone(&source_slot),
        startup.clone(),
    ) {
        usage_error(&format!("error: cannot start the signal thread: {error}"));
        return ExitCode::FAILURE;
    }
    let code = run(
        shutdown,
        Quiet {
            pause,
            metrics,
            generation: Arc::default(),
        },
        &source_slot,
        startup,
        startup_events,
    );
    // Lines still queued are written unless stderr takes nothing for half a second.
    logger::flush(Duration::from_millis(500), Duration::from_secs(5));
    code
}

/// Everything after the signal handlers: parse, start, run, report.
fn run(
    shutdown: Shutdown,
    quiet: Quiet,
    source_slot: &SourceSlot,
    startup: Sender<Startup>,
    startup_events: Receiver<Startup>,
) -> ExitCode {
    // `mayhem publish ...` is parsed on its own: the service's variables (MAYHEM_WORKERS, ...)
    // are not even read.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == "publish")
    {
        return publish::main(&shutdown);
    }
    // Clap refuses a value that is not UTF-8 without naming its flag or variable.
    if let Err(error) = cli::check_utf8(std::env::args_os(), |name| std::env::var_os(name)) {
        usage_error(&format!("error: {error}"));
        return ExitCode::from(EXIT_USAGE);
    }
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // The whole of clap's message: the bad value, suggestions ("a similar argument
            // exists"), possible values and usage. Help and version go to stdout, exit 0.
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Some(cli::Command::Publish(args)) = cli.command.take() {
        return publish::run(&args, &shutdown);
    }
    let config = cli.config();
    if let Err(error) = config.validate() {
        usage_error(&format!("error: {error}"));
        return ExitCode::from(EXIT_USAGE);
    }
    let layers = cli.layers();
    if let Err(error) = layers.validate() {
        usage_error(&format!("error: {error}"));
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(error) = cli.check() {
        usage_error(&format!("error: {error}"));
        return ExitCode::from(EXIT_USAGE);
    }
    let filter = match logger::filter(cli.log_level(), cli.log_filter.as_deref()) {
        Ok(filter) => filter,
        Err(error) => {
            usage_error(&format!("error: {error}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(error) = logger::init(filter) {
        usage_error(&format!("error: {error}"));
        return ExitCode::FAILURE;
    }
    install_panic_hook();

    let Quiet { pause, metrics, .. } = quiet;
    let seed = config.run.seed.unwrap_or_default();
    debug!("Using seed {seed}");
    let source: Arc<dyn Broker> = match &cli.source {
        SourceKind::Memory => Arc::new(Subscription::new(config.subscription())),
        #[cfg(feature = "redis")]
        SourceKind::Redis(url) => {
            let redis_config = cli.redis_config(url, &config);
            match connect_in_background(&shutdown, startup, &startup_events, move |stop| {
                mayhem::RedisSource::connect_with(redis_config, stop)
                    .map(|source| Arc::new(source) as Arc<dyn Broker>)
            }) {
                Ok(source) => source,
                Err(code) => return code,
            }
        }
        #[cfg(not(feature = "redis"))]
        SourceKind::Redis(_) => {
            let _ = (&startup, &startup_events);
            error!("this build has no redis support");
            return ExitCode::FAILURE;
        }
        #[cfg(feature = "amqp")]
        SourceKind::Amqp(url) => {
            let amqp_config = cli.amqp_config(url, &config);
            match connect_in_background(&shutdown, startup, &startup_events, move |stop| {
                mayhem::AmqpSource::connect_with(amqp_config, stop)
                    .map(|source| Arc::new(source) as Arc<dyn Broker>)
            }) {
                Ok(source) => source,
                Err(code) => return code,
            }
        }
        #[cfg(not(feature = "amqp"))]
        SourceKind::Amqp(_) => {
            let _ = (&startup, &startup_events);
            error!("this build has no amqp support");
            return ExitCode::FAILURE;
        }
        #[cfg(feature = "pubsub")]
        SourceKind::PubSub(url) => {
            let pubsub_config = cli.pubsub_config(url, &config);
            match connect_in_background(&shutdown, startup, &startup_events, move |stop| {
                mayhem::PubSubSource::connect_with(pubsub_config, stop)
                    .map(|source| Arc::new(source) as Arc<dyn Broker>)
            }) {
                Ok(source) => source,
                Err(code) => return code,
            }
        }
        #[cfg(not(feature = "pubsub"))]
        SourceKind::PubSub(_) => {
            let _ = (&startup, &startup_events);
            error!("this build has no pubsub support");
            return ExitCode::FAILURE;
        }
    };
    drop(startup_events);
    *source_slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&source));
    let handler = layer::stack(
        MayhemHandler::new(cli.handler(&config, seed)),
        &layers,
        &pause,
    );

    let endpoint = match cli.metrics_addr {
        Some(addr) => {
            // The endpoint's snapshot thread holds the source weakly, so that it never keeps
            // the source (and its connections) alive past `main`.
            let weak = Arc::downgrade(&source);
            let stats = move || weak.upgrade().map(|source| source.stats());
            match http::Endpoint::start(
                addr,
                metrics.clone(),
                stats,
                shutdown.clone(),
                pause.clone(),
            ) {
                Ok(endpoint) => Some(endpoint),
                Err(error) => {
                    error!("{error}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };

    spawn_watchdog(
        shutdown.clone(),
        config.run.grace_period.saturating_add(SHUTDOWN_MARGIN),
        Arc::clone(source_slot),
    );
    // The one client both consumes and publishes.
    let (consuming, publishing): (&dyn Source, &dyn Publish) = (&*source, &*source);
    let result = Runner::new(&config)
        .metrics(&metrics)
        .publisher(publishing)
        .pause(&pause)
        .run(consuming, &handler, &shutdown);
    // The layers print what their aggregated warnings still counted before the report.
    drop(handler);
    if let Some(endpoint) = endpoint {
        endpoint.stop();
    }
    // The last references: dropping the source ends its connections and threads (bounded;
    // a Redis source removes its consumer from the group and frees its name).
    source_slot
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    drop(source);
    let report = match result {
        Ok(report) => report,
        Err(error) => {
            error!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let text = match cli.report {
        ReportFormat::Text => format!("{report}\n"),
        ReportFormat::Json => format!("{}\n", report.to_json()),
    };
    // The shutdown lines first, so that on a terminal the report comes after them.
    logger::flush(Duration::from_millis(500), Duration::from_secs(5));
    // A closed stdout (`mayhem | head -c1`) must not turn a clean shutdown into a failure.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    // The invariant holds per subscription: with a shared Redis stream, other instances
    // publish and ack too, so it is checked for the embedded pub/sub only.
    if cli.source == SourceKind::Memory && !report.is_balanced() {
        error!("accounting invariant broken: {}", report.to_json());
        return ExitCode::FAILURE;
    }
    if let Some(ShutdownReason::Failed(text)) = shutdown.reason() {
        error!("{text}");
        return ExitCode::FAILURE;
    }
    if report.panicked > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Connects a remote source on its own thread, so that a signal ends the start-up at once
/// (connecting may take long: a stalled server, retries within --reconnect-limit); returns
/// the source, or the exit code when a signal or a failure ended the start-up. An abandoned
/// connect thread ends with the process.
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
fn connect_in_background(
    shutdown: &Shutdown,
    startup: Sender<Startup>,
    startup_events: &Receiver<Startup>,
    connect: impl FnOnce(&Shutdown) -> Result<Arc<dyn Broker>, mayhem::SourceError> + Send + 'static,
) -> Result<Arc<dyn Broker>, ExitCode> {
    let connecting = shutdown.clone();
    if !shutdown.is_triggered() {
        let spawned = thread::Builder::new()
            .name("mayhem-connect".into())
            .spawn(move || {
                // The shutdown a signal triggers ends the retries.
                let connected = connect(&connecting).map_err(|error| error.to_string());
                let _ = startup.send(Startup::Connected(connected));
            });
        if let Err(error) = spawned {
            error!("cannot start the connect thread: {error}");
            return Err(ExitCode::FAILURE);
        }
    }
    match startup_events.recv() {
        Ok(Startup::Connected(Ok(source))) => Ok(source),
        // The connect gives up with `Closed` when the signal's shutdown ends its retries,
        // which may come before the signal thread's own message.
        Ok(Startup::Connected(Err(_))) if shutdown.is_triggered() => {
            Err(interrupted_start(shutdown))
        }
        Ok(Startup::Connected(Err(error))) => {
            error!("{error}");
            Err(ExitCode::FAILURE)
        }
        // The signal thread holds a sender for the whole run, so the channel cannot close
        // first; either way the shutdown was triggered.
        Ok(Startup::Signal) | Err(_) => Err(interrupted_start(shutdown)),
    }
}

/// A signal arrived before the source was connected: nothing was pulled, so nothing needs
/// to be given back. Logs the signal and exits 0, without a report.
#[cfg_attr(
    not(any(feature = "redis", feature = "amqp", feature = "pubsub")),
    allow(dead_code)
)]
fn interrupted_start(shutdown: &Shutdown) -> ExitCode {
    let name = match shutdown.reason() {
        Some(ShutdownReason::Signal(name)) => name,
        _ => "a signal".to_owned(),
    };
    info!("Received exit signal {name}...");
    info!("Start-up interrupted before the source was connected: nothing to give back");
    info!("Successfully shutdown the Mayhem service.");
    ExitCode::SUCCESS
}

/// Unblocks the handled signals in case the parent left them blocked (signal masks survive
/// `exec`): handled signals must not sit pending forever. Called once the handlers are
/// installed, so a signal that arrived while blocked is delivered now, to the handler. A
/// supervisor that must close the window before `main` can therefore start the service
/// with these signals blocked.
fn unblock_signals() -> std::io::Result<()> {
    // SAFETY: `set` is initialised by `sigemptyset` before any other use, every pointer
    // passed is valid for the call, and `pthread_sigmask` changes the calling thread's mask
    // only (threads started later inherit it; none was started before).
    let result = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in HANDLED.iter().chain(&QUIET) {
            libc::sigaddset(&mut set, *signal);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(result))
    }
}

/// What quiet mode needs: the pause it sets, and the leases held, to say when they are all
/// settled.
struct Quiet {
    /// Set on SIGTSTP, cleared on SIGCONT; also read by `/readyz`.
    pause: Pause,
    /// The service's counters (the leases held among them).
    metrics: Arc<Metrics>,
    /// Counts the SIGTSTPs that turned quiet mode on: the thread that watches a drain ends
    /// when a later one starts, so quick SIGTSTP, SIGCONT, SIGTSTP never log a drain twice.
    generation: Arc<AtomicU64>,
}

/// Starts the thread that turns signals into the shutdown: the first one triggers it, a
/// second one forces the exit; SIGTSTP and SIGCONT turn quiet mode on and off; SIGUSR1 and
/// SIGUSR2 are logged and ignored.
fn spawn_signal_thread(
    mut signals: Signals,
    shutdown: Shutdown,
    quiet: Quiet,
    source: SourceSlot,
    startup: Sender<Startup>,
) -> std::io::Result<()> {
    // Never joined: it must stay able to force the exit until the process ends (a report
    // write blocked on a full stdout included).
    thread::Builder::new()
        .name("mayhem-signals".into())
        .spawn(move || {
            let mut received = 0;
            // (When the last line about an ignored signal was logged, signals left unlogged
            // since.)
            let mut ignored: (Option<std::time::Instant>, u64) = (None, 0);
            for signal in signals.forever() {
                let name = signal_name(signal);
                if IGNORED.contains(&signal) {
                    log_ignored(name, &mut ignored);
                    continue;
                }
                if QUIET.contains(&signal) {
                    quiet.switch(signal == SIGTSTP, &shutdown);
                    continue;
                }
                received += 1;
                if received == 1 {
                    shutdown.trigger(ShutdownReason::Signal(name.to_owned()));
                    let _ = startup.send(Startup::Signal);
                } else {
                    // Cloned out of the lock, so that main's take of it never waits on the
                    // nacks.
                    let held = source
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    warn!("Received exit signal {name} again, forcing exit");
                    force_exit(held.as_ref(), EXIT_FORCED);
                }
            }
        })
        .map(drop)
}

impl Quiet {
    /// Turns quiet mode on (SIGTSTP) or off (SIGCONT), logging the change; once on, a thread
    /// says when every held message is settled.
    fn switch(&self, on: bool, shutdown: &Shutdown) {
        // Only this thread switches, so the state read here is the one switched from.
        if self.pause.is_quiet() == on {
            debug!(
                "Received {} while already {}",
                if on { "SIGTSTP" } else { "SIGCONT" },
                if on { "quiet" } else { "running" }
            );
            return;
        }
        if !on {
            // Logged before the pause is lifted: no line of resumed work comes before it.
            info!("Received SIGCONT: resuming, consumers pull and publishers publish again");
            self.pause.set_quiet(false);
            return;
        }
        self.pause.set_quiet(true);
        info!(
            "Received SIGTSTP: quiet, consumers stop pulling and publishers stop publishing; \
             the {} held messages are handled and settled (SIGCONT resumes)",
            self.metrics.in_flight()
        );
        let (pause, metrics, shutdown, generation) = (
            self.pause.clone(),
            Arc::clone(&self.metrics),
            shutdown.clone(),
            Arc::clone(&self.generation),
        );
        let mine = generation.fetch_add(1, Ordering::SeqCst) + 1;
        // Says when the pulls have stopped, then when the held messages are settled; ends
        // then, or when quiet mode or the service ends first.
        let spawned = thread::Builder::new()
            .name("mayhem-quiet".into())
            .spawn(move || {
                let mut pulls_stopped = false;
                while pause.is_quiet()
                    && !shutdown.is_triggered()
                    && generation.load(Ordering::SeqCst) == mine
                {
                    if !pulls_stopped && pause.pulls_in_progress() == 0 {
                        pulls_stopped = true;
                        info!(
                            "Quiet: pulls stopped, {} messages held",
                            metrics.in_flight()
                        );
                    }
                    if pulls_stopped && metrics.in_flight() == 0 {
                        info!("Quiet: every held message is settled");
                        return;
                    }
                    thread::sleep(DRAIN_CHECK);
                }
            });
        if let Err(error) = spawned {
            warn!("cannot start the quiet-mode thread: {error}");
        }
    }
}

/// Logs an ignored signal: at most one line per [`IGNORED_LOG_EVERY`], which counts the
/// ones left unlogged since. `last` holds when the last line was logged and that count.
fn log_ignored(name: &str, last: &mut (Option<std::time::Instant>, u64)) {
    let now = std::time::Instant::now();
    if last
        .0
        .is_some_and(|logged| now.duration_since(logged) < IGNORED_LOG_EVERY)
    {
        last.1 += 1;
        return;
    }
    let since = match last.1 {
        0 => String::new(),
        count => format!(" ({count} more ignored signals since the last line)"),
    };
    warn!("Ignoring signal {name}: SIGINT, SIGTERM, SIGHUP or SIGQUIT stop the service{since}");
    *last = (Some(now), 0);
}

/// Starts the thread that bounds the shutdown: once it is triggered (by a signal, by
/// `--messages N`, by a failure or a panic), the process exits within `limit`, whatever its
/// handlers do. A handler that blocks its executor thread and never returns cannot be
/// cancelled, and the run cannot return while the thread is held; past `limit` the watchdog
/// gives back what the source holds and exits 1, as a second signal would (but with 1: no
/// one asked for it).
fn spawn_watchdog(shutdown: Shutdown, limit: Duration, source: SourceSlot) {
    // Never joined: the process ends with it, or it ends the process. Not starting it only
    // loses the bound, so a failure is logged and the service goes on.
    let spawned = thread::Builder::new()
        .name("mayhem-watchdog".into())
        .spawn(move || {
            shutdown.wait();
            thread::sleep(limit);
            error!(
                "The shutdown did not finish within {} (--grace-period plus {}): a handler \
                 blocks its thread; forcing exit",
                humantime::format_duration(limit),
                humantime::format_duration(SHUTDOWN_MARGIN)
            );
            let held = source
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            force_exit(held.as_ref(), EXIT_STUCK);
        });
    if let Err(error) = spawned {
        warn!("cannot start the shutdown watchdog: {error}");
    }
}

/// A forced exit (a second signal, or the watchdog): gives back what the source holds
/// (bounded), writes what it can of the log (bounded), and exits with `code`. Logging only
/// queues, so nothing here waits on stderr or stdout beyond those bounds.
fn force_exit(source: Option<&Arc<dyn Broker>>, code: i32) -> ! {
    if let Some(source) = source {
        let (done, nacked) = mpsc::channel();
        let source = Arc::clone(source);
        // On its own thread so that a stalled backend cannot hold the exit.
        let spawned = thread::Builder::new()
            .name("mayhem-nack-all".into())
            .spawn(move || {
                let _ = done.send(source.nack_all());
            });
        if spawned.is_ok() {
            match nacked.recv_timeout(FORCED_NACK_WAIT) {
                Ok(count) => warn!("Nacked {count} leased messages"),
                Err(_) => warn!("Leased messages not all nacked within {FORCED_NACK_WAIT:?}"),
            }
        }
    }
    logger::flush(Duration::from_millis(100), Duration::from_millis(300));
    // `_exit`: no exit handlers, no flush of stdout, whose pipe may be full.
    signal_hook::low_level::exit(code)
}

/// Prints a one-line usage error to stderr (ignoring a closed stderr).
fn usage_error(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The name of a handled signal.
fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        SIGQUIT => "SIGQUIT",
        SIGUSR1 => "SIGUSR1",
        SIGUSR2 => "SIGUSR2",
        SIGTSTP => "SIGTSTP",
        SIGCONT => "SIGCONT",
        _ => "signal",
    }
}

/// Routes panic messages through the logger. Panics of executor threads happen inside
/// handlers, where the runner catches them and logs `Caught exception: ...`, so they are
/// logged at debug level only; any other panic is a bug and is logged as an error.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let location = info.location().map(|l| l.to_string()).unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if name.starts_with("mayhem-worker") {
            debug!("thread '{name}' panicked at {location}: {payload}");
        } else {
            error!("thread '{name}' panicked at {location}: {payload}");
        }
    }));
}
