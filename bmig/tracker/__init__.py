"""breqd: durable per-device dirty bitmaps."""
