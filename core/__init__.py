"""tessera's core: interfaces, registries, configuration and the engine; knows no vendor or model."""
