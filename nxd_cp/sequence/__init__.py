"""How a sequence is laid out over the CP ranks: layouts (zigzag, contiguous, per_document) and
their divisibility rules, packed-row formats, and the batch function that shards a full batch."""
