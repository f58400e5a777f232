//! What the source needs on Pub/Sub: the subscription, its topic and the dead-letter topic,
//! created when missing.

use log::info;

use super::rest::{RestError, SubscriptionInfo};
use super::{Core, DEADLINE_MAX, DEADLINE_MIN};

impl Core {
    /// Finds the subscription, or creates it with its topic; creates the dead-letter topic;
    /// returns the subscription's settings.
    pub(super) fn ensure(&self) -> Result<SubscriptionInfo, RestError> {
        let info = match self.rest.get_subscription(&self.subscription) {
            Err(error) if error.is_not_found() => {
                self.rest.create_topic(&self.url.topic_path())?;
                self.rest.create_topic(&self.dead_topic)?;
                let seconds = self
                    .config
                    .ack_deadline
                    .as_secs()
                    .clamp(DEADLINE_MIN, DEADLINE_MAX);
                let settings = serde_json::json!({
                    "topic": self.url.topic_path(),
                    "ackDeadlineSeconds": seconds,
                    "enableMessageOrdering": self.url.ordering,
                    "deadLetterPolicy": {
                        "deadLetterTopic": self.dead_topic,
                        "maxDeliveryAttempts": (self.config.max_attempts + 1).clamp(5, 100),
                    },
                });
                self.rest
                    .create_subscription(&self.subscription, &settings)?;
                info!("created pubsub subscription {}", self.subscription);
                self.rest.get_subscription(&self.subscription)?
            }
            other => {
                let info = other?;
                self.rest.create_topic(&self.dead_topic)?;
                info
            }
        };
        Ok(info)
    }
}
