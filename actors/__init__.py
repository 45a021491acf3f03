"""Ray actors that wrap builder/ pieces: they hold state (a pool, an index, a model), not logic."""

NAMESPACE = "pixcrawler"
