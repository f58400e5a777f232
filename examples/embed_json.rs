//! Embedding Mayhem with a payload of its own: JSON order events, published through the
//! in-memory `Subscription` by this program and decoded by its own handler with serde.
//!
//! The library knows nothing of JSON (serde is a dependency of this example only): a message
//! is bytes, attributes, an id and an ordering key. The handler decides what the bytes mean:
//!
//! - an event that decodes is booked, and acked;
//! - one that fails once for a passing reason (a busy inventory service, simulated on the
//!   first delivery of order 7) returns an error: it is nacked and delivered again;
//! - one that can never succeed (not JSON, a field missing or of the wrong type, a quantity
//!   of zero, another content type) is rejected with [`HandleError::reject`]: dead-lettered at
//!   once with its reason, never retried, and counted `rejected` in the report.
//!
//! Run with `cargo run --example embed_json`; it checks the report's counts against the
//! events it published and exits 1 when one is off.

use std::collections::BTreeMap;
use std::sync::Mutex;

use mayhem::{Config, Context, HandleError, Handler, PubSubMessage, Publish, Runner, Shutdown};
use mayhem::{Subscription, SubscriptionConfig};
use serde::{Deserialize, Serialize};

/// One order event, as the producer writes it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderEvent {
    order_id: u64,
    sku: String,
    quantity: u32,
}

/// The attribute that says what the data is.
const CONTENT_TYPE: &str = "content-type";
const JSON: &str = "application/json";

/// Books the units ordered per SKU.
#[derive(Default)]
struct OrderBook {
    units: Mutex<BTreeMap<String, u64>>,
    booked: Mutex<Vec<u64>>,
}

impl Handler for OrderBook {
    async fn handle(&self, ctx: &Context<'_>) -> Result<(), HandleError> {
        // Failures no retry can cure are rejections: the message goes to the dead letters at
        // once, with the reason.
        if ctx.attributes().get(CONTENT_TYPE) != Some(JSON) {
            return Err(HandleError::reject(format!(
                "content-type {:?}, not {JSON}",
                ctx.attributes().get(CONTENT_TYPE)
            )));
        }
        let event: OrderEvent = serde_json::from_slice(ctx.data())
            .map_err(|error| HandleError::reject(format!("not an order event: {error}")))?;
        if event.quantity == 0 {
            return Err(HandleError::reject(format!(
                "order {} has a quantity of 0",
                event.order_id
            )));
        }
        // A passing failure is an error to retry: the message is nacked and comes back.
        if event.order_id == 7 && ctx.attempt() == 1 {
            return Err(HandleError::Other("inventory service busy".to_owned()));
        }
        *self.units.lock().unwrap().entry(event.sku).or_default() += u64::from(event.quantity);
        self.booked.lock().unwrap().push(event.order_id);
        Ok(())
    }
}

/// The events this program publishes: `good` valid orders, then the bad ones, each with why.
fn events() -> (Vec<PubSubMessage>, usize) {
    const SKUS: [&str; 3] = ["KB-101", "MS-204", "HD-330"];
    let mut messages: Vec<PubSubMessage> = (1..=24u64)
        .map(|order_id| {
            let event = OrderEvent {
                order_id,
                sku: SKUS[order_id as usize % SKUS.len()].to_owned(),
                quantity: 1 + (order_id % 3) as u32,
            };
            let data = serde_json::to_vec(&event).expect("an order event encodes");
            PubSubMessage::new(data)
                .with_id(format!("order-{order_id}"))
                .with_attribute(CONTENT_TYPE, JSON)
                .with_ordering_key(event.sku)
        })
        .collect();
    let good = messages.len();
    let bad: [&[u8]; 5] = [
        br#"{"order_id": 25, "sku": "KB-101""#, // cut short
        br#"{"order_id": "twenty-six", "sku": "KB-101", "quantity": 2}"#, // wrong type
        br#"{"order_id": 27, "sku": "KB-101"}"#, // no quantity
        br#"{"order_id": 28, "sku": "KB-101", "quantity": 0}"#, // zero
        b"\xff\xfe\x00 not even text",          // binary
    ];
    for (i, data) in bad.iter().enumerate() {
        messages.push(
            PubSubMessage::new(data.to_vec())
                .with_id(format!("bad-{i}"))
                .with_attribute(CONTENT_TYPE, JSON),
        );
    }
    // Right bytes, wrong content type.
    messages.push(
        PubSubMessage::new(br#"{"order_id": 29, "sku": "KB-101", "quantity": 1}"#.to_vec())
            .with_id("bad-csv")
            .with_attribute(CONTENT_TYPE, "text/csv"),
    );
    (messages, good)
}

fn main() {
    let (messages, good) = events();
    let bad = messages.len() - good;

    let mut config = Config::default();
    // This program publishes its own events, so the run has no publishers; it stops once
    // every event is settled (acked or dead-lettered).
    config.publish.publishers = 0;
    config.run.messages = Some(messages.len() as u64);
    config.run.seed = Some(17);
    let subscription = Subscription::new(SubscriptionConfig::from(&config));
    subscription
        .publish(&messages)
        .expect("the events fit Pub/Sub's limits");

    let handler = OrderBook::default();
    let report = Runner::new(&config)
        .publisher(&subscription)
        .run(&subscription, &handler, &Shutdown::new())
        .expect("a valid config");
    println!("{}", report.to_json());

    let units = handler.units.lock().unwrap().clone();
    let booked = handler.booked.lock().unwrap().len();
    println!("units ordered per SKU: {units:?}");
    for dead in subscription.dead_letters() {
        println!(
            "dead letter {} after {} attempt(s): {}",
            dead.message.id(),
            dead.attempts,
            dead.reason.as_deref().unwrap_or("attempts used up")
        );
    }

    let mut wrong = Vec::new();
    let mut expect = |what: &str, got: u64, want: u64| {
        if got != want {
            wrong.push(format!("{what}: {got}, expected {want}"));
        }
    };
    expect("acked", report.acked, good as u64);
    expect("booked", booked as u64, good as u64);
    expect("rejected", report.rejected, bad as u64);
    expect("dead_lettered", report.dead_lettered, bad as u64);
    // Order 7 failed once, then was booked.
    expect("nacked", report.nacked, 1);
    expect(
        "units",
        units.values().sum(),
        (1..=24u64).map(|id| 1 + id % 3).sum(),
    );
    let rejected_at_once = subscription
        .dead_letters()
        .iter()
        .filter(|dead| dead.attempts == 1 && dead.reason.is_some())
        .count();
    expect(
        "rejected on the first attempt",
        rejected_at_once as u64,
        bad as u64,
    );
    if !report.is_balanced() {
        wrong.push(format!(
            "unbalanced: published {} != acked {} + dead_lettered {} + remaining {}",
            report.published, report.acked, report.dead_lettered, report.remaining
        ));
    }
    if !wrong.is_empty() {
        eprintln!("embed_json: the report is off:\n  {}", wrong.join("\n  "));
        std::process::exit(1);
    }
}
