//! What the source needs on Pub/Sub: the subscription, its topic and the dead-letter topic,
//! created when missing.

use log::{info, warn};

use super::rest::{RestError, SubscriptionInfo};
use super::PubSub;

impl PubSub {
    /// Finds the subscription, or creates it with its topic; creates the dead-letter topic;
    /// returns the subscription's settings.
    pub(super) fn ensure(&self) -> Result<SubscriptionInfo, RestError> {
        let info = match self.rest.get_subscription(&self.subscription) {
            Err(error) if error.is_not_found() => {
                self.rest.create_topic(&self.url.topic_path())?;
                self.rest.create_topic(&self.dead_topic)?;
                let settings = serde_json::json!({
                    "topic": self.url.topic_path(),
                    "ackDeadlineSeconds": self.ack_deadline,
                    "enableMessageOrdering": self.url.ordering,
                    "deadLetterPolicy": {
                        "deadLetterTopic": self.dead_topic,
                        "maxDeliveryAttempts": self.policy_attempts(),
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
                for warning in self.differences(&info) {
                    warn!("{warning}");
                }
                info
            }
        };
        Ok(info)
    }

    /// The deliveries the dead-letter policy of a subscription the source creates allows:
    /// one more than the source's attempts, within Pub/Sub's bounds (5 to 100).
    fn policy_attempts(&self) -> u32 {
        (self.max_attempts.saturating_add(1)).clamp(5, 100)
    }

    /// How an existing subscription, made by another program, differs from what the URL
    /// and the settings ask in a way that changes where messages go; one line each.
    pub(super) fn differences(&self, info: &SubscriptionInfo) -> Vec<String> {
        let mut lines = Vec::new();
        let asked = self.url.topic_path();
        if self.url.topic != self.url.subscription && info.topic != asked {
            lines.push(format!(
                "pubsub subscription {} is attached to {}, not to {asked} of ?topic=: \
                 messages are published to {}",
                self.subscription, info.topic, info.topic
            ));
        }
        if !info.filter.is_empty() {
            lines.push(format!(
                "pubsub subscription {} keeps only the messages of its filter {}: a message \
                 published without the attributes it asks for never reaches it (Pub/Sub \
                 acknowledges it for this subscription at once)",
                self.subscription, info.filter
            ));
        }
        if let Some(policy) = &info.dead_letter_policy {
            // Pub/Sub reads an absent (0) maxDeliveryAttempts as 5.
            let forwards = match policy.max_delivery_attempts {
                0 => 5,
                n => n,
            };
            if forwards < self.policy_attempts() {
                lines.push(format!(
                    "pubsub subscription {} forwards a message to {} after {forwards} \
                     deliveries, fewer than the {} that --max-attempts {} needs: Pub/Sub may \
                     dead-letter messages there before the source does, without a reason and \
                     uncounted (the source's dead letters go to {})",
                    self.subscription,
                    policy.dead_letter_topic,
                    self.policy_attempts(),
                    self.max_attempts,
                    self.dead_topic
                ));
            }
        }
        lines
    }
}
