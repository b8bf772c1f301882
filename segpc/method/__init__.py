"""The method itself: nucleus instances, multi-scale crops, cell candidates, aggregation, the segmenter."""
