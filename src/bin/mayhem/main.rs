//! The `mayhem` binary: parse the command line, install the logger and the signal handlers,
//! run the service on the embedded in-memory pub/sub (or a Redis stream), print the report.
//!
//! Exit codes: 0 after a graceful shutdown, 1 when a handler panicked or the source failed
//! for good (the service still shut down gracefully), 2 for bad flags or environment
//! variables, 130 when a second signal forced the exit.

mod cli;
mod http;
mod logger;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use clap::error::ErrorKind;
use clap::Parser;
use log::{debug, error, warn};
use mayhem::{
    run_with_metrics, Broker, MayhemConfig, MayhemHandler, Metrics, Shutdown, ShutdownReason,
    Source, Subscription,
};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cli::{Cli, ReportFormat, SourceKind};

/// Exit code of bad input.
const EXIT_USAGE: u8 = 2;
/// Exit code of a forced exit (second signal), as shells report death by SIGINT.
const EXIT_FORCED: i32 = 130;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            let _ = write!(std::io::stdout(), "{error}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            // Only the first line: it names the flag and the bad value.
            let text = error.to_string();
            usage_error(text.lines().next().unwrap_or("error: invalid arguments"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = cli.config();
    if let Err(error) = config.validate() {
        usage_error(&format!("error: {error}"));
        return ExitCode::from(EXIT_USAGE);
    }
    logger::init(cli.log_level());
    install_panic_hook();

    let seed = config.seed.unwrap_or_default();
    debug!("Using seed {seed}");
    let source: Arc<dyn Broker> = match &cli.source {
        SourceKind::Memory => Arc::new(Subscription::new(config.subscription())),
        #[cfg(feature = "redis")]
        SourceKind::Redis(url) => match connect_redis(cli.redis_config(url, &config)) {
            Ok(Some(source)) => Arc::new(source),
            Ok(None) => return ExitCode::SUCCESS,
            Err(()) => return ExitCode::FAILURE,
        },
        #[cfg(not(feature = "redis"))]
        SourceKind::Redis(_) => {
            error!("this build has no redis support");
            return ExitCode::FAILURE;
        }
    };
    let handler = MayhemHandler::new(MayhemConfig::from_config(&config, seed));
    let shutdown = Shutdown::new();
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT]) {
        Ok(signals) => signals,
        Err(error) => {
            error!("cannot install signal handlers: {error}");
            return ExitCode::FAILURE;
        }
    };
    let signal_handle = signals.handle();
    let signal_thread = {
        let shutdown = shutdown.clone();
        let source = Arc::clone(&source);
        let spawned = thread::Builder::new()
            .name("mayhem-signals".into())
            .spawn(move || {
                let mut received = 0;
                for signal in signals.forever() {
                    received += 1;
                    let name = signal_name(signal);
                    if received == 1 {
                        shutdown.trigger(ShutdownReason::Signal(name.to_owned()));
                    } else {
                        // A second signal: give back what we hold and leave at once.
                        warn!("Received exit signal {name} again, forcing exit");
                        let nacked = source.nack_all();
                        warn!("Nacked {nacked} leased messages");
                        std::process::exit(EXIT_FORCED);
                    }
                }
            });
        match spawned {
            Ok(thread) => thread,
            Err(error) => {
                error!("cannot start the signal thread: {error}");
                return ExitCode::FAILURE;
            }
        }
    };

    let metrics = Arc::new(Metrics::default());
    let endpoint = match cli.metrics_addr {
        Some(addr) => {
            match http::Endpoint::start(
                addr,
                metrics.clone(),
                Arc::clone(&source) as Arc<dyn Source>,
                shutdown.clone(),
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

    let result = run_with_metrics(&config, &*source, &handler, &shutdown, &metrics);
    if let Some(endpoint) = endpoint {
        endpoint.stop();
    }
    // Ends the signal thread's loop; joined so that no thread outlives `main`'s work.
    signal_handle.close();
    let _ = signal_thread.join();
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

/// Connects to Redis, retrying within the reconnect limit. A signal meanwhile ends the
/// start-up gracefully (`Ok(None)`); a failure is logged (`Err`).
#[cfg(feature = "redis")]
fn connect_redis(config: mayhem::RedisConfig) -> Result<Option<mayhem::RedisSource>, ()> {
    let starting = Shutdown::new();
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT]).map_err(|error| {
        error!("cannot install signal handlers: {error}");
    })?;
    let handle = signals.handle();
    let watcher = {
        let starting = starting.clone();
        thread::Builder::new()
            .name("mayhem-start-signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    starting.trigger(ShutdownReason::Signal(signal_name(signal).to_owned()));
                }
            })
            .map_err(|error| error!("cannot start the signal thread: {error}"))?
    };
    let result = mayhem::RedisSource::connect_with(config, &starting);
    // Ends the watcher's loop; the service's own signal handling takes over from here.
    handle.close();
    let _ = watcher.join();
    match result {
        Ok(source) => Ok(Some(source)),
        Err(mayhem::SourceError::Closed) => {
            if let Some(reason) = starting.reason() {
                log::info!("Received exit {reason} while connecting to redis");
            }
            log::info!("Successfully shutdown the Mayhem service.");
            Ok(None)
        }
        Err(error) => {
            error!("{error}");
            Err(())
        }
    }
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
