"""Model and run configurations: paper sizes and tiny CPU ones."""
