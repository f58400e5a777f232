"""The same-run references of the Pub/Sub rows of `make bench`, on the emulator.

Usage: reference.py HOST:PORT PROJECT MODE NAME N
  publish   creates topic NAME and subscription NAME, and publishes N messages of 11 bytes
            with REST `publish` in batches of 1,000 (standard library only)
  rest      pulls (1,000 at a time, returnImmediately) and acks in one request per batch,
            from subscription NAME, until N were acked (standard library only)
  streaming python-pubsub's streaming-pull subscriber with callback acks on subscription
            NAME, until N were acked (needs google-cloud-pubsub)
Prints the messages per second, or why nothing was measured.
"""
import base64
import json
import os
import sys
import threading
import time
import urllib.request

host, project, mode, name, total = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
base = f"http://{host}/v1/projects/{project}"


def call(method, path, body=None):
    request = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body or {}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request) as answer:
        return json.loads(answer.read() or b"{}")


if mode == "publish":
    call("PUT", f"/topics/{name}")
    call("PUT", f"/subscriptions/{name}", {"topic": f"projects/{project}/topics/{name}", "ackDeadlineSeconds": 60})
    data = base64.b64encode(b"cattle-abcd").decode()
    started = time.perf_counter()
    for sent in range(0, total, 1000):
        call("POST", f"/topics/{name}:publish", {"messages": [{"data": data}] * min(1000, total - sent)})
    print(f"{total / (time.perf_counter() - started):.0f}")
elif mode == "rest":
    started = time.perf_counter()
    acked = 0
    while acked < total:
        answer = call("POST", f"/subscriptions/{name}:pull", {"maxMessages": 1000, "returnImmediately": True})
        ids = [received["ackId"] for received in answer.get("receivedMessages", [])]
        if ids:
            call("POST", f"/subscriptions/{name}:acknowledge", {"ackIds": ids})
            acked += len(ids)
    print(f"{acked / (time.perf_counter() - started):.0f}")
elif mode == "streaming":
    try:
        from google.cloud import pubsub_v1
    except ImportError:
        print("google-cloud-pubsub not installed")
        sys.exit(2)
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    subscriber = pubsub_v1.SubscriberClient()
    acked = 0
    lock = threading.Lock()
    done = threading.Event()

    def callback(message):
        global acked
        message.ack()
        with lock:
            acked += 1
            if acked >= total:
                done.set()

    started = time.perf_counter()
    future = subscriber.subscribe(
        subscriber.subscription_path(project, name),
        callback,
        flow_control=pubsub_v1.types.FlowControl(max_messages=5000),
    )
    done.wait(300)
    took = time.perf_counter() - started
    future.cancel()
    print(f"{acked / took:.0f}")
