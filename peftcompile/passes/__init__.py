"""fx passes: capture -> match -> (place) -> rewrite."""
