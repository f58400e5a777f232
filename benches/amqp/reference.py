"""The same-run reference of the RabbitMQ rows of `make bench`: a plain pika consumer.

Consumes QUEUE with prefetch 200 and one basic.ack per message until N messages were acked;
prints the acked messages per second, or `pika not installed` (exit status 2) when pika is
missing. Usage: reference.py PORT QUEUE N.
"""
import sys
import time

try:
    import pika
except ImportError:
    print("pika not installed")
    sys.exit(2)

port, queue, total = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
params = pika.ConnectionParameters(
    host="127.0.0.1", port=port, credentials=pika.PlainCredentials("guest", "guest")
)
connection = pika.BlockingConnection(params)
channel = connection.channel()
channel.basic_qos(prefetch_count=200)
acked = 0


def on_message(ch, method, _properties, _body):
    global acked
    ch.basic_ack(delivery_tag=method.delivery_tag)
    acked += 1
    if acked >= total:
        ch.stop_consuming()


started = time.perf_counter()
channel.basic_consume(queue=queue, on_message_callback=on_message)
channel.start_consuming()
took = time.perf_counter() - started
connection.close()
print(f"{acked / took:.0f}")
