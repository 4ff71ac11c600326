"""Reports for people: the self-contained HTML page of a run's alerts (``html``)."""
