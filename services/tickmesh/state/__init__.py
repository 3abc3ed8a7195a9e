"""State service: the data plane.

Appends execution records idempotently, keeps lifetime rows and counters, stores blobs,
republishes refs, serves history reads.
"""
