"""Google's own client (google-cloud-pubsub) on the emulator, for tests/pubsub.rs.

PUBSUB_EMULATOR_HOST names the emulator. Three commands:

  publish PROJECT TOPIC       reads JSON lines {"data": base64, "attributes": {...},
                              "ordering_key": "..."} on stdin and publishes them in order
                              (message ordering on); prints the server ids, one a line
  subscribe PROJECT TOPIC SUB creates subscription SUB on TOPIC
  pull PROJECT SUB COUNT      pulls until COUNT messages came, acks them, and prints each as
                              a JSON line {"data", "attributes", "ordering_key", "id"}
"""

import base64
import json
import sys
import time

from google.cloud import pubsub_v1


def publish(project, topic):
    options = pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    publisher = pubsub_v1.PublisherClient(publisher_options=options)
    path = publisher.topic_path(project, topic)
    futures = []
    for line in sys.stdin:
        message = json.loads(line)
        futures.append(
            publisher.publish(
                path,
                base64.b64decode(message["data"]),
                ordering_key=message.get("ordering_key", ""),
                **message.get("attributes", {}),
            )
        )
    for future in futures:
        print(future.result(timeout=30))


def subscribe(project, topic, subscription):
    subscriber = pubsub_v1.SubscriberClient()
    subscriber.create_subscription(
        request={
            "name": subscriber.subscription_path(project, subscription),
            "topic": subscriber.topic_path(project, topic),
            "enable_message_ordering": True,
        }
    )


def pull(project, subscription, count):
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(project, subscription)
    got = 0
    end = time.time() + 60
    while got < count and time.time() < end:
        answer = subscriber.pull(request={"subscription": path, "max_messages": 100}, timeout=10)
        if not answer.received_messages:
            continue
        for received in answer.received_messages:
            message = received.message
            print(
                json.dumps(
                    {
                        "data": base64.b64encode(message.data).decode(),
                        "attributes": dict(message.attributes),
                        "ordering_key": message.ordering_key,
                        "id": message.message_id,
                    }
                )
            )
        subscriber.acknowledge(
            request={
                "subscription": path,
                "ack_ids": [received.ack_id for received in answer.received_messages],
            }
        )
        got += len(answer.received_messages)


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "publish":
        publish(*args)
    elif command == "subscribe":
        subscribe(*args)
    elif command == "pull":
        pull(args[0], args[1], int(args[2]))
    else:
        sys.exit(f"unknown command {command}")
