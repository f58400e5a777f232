//! Google's Rust client for Pub/Sub (`google-cloud-pubsub`, gRPC streaming pull) as a
//! consumer: a tokio runtime of 2 worker threads, one `MessageStream` of the subscription,
//! each message handled inline and acked through its handler; at `COUNT` messages the
//! stream is shut down, which flushes the pending acks.
//!
//! Usage: `pubsub-peer ENDPOINT SUBSCRIPTION COUNT [MAX_OUTSTANDING]`, e.g. against the
//! emulator: `pubsub-peer http://127.0.0.1:8085 projects/bench/subscriptions/NAME 40000`
//! (anonymous credentials). Prints one line:
//!
//! `peer=pubsub messages=40000 secs=21.1 msg_per_sec=1894 cpu_us=325805`

use std::time::Instant;

use google_cloud_auth::credentials::anonymous;
use google_cloud_pubsub::client::Subscriber;

#[tokio::main(worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: pubsub-peer ENDPOINT SUBSCRIPTION COUNT [MAX_OUTSTANDING]".into());
    }
    let (endpoint, subscription, count) = (&args[1], &args[2], args[3].parse::<u64>()?);
    let outstanding: i64 = args.get(4).map_or(Ok(1000), |text| text.parse())?;
    let client = Subscriber::builder()
        .with_endpoint(endpoint)
        .with_credentials(anonymous::Builder::new().build())
        .build()
        .await?;
    let mut stream = client
        .subscribe(subscription)
        .set_max_outstanding_messages(outstanding)
        .build();
    let started = Instant::now();
    let mut received = 0u64;
    while let Some((message, handler)) = stream.next().await.transpose()? {
        let sum = message.data.iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
        std::hint::black_box(sum);
        handler.ack();
        received += 1;
        if received == count {
            break;
        }
    }
    stream.shutdown_token().shutdown().await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "peer=pubsub messages={received} secs={secs:.3} msg_per_sec={:.0} cpu_us={}",
        received as f64 / secs,
        cpu_micros()
    );
    Ok(())
}

/// User and system CPU time of this process so far, in microseconds (getrusage).
fn cpu_micros() -> u64 {
    // SAFETY: getrusage writes the struct it is given, which is plain data.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    micros(usage.ru_utime) + micros(usage.ru_stime)
}
