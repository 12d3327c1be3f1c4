"""Auto-tuning of the block-group schedule with MetaSchedule, per token-count bucket.

``buckets`` picks the bucket of a call; ``workload`` makes the static-shape PrimFunc tuned
for a bucket and its valid inputs; ``measure`` builds and times candidates; ``records``
reads, compacts and checks the committed databases; ``tune`` drives a tuning run.
"""
