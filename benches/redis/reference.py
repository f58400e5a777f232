"""The same-run reference of `make bench`: a plain redis-py consumer loop.

Reads a consumer group with XREADGROUP COUNT 1000 and acks each batch with one XACK, until
N entries were acked; prints the acked entries per second. Usage: reference.py PORT
STREAM GROUP N.
"""
import sys
import time

import redis

port, stream, group, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = redis.Redis(port=int(port))
acked = 0
started = time.perf_counter()
while acked < total:
    reply = r.xreadgroup(group, "python", {stream: ">"}, count=1000, block=1000)
    for _, entries in reply or []:
        if entries:
            r.xack(stream, group, *[entry_id for entry_id, _ in entries])
            acked += len(entries)
print(f"{acked / (time.perf_counter() - started):.0f}")
