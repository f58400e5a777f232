"""A Python producer and consumer of Mayhem's Redis Streams wire format, with redis-py.

Run by tests/interop.rs: `python3 redis_interop.py produce|consume`, a JSON request on
standard input, a JSON answer on standard output. Data travels as hex both ways, so binary
payloads (NUL bytes, invalid UTF-8) cross the pipe unchanged.

produce: {"url", "stream", "messages": [{"data": hex, "id"?, "ordering_key"?,
          "publish_time"?, "attributes": {key: value}}]}
         writes `XADD <stream> * data <payload> [message_id <id>] [ordering_key <key>]
         [publish_time <ms>] [<attribute> <value>]...`; answers {"entry_ids": [...]}.
consume: {"url", "stream", "group", "count", "patience"}
         reads the stream with XRANGE, then with XREADGROUP in a group of its own (created at
         0) until `count` entries came or `patience` seconds passed, acking them; answers
         {"xrange": [entry], "xreadgroup": [entry]}, an entry being
         {"id": entry id, "fields": [[field name, value as hex]...]} in the entry's order.
"""

import json
import sys
import time

import redis


def entry(entry_id, fields):
    return {
        "id": entry_id.decode(),
        "fields": [[key.decode(), value.hex()] for key, value in fields.items()],
    }


def produce(client, request):
    entry_ids = []
    for message in request["messages"]:
        # A dict keeps its insertion order, and redis-py writes the fields in that order.
        fields = {"data": bytes.fromhex(message["data"])}
        if message.get("id") is not None:
            fields["message_id"] = message["id"]
        if message.get("ordering_key") is not None:
            fields["ordering_key"] = message["ordering_key"]
        if message.get("publish_time") is not None:
            fields["publish_time"] = str(message["publish_time"])
        for key, value in message.get("attributes", {}).items():
            fields[key] = value.encode()
        entry_ids.append(client.xadd(request["stream"], fields).decode())
    return {"entry_ids": entry_ids}


def consume(client, request):
    stream, group, count = request["stream"], request["group"], request["count"]
    ranged = [entry(i, f) for i, f in client.xrange(stream, "-", "+")]
    client.xgroup_create(stream, group, id="0", mkstream=True)
    read = []
    deadline = time.monotonic() + request["patience"]
    while len(read) < count and time.monotonic() < deadline:
        reply = client.xreadgroup(group, "python", {stream: ">"}, count=count, block=200)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                read.append(entry(entry_id, fields))
                client.xack(stream, group, entry_id)
    return {"xrange": ranged, "xreadgroup": read}


def main():
    command = sys.argv[1]
    request = json.load(sys.stdin)
    client = redis.Redis.from_url(request["url"], socket_timeout=10)
    answer = {"produce": produce, "consume": consume}[command](client, request)
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
