"""Generation: plan, the Ray Data pipeline, unit commits, regeneration."""
