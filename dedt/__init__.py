"""dedt: data-efficient diffusion training (pruning then reweighting)."""
