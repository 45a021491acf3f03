"""The sandbox web: images, image search and deliberate faults on 127.0.0.1, for the demo, the
tests and the benchmarks (nothing in PixCrawler's tests touches the real internet).

``SandboxWeb`` serves it from Python (``with SandboxWeb() as web: web.base_url``);
``serve_forever`` serves it from the CLI (``pixcrawler sandbox``). ``FAULTS`` maps each fault
to the outcome the pipeline must give it.
"""

from builder.sandbox.corpus import FAULTS
from builder.sandbox.server import DEFAULT_CLASSES, SandboxWeb, serve_forever

__all__ = ["DEFAULT_CLASSES", "FAULTS", "SandboxWeb", "serve_forever"]
