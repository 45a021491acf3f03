"""PixCrawler's domain core: spec, records, sources, fetching, validation, dedup, writers.

Nothing in this package imports ray (see DESIGN.md): it runs and tests in-process.
"""

__version__ = "0.1.0"
