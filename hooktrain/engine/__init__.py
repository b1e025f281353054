"""The engine: state, the pure step, functional optimizers, data, the event loop, hookspecs."""
