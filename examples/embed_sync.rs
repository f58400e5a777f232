//! Embedding Mayhem in a plain synchronous `fn main`: a custom handler, and a programmatic
//! stop once enough messages were handled. No async runtime is needed by the embedder.
//!
//! Run with `cargo run --example embed_sync`; it asserts on the report and exits 0.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mayhem::{
    Config, Context, HandleError, Handler, Runner, Shutdown, ShutdownReason, Subscription,
};

/// Counts messages and asks for the shutdown after `stop_after` of them.
struct Counting {
    handled: AtomicUsize,
    stop_after: usize,
    shutdown: Shutdown,
}

impl Handler for Counting {
    async fn handle(&self, ctx: &Context<'_>) -> Result<(), HandleError> {
        // A handler is plain async code; it may await timers, I/O, other tasks.
        smol::Timer::after(Duration::from_millis(1)).await;
        // The built-in publishers write host names like `cattle-ae2t` as the data; anything
        // else can never succeed here, so it is rejected (dead-lettered at once).
        let name = ctx.message().instance_name().map_err(HandleError::reject)?;
        if !name.starts_with("cattle-") {
            return Err(HandleError::reject(format!("not a cattle name: {name}")));
        }
        if self.handled.fetch_add(1, Ordering::SeqCst) + 1 == self.stop_after {
            self.shutdown.trigger(ShutdownReason::Requested);
        }
        Ok(())
    }
}

fn main() {
    let mut config = Config::default();
    config.publish.publishers = 2;
    config.run.consumers = 2;
    config.run.workers = 2;
    config.publish.interval = Duration::from_micros(100);
    config.run.seed = Some(2024);
    let subscription = Subscription::new((&config).into());
    let shutdown = Shutdown::new();
    let handler = Counting {
        handled: AtomicUsize::new(0),
        stop_after: 500,
        shutdown: shutdown.clone(),
    };

    let report = Runner::new(&config)
        .publisher(&subscription)
        .run(&subscription, &handler, &shutdown)
        .expect("valid configuration");

    println!("{}", report.to_json());
    assert_eq!(report.reason, "requested");
    assert!(report.acked >= 500, "acked {}", report.acked);
    // A handler counts right before it returns `Ok`, with no await in between, so every
    // counted message was acked.
    assert_eq!(
        report.acked as usize,
        handler.handled.load(Ordering::SeqCst)
    );
    assert!(report.is_balanced());
}
