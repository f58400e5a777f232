//! Embedding Mayhem inside an async program (`smol::block_on`): the blocking `Runner::run` goes to
//! the `blocking` thread pool with `smol::unblock`, and an async timer stops it.
//!
//! Run with `cargo run --example embed_smol`; it asserts on the report and exits 0.

use std::sync::Arc;
use std::time::Duration;

use mayhem::{
    Config, MayhemConfig, MayhemHandler, Runner, Shutdown, ShutdownReason, Source, Subscription,
};

fn main() {
    let mut config = Config::default();
    config.publish.interval = Duration::from_millis(1);
    config.handler.latency = Duration::from_millis(5);
    config.handler.restart_failure_rate = 0.1;
    config.handler.save_failure_rate = 0.1;
    config.run.grace_period = Duration::from_secs(2);
    config.run.seed = Some(7);
    let shutdown = Shutdown::new();
    let subscription = Arc::new(Subscription::new((&config).into()));
    let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 7));

    let report = smol::block_on(async {
        let service = {
            let (config, shutdown, subscription) =
                (config.clone(), shutdown.clone(), subscription.clone());
            // `run` blocks its thread until shutdown, so it runs on the blocking pool.
            smol::unblock(move || {
                Runner::new(&config).publisher(&*subscription).run(
                    &*subscription,
                    &handler,
                    &shutdown,
                )
            })
        };
        // Meanwhile this async program goes on, then stops the service.
        smol::Timer::after(Duration::from_millis(300)).await;
        shutdown.trigger(ShutdownReason::Requested);
        service.await.expect("valid configuration")
    });

    println!("{}", report.to_json());
    assert_eq!(report.reason, "requested");
    assert!(report.published > 0 && report.consumed > 0);
    assert!(report.acked > 0, "no message handled in 300 ms: {report:?}");
    assert!(report.is_balanced());
    assert_eq!(subscription.stats().remaining, report.remaining);
}
