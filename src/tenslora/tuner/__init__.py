"""The PEFT method: config, architectures, layers, the tuner, saving and loading, registration with PEFT."""
