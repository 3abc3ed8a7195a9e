"""The executor pool: hands queued work to connected executors and records what they did.

Executors in any language open one ``ExecutorPoolService.Connect`` stream, say
which handlers they serve and how much they run at once, and from then on
receive ``Assignments`` and return ``Completions`` in batches. For every
(tenant, kind, handler) with a connected executor the pool holds one JetStream
pull consumer on the tenant's work stream and pulls exactly as much as the
executors have free. It decides timeouts, retries with backoff and dead
letters; offloads large payloads to the blob store; publishes the execution
record to ``tm.<tenant>.exec.<lifetime>`` and only then acks the request.
Executors read the blobs their work refers to through ``FetchBlob``, so only
the pool needs credentials for the blob store.

Inputs: work requests (``tm.<tenant>.work.<kind>.<handler>``), cancellations
(``tm.<tenant>.ctl.cancel``), executor streams. Outputs: execution records,
dead letters (``tm.<tenant>.dlq.work``), blobs.
"""
