"""Prometheus metrics of the server, in a registry of its own (one per app)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from ..engine.llm_engine import EngineStats
from ..engine.runner import format_weights

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self, model_name: str = "") -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sugam_requests", "HTTP requests to /v1 and /api by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("sugam_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("sugam_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("sugam_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("sugam_inter_token_latency_seconds", "Time between tokens of a request",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("sugam_request_latency_seconds", "Request time from arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("sugam_requests_running", "Sequences being generated", registry=r)
        self.waiting = Gauge("sugam_requests_waiting", "Sequences waiting for KV blocks or a batch slot", registry=r)
        self.kv_usage = Gauge("sugam_kv_cache_usage_ratio", "Share of KV-cache blocks in use", registry=r)
        self.prefix_hit_rate = Gauge("sugam_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.preemptions = Gauge("sugam_preemptions", "Sequences preempted since start", registry=r)
        # Speculative decoding (vLLM's spec_decode_* names; zero while it is off).
        self.spec = {name: Gauge(f"sugam_spec_decode_{name}", text, registry=r) for name, text in (
            ("num_drafts", "Verification steps with at least one guessed token"),
            ("num_draft_tokens", "Guessed tokens verified"),
            ("num_accepted_tokens", "Guessed tokens the model confirmed"),
            ("num_emitted_tokens", "Tokens produced by verification steps (accepted + the model's own)"))}
        self.execution = Info("sugam_execution", "The path chosen at load: CPU, kernels, weights, compute dtype",
                              registry=r)
        self.lora_info: Gauge | None = None  # registered when the engine serves LoRA adapters
        # vLLM's names, which routers read to balance replicas by queue and KV usage (the Gateway
        # API inference extension, llm-d): the same values as sugam_requests_* and
        # sugam_kv_cache_usage_ratio, labelled by model_name as vLLM does. "gpu" is vLLM's word:
        # it is the KV-cache usage on whatever device the model runs (0..1).
        self.vllm = {name: Gauge(f"vllm:{name}", text, ["model_name"], registry=r).labels(model_name=model_name)
                     for name, text in (
                         ("num_requests_running", "Number of requests in model execution batches"),
                         ("num_requests_waiting", "Number of requests waiting to be processed"),
                         ("gpu_cache_usage_perc", "KV-cache usage, 1 means 100 percent (on any device)"),
                         ("kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent (vLLM V1's name)"))}

    def set_lora_info(self, running: tuple[str, ...], waiting: tuple[str, ...], max_lora: int) -> None:
        """vLLM's `vllm:lora_requests_info`, which LoRA-aware routers read: the adapters of running and
        waiting requests (comma-separated) and the slots, as labels; the value is when it was set. One
        series at a time (vLLM keeps the old ones; a reader takes the newest either way)."""
        if self.lora_info is None:
            self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on LoRA requests",
                                   ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                                   registry=self.registry)
        self.lora_info.clear()
        self.lora_info.labels(max_lora=str(max_lora), waiting_lora_adapters=",".join(waiting),
                              running_lora_adapters=",".join(running)).set(time.time())

    def set_execution_path(self, path: dict[str, Any]) -> None:
        labels = {k: str(v) for k, v in path.items() if k != "weights"}
        labels["weights"] = format_weights(path["weights"])
        self.execution.info(labels)

    def render(self, stats: EngineStats | None) -> bytes:
        if stats is not None:
            self.running.set(stats.num_running)
            self.waiting.set(stats.num_waiting)
            self.kv_usage.set(stats.kv_usage)
            self.vllm["num_requests_running"].set(stats.num_running)
            self.vllm["num_requests_waiting"].set(stats.num_waiting)
            self.vllm["gpu_cache_usage_perc"].set(stats.kv_usage)
            self.vllm["kv_cache_usage_perc"].set(stats.kv_usage)
            self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
            self.preemptions.set(stats.num_preemptions)
            if stats.speculation is not None:
                for name, gauge in self.spec.items():
                    gauge.set(getattr(stats.speculation, name))
        return generate_latest(self.registry)
