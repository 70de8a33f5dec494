"""The engine: sequences, KV block manager, scheduler, model runner, sampler."""
