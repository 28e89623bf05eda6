"""The physical limit: a raw confluent-kafka consume -> produce relay, run as its own process.

It reads every record once and writes it once (acks=all), as any copying tool must, with
no numbering, mirroring or transactions, so its time and CPU are the floor Tandem is
compared with. Run as a process so its CPU time is its own. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition


def relay(bootstrap: str, src: str, dst: str, partitions: int, count: int) -> dict[str, Any]:
    started = time.time()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"relay-{src}",
            "enable.auto.commit": False,
            "fetch.max.bytes": 64 << 20,
            "max.partition.fetch.bytes": 8 << 20,
            "queued.max.messages.kbytes": 256 << 10,
        }
    )
    producer = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "batch.size": 1 << 20}
    )
    consumer.assign([TopicPartition(src, p, OFFSET_BEGINNING) for p in range(partitions)])
    failed = 0

    def delivered(err: Any, _msg: Any) -> None:
        nonlocal failed
        failed += err is not None

    seen = 0
    first = 0.0
    while seen < count:
        batch = consumer.consume(num_messages=10_000, timeout=1.0)
        if batch and not first:
            first = time.time()
        for m in batch:
            if m.error():
                continue
            seen += 1
            while True:
                try:
                    producer.produce(
                        dst,
                        value=m.value(),
                        key=m.key(),
                        partition=m.partition() or 0,
                        headers=m.headers(),
                        timestamp=m.timestamp()[1],
                        on_delivery=delivered,
                    )
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.poll(0)
    left = producer.flush(120)
    done = time.time()
    consumer.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "records": seen,
        "started": started,
        "first": first,
        "done": done,
        "failed": failed + left,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--partitions", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    a = ap.parse_args()
    print(json.dumps(relay(a.bootstrap, a.src, a.dst, a.partitions, a.count)))


if __name__ == "__main__":
    main()
