"""Running PixCrawler on Ray: connect, the job coordinator, the CLI, job submission, metrics."""
