"""The contract and the pure step: hooks, pieces, state, the step and functional optimizers."""
