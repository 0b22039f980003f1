"""DeepSpeed learner ranks, objectives and weight transport."""
