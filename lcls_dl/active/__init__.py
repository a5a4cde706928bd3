"""Active learning: label store, uncertainty scores, batch selection."""
