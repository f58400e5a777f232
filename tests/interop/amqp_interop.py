"""A Python producer and consumer of Mayhem's RabbitMQ wire format, with pika.

Run by tests/interop.rs: `python3 amqp_interop.py produce|consume`, a JSON request on
standard input, a JSON answer on standard output. Bodies travel as hex both ways, so binary
payloads (NUL bytes, invalid UTF-8) cross the pipe unchanged.

The queue is the source's: a quorum queue the Mayhem source declared with its own
arguments. This script only publishes to it through the default exchange (routing key = the
queue's name) and reads from it; it declares nothing, unless a produce request says
"declare": true, when it first declares the queue as pika's tutorial does
(`queue_declare(queue)`: classic, not durable, no arguments).

produce: {"url", "queue", "messages": [{"data": hex, "id"?, "timestamp"?, "ordering_key"?,
          "attributes": {key: value}}]}
         publishes each with confirms: body = data, `message-id` = id, `timestamp` (seconds),
         headers = attributes (+ `x-mayhem-ordering-key`); answers {"published": n}.
         A message may also carry "headers" (typed values as JSON gives them: integers,
         booleans, objects as nested tables, lists as arrays, {"bytes": hex} as a byte
         array), "priority" and "expiration", as other producers write them, and
         "id_hex" or "content_type_hex" for short strings of raw bytes.
consume: {"url", "queue", "count", "patience"}
         `basic_get` until `count` messages came or `patience` seconds passed, acking them;
         answers {"messages": [{"data": hex, "id", "timestamp", "headers"}]}.
"""

import datetime
import json
import sys
import time

import pika


def plain(value):
    """A header value as JSON: strings as text, bytes as UTF-8 text (or hex if they are not),
    tables and arrays element by element."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"hex": value.hex()}
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return value


def typed(value):
    """A typed header value from its JSON form: {"bytes": hex} is a byte array, objects are
    tables, lists arrays, everything else as JSON gives it (pika picks the AMQP type)."""
    if isinstance(value, dict):
        if set(value) == {"bytes"}:
            return bytes.fromhex(value["bytes"])
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return value


def produce(channel, request):
    if request.get("declare"):
        channel.queue_declare(queue=request["queue"])
    channel.confirm_delivery()
    for message in request["messages"]:
        headers = dict(message.get("attributes", {}))
        headers.update(
            {key: typed(value) for key, value in message.get("headers", {}).items()}
        )
        if message.get("ordering_key") is not None:
            headers["x-mayhem-ordering-key"] = message["ordering_key"]
        # "id_hex" / "content_type_hex": raw bytes, which AMQP's short strings may hold
        # (pika sends bytes as they are), UTF-8 or not.
        message_id = message.get("id")
        if message.get("id_hex") is not None:
            message_id = bytes.fromhex(message["id_hex"])
        content_type = None
        if message.get("content_type_hex") is not None:
            content_type = bytes.fromhex(message["content_type_hex"])
        properties = pika.BasicProperties(
            message_id=message_id,
            content_type=content_type,
            timestamp=message.get("timestamp"),
            headers=headers or None,
            delivery_mode=pika.DeliveryMode.Persistent,
            priority=message.get("priority"),
            expiration=message.get("expiration"),
        )
        # Raises when the broker nacks it, or returns it unroutable (mandatory).
        channel.basic_publish(
            exchange="",
            routing_key=request["queue"],
            body=bytes.fromhex(message["data"]),
            properties=properties,
            mandatory=True,
        )
    return {"published": len(request["messages"])}


def consume(channel, request):
    messages = []
    deadline = time.monotonic() + request["patience"]
    while len(messages) < request["count"] and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(request["queue"], auto_ack=False)
        if method is None:
            time.sleep(0.05)
            continue
        messages.append(
            {
                "data": body.hex(),
                "id": properties.message_id,
                "timestamp": properties.timestamp,
                "headers": plain(properties.headers or {}),
            }
        )
        channel.basic_ack(method.delivery_tag)
    return {"messages": messages}


def main():
    command = sys.argv[1]
    request = json.load(sys.stdin)
    connection = pika.BlockingConnection(pika.URLParameters(request["url"]))
    try:
        answer = {"produce": produce, "consume": consume}[command](connection.channel(), request)
    finally:
        connection.close()
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
