"""Ray actors that wrap builder/ pieces: they hold state (a pool, an index, a model), not logic.

``builder`` is imported first, for its process settings alone (``builder/__init__.py``:
allocator, BLAS threads, huge pages): on a cluster the driver joined, an actor's process did
not inherit the driver's environment, and they must be in it before an actor's module loads
numpy or pyarrow."""

import importlib

importlib.import_module("builder")

NAMESPACE = "pixcrawler"


def restarted() -> bool:
    """Whether Ray restarted the calling actor (its process or node was lost): asked in its
    ``__init__``, which Ray runs again with the first start's arguments. Where Ray's cluster
    database cannot say (no answer, or no record of the actor), this answers True: an actor
    that rebuilds itself from the journal when it need not is only slower, while one that
    took a restart for a first start would come back empty in the middle of a job."""
    import ray
    from ray.exceptions import RayError

    try:
        answer = ray.get_runtime_context().was_current_actor_reconstructed
    except (RayError, OSError):
        return True
    return answer if isinstance(answer, bool) else True
