//! The RabbitMQ peer of `make bench`: a consumer on tokio and lapin, as a Rust user would
//! write it.
//!
//! One connection, one channel, `basic.qos` with the prefetch, one `basic.consume`, on a
//! tokio runtime of 2 worker threads. Two ways to handle the deliveries:
//!
//! - `inline` (the default): each delivery is handled in the consume loop, and every
//!   `--ack-every` deliveries one `basic.ack multiple=true` acks them all (the remainder
//!   at the end): the least client work lapin allows;
//! - `spawn`: one tokio task per delivery, which handles it and acks it alone.
//!
//! It consumes `--count` messages of the preloaded `--queue`, then closes its channel (the
//! broker has every ack before its `channel.close-ok`), and prints one line:
//!
//! `peer=amqp-inline messages=200000 secs=1.62 msg_per_sec=123456 cpu_us=1234567 left=0`
//!
//! where `secs` runs from `basic.consume` to the last ack sent, `cpu_us` is the process's
//! user and system CPU time (getrusage) and `left` the messages still in the queue after
//! the channel closed (0 unless an ack was lost).
//!
//! Usage: `amqp-peer --url URL --queue NAME --count N [--prefetch 10000] [--ack-every 1000]
//! [--mode inline|spawn]`

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Notify;

mod common;

use common::{cpu_micros, handle, Args};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Inline,
    Spawn,
}

struct Options {
    url: String,
    queue: String,
    count: u64,
    prefetch: u16,
    ack_every: u64,
    mode: Mode,
}

fn options() -> Result<Options, String> {
    let mut args = Args::parse()?;
    let mode = match args.take("mode").as_deref() {
        None | Some("inline") => Mode::Inline,
        Some("spawn") => Mode::Spawn,
        Some(other) => return Err(format!("--mode {other}: inline or spawn")),
    };
    let options = Options {
        url: args.required("url")?,
        queue: args.required("queue")?,
        count: args.number("count", None)?,
        prefetch: args.number("prefetch", Some(10_000))?,
        ack_every: args.number("ack-every", Some(1_000))?.max(1),
        mode,
    };
    args.finish()?;
    Ok(options)
}

fn main() -> ExitCode {
    let options = match options() {
        Ok(options) => options,
        Err(why) => {
            eprintln!("amqp-peer: {why}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(&options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("amqp-peer: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: &Options) -> Result<(), Box<dyn std::error::Error>> {
    let connection = Connection::connect(&options.url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(options.prefetch, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    match options.mode {
        Mode::Inline => consume_inline(&channel, options).await?,
        Mode::Spawn => consume_spawned(&channel, options).await?,
    }
    let secs = started.elapsed().as_secs_f64();
    // The broker handles the channel's frames in order: its close-ok comes after every ack.
    channel.close(200, "done".into()).await?;
    let cpu_us = cpu_micros();
    // What the queue still holds once the closed channel's unacked deliveries went back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let check = connection.create_channel().await?;
    let left = check
        .queue_declare(
            options.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    connection.close(200, "done".into()).await?;
    let name = match options.mode {
        Mode::Inline => "amqp-inline",
        Mode::Spawn => "amqp-spawn",
    };
    println!(
        "peer={name} messages={} secs={secs:.3} msg_per_sec={:.0} cpu_us={cpu_us} left={left}",
        options.count,
        options.count as f64 / secs
    );
    Ok(())
}

/// Handles each delivery in the consume loop, and acks with `multiple` every
/// `ack_every` deliveries.
async fn consume_inline(
    channel: &Channel,
    options: &Options,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut consumer = channel
        .basic_consume(
            options.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (mut received, mut unacked, mut last_tag) = (0u64, 0u64, 0);
    while received < options.count {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery = delivery?;
        handle(&delivery.data);
        received += 1;
        unacked += 1;
        last_tag = delivery.delivery_tag;
        if unacked == options.ack_every {
            channel
                .basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await?;
            unacked = 0;
        }
    }
    if unacked > 0 {
        channel
            .basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await?;
    }
    ended_early(received, options.count)
}

/// Spawns one task per delivery, which handles it and acks it alone.
async fn consume_spawned(
    channel: &Channel,
    options: &Options,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut consumer = channel
        .basic_consume(
            options.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let acked = Arc::new(AtomicU64::new(0));
    let all_acked = Arc::new(Notify::new());
    let count = options.count;
    let mut received = 0u64;
    while received < count {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery: Delivery = delivery?;
        received += 1;
        let (acked, all_acked) = (Arc::clone(&acked), Arc::clone(&all_acked));
        tokio::spawn(async move {
            handle(&delivery.data);
            match delivery.acker.ack(BasicAckOptions::default()).await {
                Ok(true) => {}
                Ok(false) => eprintln!("amqp-peer: ack refused: the channel was lost"),
                Err(error) => eprintln!("amqp-peer: ack: {error}"),
            }
            if acked.fetch_add(1, Ordering::AcqRel) + 1 == count {
                all_acked.notify_one();
            }
        });
    }
    ended_early(received, count)?;
    // notify_one keeps a permit when nobody waits yet.
    if acked.load(Ordering::Acquire) < count {
        all_acked.notified().await;
    }
    Ok(())
}

/// An error when the consumer ended (the broker cancelled it) before `count` deliveries.
fn ended_early(received: u64, count: u64) -> Result<(), Box<dyn std::error::Error>> {
    if received < count {
        return Err(format!("the consumer ended after {received} of {count} deliveries").into());
    }
    Ok(())
}
