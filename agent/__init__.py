"""The moe2 agent: one GGUF expert per box, serving next-token distributions over MQTT."""
