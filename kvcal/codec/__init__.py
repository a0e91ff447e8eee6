"""The transform codec: un-rotate, project, quantize, bit-pack and entropy-code KV caches."""
