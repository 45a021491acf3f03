"""Ray actors that wrap builder/ pieces: they hold state (a pool, an index, a model), not logic."""

NAMESPACE = "pixcrawler"


def restarted() -> bool:
    """Whether Ray restarted the calling actor (its process or node was lost): asked in its
    ``__init__``, which Ray runs again with the first start's arguments."""
    import ray

    return bool(ray.get_runtime_context().was_current_actor_reconstructed)
