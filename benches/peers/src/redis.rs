//! The Redis peer of `make bench`: a consumer on tokio and the `redis` crate, as a Rust user
//! would write it.
//!
//! `--consumers` (2) consumers in one consumer group, each a tokio task on a multiplexed
//! connection of its own, on a tokio runtime of 2 worker threads. Each reads with
//! `XREADGROUP COUNT 1000`, handles the batch inline, and sends the batch's `XACK` in one
//! pipeline with its next read: one round trip per batch. A consumer that finds the stream
//! empty reads again with `BLOCK 100` until every message is acked.
//!
//! It consumes `--count` entries of the preloaded `--stream` (creating `--group` at id 0
//! when it does not exist), and prints one line:
//!
//! `peer=redis messages=200000 secs=0.48 msg_per_sec=416666 cpu_us=123456 left=0`
//!
//! where `secs` runs from the first read to the ack that reached `--count`, `cpu_us` is the
//! process's user and system CPU time (getrusage) and `left` the group's pending entries at
//! the end (0 unless an ack was lost).
//!
//! Usage: `redis-peer --url URL --stream NAME --count N [--group peer] [--consumers 2]
//! [--batch 1000]`

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamPendingReply, StreamReadOptions};
use redis::{AsyncCommands, FromRedisValue, ParsingError, Value};

mod common;

use common::{cpu_micros, handle, Args};

struct Options {
    url: String,
    stream: String,
    group: String,
    count: u64,
    consumers: usize,
    batch: usize,
}

fn options() -> Result<Options, String> {
    let mut args = Args::parse()?;
    let options = Options {
        url: args.required("url")?,
        stream: args.required("stream")?,
        group: args.take("group").unwrap_or_else(|| "peer".to_owned()),
        count: args.number("count", None)?,
        consumers: args.number("consumers", Some(2))?.max(1),
        batch: args.number("batch", Some(1000))?.max(1),
    };
    args.finish()?;
    Ok(options)
}

fn main() -> ExitCode {
    let options = match options() {
        Ok(options) => options,
        Err(why) => {
            eprintln!("redis-peer: {why}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(Arc::new(options))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("redis-peer: {error}");
            ExitCode::FAILURE
        }
    }
}

/// What the consumers share: the entries acked so far, and when they reached the count.
struct Progress {
    acked: AtomicU64,
    done_at: OnceLock<Instant>,
}

async fn run(options: Arc<Options>) -> redis::RedisResult<()> {
    let client = redis::Client::open(options.url.as_str())?;
    let mut admin = client.get_multiplexed_async_connection().await?;
    let created: redis::RedisResult<()> = admin
        .xgroup_create(&options.stream, &options.group, "0")
        .await;
    if let Err(error) = created {
        if error.code() != Some("BUSYGROUP") {
            return Err(error);
        }
    }
    let mut connections = Vec::with_capacity(options.consumers);
    for _ in 0..options.consumers {
        connections.push(client.get_multiplexed_async_connection().await?);
    }
    let progress = Arc::new(Progress {
        acked: AtomicU64::new(0),
        done_at: OnceLock::new(),
    });
    let started = Instant::now();
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(index, connection)| {
            let (options, progress) = (Arc::clone(&options), Arc::clone(&progress));
            tokio::spawn(consume(
                connection,
                format!("peer-{index}"),
                options,
                progress,
            ))
        })
        .collect();
    for task in tasks {
        task.await.expect("a consumer task panicked")?;
    }
    let secs = progress
        .done_at
        .get()
        .map_or_else(|| started.elapsed(), |at| *at - started)
        .as_secs_f64();
    let cpu_us = cpu_micros();
    let pending: StreamPendingReply = admin.xpending(&options.stream, &options.group).await?;
    println!(
        "peer=redis messages={} secs={secs:.3} msg_per_sec={:.0} cpu_us={cpu_us} left={}",
        options.count,
        options.count as f64 / secs,
        pending.count()
    );
    Ok(())
}

/// One consumer: reads a batch, handles it, and acks it in one pipeline with the next read.
async fn consume(
    mut connection: MultiplexedConnection,
    name: String,
    options: Arc<Options>,
    progress: Arc<Progress>,
) -> redis::RedisResult<()> {
    let streams = [options.stream.as_str()];
    let read = || {
        StreamReadOptions::default()
            .group(&options.group, &name)
            .count(options.batch)
    };
    // Once the stream is empty: wait for entries rather than spin.
    let (read, wait) = (read(), read().block(100));
    let mut unacked: Vec<Vec<u8>> = Vec::with_capacity(options.batch);
    let mut found_none = false;
    loop {
        let options_now = if found_none { &wait } else { &read };
        let reply: Batch = if unacked.is_empty() {
            connection
                .xread_options(&streams, &[">"], options_now)
                .await?
        } else {
            let (acked, reply): (u64, Batch) = redis::pipe()
                .xack(&options.stream, &options.group, &unacked)
                .xread_options(&streams, &[">"], options_now)
                .query_async(&mut connection)
                .await?;
            unacked.clear();
            let total = progress.acked.fetch_add(acked, Ordering::AcqRel) + acked;
            if total >= options.count {
                let _ = progress.done_at.set(Instant::now());
            }
            reply
        };
        for (id, data) in reply.0 {
            if let Some(data) = data {
                handle(&data);
            }
            unacked.push(id);
        }
        found_none = unacked.is_empty();
        if found_none && progress.acked.load(Ordering::Acquire) >= options.count {
            return Ok(());
        }
    }
}

/// The entries of an `XREADGROUP` reply: each entry's id and its `data` field, taken out of
/// the reply without copying (the crate's `StreamReadReply` builds a `HashMap` of `String`
/// keys per entry, which cost this consumer more CPU than the rest of its work).
struct Batch(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl FromRedisValue for Batch {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        // RESP2: an array of [key, entries] pairs; RESP3: a map of key to entries; nil when
        // nothing was read.
        let streams: Vec<Value> = match value {
            Value::Nil => return Ok(Batch(Vec::new())),
            Value::Array(streams) => streams
                .into_iter()
                .map(|stream| match stream {
                    Value::Array(pair) => pair.into_iter().nth(1).unwrap_or(Value::Nil),
                    other => other,
                })
                .collect(),
            Value::Map(streams) => streams.into_iter().map(|(_, entries)| entries).collect(),
            other => return Err(format!("XREADGROUP replied {other:?}").into()),
        };
        let mut batch = Vec::new();
        for entries in streams {
            let Value::Array(entries) = entries else {
                continue;
            };
            batch.reserve(entries.len());
            for entry in entries {
                let Value::Array(entry) = entry else {
                    return Err(format!("a stream entry of {entry:?}").into());
                };
                let mut parts = entry.into_iter();
                let Some(Value::BulkString(id)) = parts.next() else {
                    return Err("a stream entry without an id".to_owned().into());
                };
                // The fields are nil for an entry deleted after it was delivered.
                let mut data = None;
                if let Some(Value::Array(fields)) = parts.next() {
                    let mut fields = fields.into_iter();
                    while let (Some(field), Some(value)) = (fields.next(), fields.next()) {
                        if let (Value::BulkString(field), Value::BulkString(value)) = (field, value)
                        {
                            if field == b"data" {
                                data = Some(value);
                            }
                        }
                    }
                }
                batch.push((id, data));
            }
        }
        Ok(Batch(batch))
    }
}
