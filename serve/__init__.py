"""The HTTP job API on Ray Serve: submit specs, watch jobs live, browse results.

``serve.app`` (the deployment and its routes), ``serve.store`` (jobs and API keys in SQL),
``serve.auth`` (keys on requests, rate limit), ``serve.jobs`` (Ray jobs: start, cancel,
reconcile), ``serve.samples`` (thumbnails), ``serve.cli`` (``pixcrawler serve`` / ``keys``),
``page.html`` (the web page).
"""
