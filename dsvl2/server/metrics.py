"""``GET /metrics``: the server's counters in the Prometheus text format (version 0.0.4).

Hand-written (a few counters, gauges and histograms) instead of ``prometheus_client``:
the server extra stays FastAPI + uvicorn, and the tests parse the output with
``prometheus_client``'s own text parser. Names follow Prometheus conventions (``_total``
counters, ``_seconds`` histograms, ``dsvl2_`` prefix):

* ``dsvl2_requests_total{outcome}``: chat requests by how they ended: ``stop``,
  ``length`` (a choice hit ``max_tokens`` or the context window), ``cancelled`` (the
  client went away), ``error`` (the server failed), and refusals ``invalid`` (400),
  ``unauthorized`` (401), ``not_found`` (404), ``too_large`` (413), ``queue_full`` (429),
  ``loading`` (503).
* ``dsvl2_prompt_tokens_total`` (image tokens included), ``dsvl2_generation_tokens_total``.
* ``dsvl2_requests_running`` / ``_admitting`` (vision + prefill under way) /
  ``_waiting`` (no batch slot yet), ``dsvl2_batch_slots_in_use`` /
  ``dsvl2_batch_slots_capacity`` (the concurrency limit, ``--max-batch-size``): read from
  the driver at scrape time. Gauges of a capacity end in ``_capacity``, not ``_total``
  (Prometheus keeps ``_total`` for counters).
* The KV cache, a pool of fixed-size blocks under a byte budget (``--kv-cache-bytes``),
  also read at scrape time: ``dsvl2_kv_cache_bytes_capacity`` / ``_used`` / ``_peak``
  (high-water mark since start), ``dsvl2_kv_cache_blocks_capacity`` / ``_used``;
  ``dsvl2_preemptions_total`` (running requests put back to wait because the pool was
  full), ``dsvl2_prefix_cache_hit_tokens_total`` (prompt tokens reused from shared blocks
  instead of prefilled), ``dsvl2_vision_tiles_total`` (image tiles the vision tower
  actually encoded: tiles of a reused prefix are not).
* Histograms ``dsvl2_time_to_first_token_seconds`` (request received -> first token,
  image decoding included), ``dsvl2_inter_token_latency_seconds`` (every gap between two
  tokens of a request, from the engine's own stamps) and
  ``dsvl2_request_duration_seconds``.

Updates happen on the event loop; a lock keeps a scrape consistent anyway.
"""

from __future__ import annotations

import math
import threading

OUTCOMES = ("stop", "length", "cancelled", "error", "invalid", "unauthorized", "not_found", "too_large",
            "queue_full", "loading")
_STATUS_OUTCOME = {400: "invalid", 401: "unauthorized", 404: "not_found", 405: "invalid", 413: "too_large", 415: "invalid",
                   429: "queue_full", 503: "loading"}

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def outcome_of_status(status: int) -> str:
    return _STATUS_OUTCOME.get(status, "error")


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        i = next((k for k, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for b, c in zip((*self.buckets, math.inf), self.counts):
            total += c
            out.append(f'{self.name}_bucket{{le="{_num(b)}"}} {total}')
        out += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {total}"]
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram("dsvl2_time_to_first_token_seconds",
                              "Time from receiving a request to its first generated token.", TTFT_BUCKETS)
        self.itl = Histogram("dsvl2_inter_token_latency_seconds",
                             "Time between two consecutive tokens of one request.", ITL_BUCKETS)
        self.duration = Histogram("dsvl2_request_duration_seconds",
                                  "Time from receiving a request to its last token.", DURATION_BUCKETS)
        self.mean_duration = None  # moving average, for Retry-After

    def refused(self, status: int) -> None:
        with self.lock:
            self.requests[outcome_of_status(status)] += 1

    def finished(self, outcome: str, prompt_tokens: int, generated: int, ttft: float | None,
                 gaps: list[float], duration: float | None) -> None:
        with self.lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated
            if ttft is not None:
                self.ttft.observe(ttft)
            for g in gaps:
                self.itl.observe(g)
            if duration is not None:
                self.duration.observe(duration)
                m = self.mean_duration
                self.mean_duration = duration if m is None else 0.8 * m + 0.2 * duration

    def render(self, stats: dict | None) -> str:
        """The text exposition; ``stats`` is ``Driver.stats()`` (None while the model loads)."""
        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> list[str]:
            return [f"# HELP {name} {help}", f"# TYPE {name} {kind}"] + [f"{name}{lab} {_num(v)}" for lab, v in samples]

        s = stats or {}
        with self.lock:
            out = metric("dsvl2_requests_total", "counter", "Chat completion requests by outcome.",
                         [(f'{{outcome="{o}"}}', n) for o, n in self.requests.items()])
            out += metric("dsvl2_prompt_tokens_total", "counter", "Prompt tokens processed (image tokens included).",
                          [("", self.prompt_tokens)])
            out += metric("dsvl2_generation_tokens_total", "counter", "Tokens generated.",
                          [("", self.generation_tokens)])
            for h in (self.ttft, self.itl, self.duration):
                out += h.lines()
        out += metric("dsvl2_model_loaded", "gauge", "1 once the model is loaded.", [("", stats is not None)])
        for key, help in (("running", "Requests decoding."),
                          ("admitting", "Requests holding a batch slot whose images / prompt are being processed."),
                          ("waiting", "Requests waiting for a batch slot or KV-cache blocks.")):
            out += metric(f"dsvl2_requests_{key}", "gauge", help, [("", s.get(key, 0))])
        out += metric("dsvl2_batch_slots_in_use", "gauge", "Batch slots held by requests (running or admitting).",
                      [("", s.get("slots_in_use", 0))])
        out += metric("dsvl2_batch_slots_capacity", "gauge",
                      "Batch slots: requests decoded together at most (the maximum batch size).",
                      [("", s.get("slots_total", 0))])
        for name, key, help in (
                ("kv_cache_bytes_capacity", None, "Bytes of the KV-cache block pool (the budget)."),
                ("kv_cache_bytes_used", None, "Bytes of KV-cache blocks in use."),
                ("kv_cache_bytes_peak", None, "Most KV-cache bytes in use at once since the start."),
                ("kv_cache_bytes_cached", None,
                 "Bytes of KV-cache blocks no request holds, kept for reuse (evicted when blocks run short)."),
                ("kv_cache_blocks_capacity", "kv_blocks_total", "KV-cache blocks in the pool."),
                ("kv_cache_blocks_used", "kv_blocks_used", "KV-cache blocks in use.")):
            out += metric("dsvl2_" + name, "gauge", help, [("", s.get(key or name, 0))])
        out += metric("dsvl2_preemptions_total", "counter",
                      "Running requests put back to wait (their KV blocks freed) because the pool was full.",
                      [("", s.get("preemptions", 0))])
        out += metric("dsvl2_prefix_cache_hit_tokens_total", "counter",
                      "Prompt tokens reused from cached KV blocks instead of being prefilled.",
                      [("", s.get("prefix_cache_hit_tokens", 0))])
        out += metric("dsvl2_vision_tiles_total", "counter",
                      "Image tiles encoded by the vision tower (tiles of a reused prefix are not).",
                      [("", s.get("vision_tiles", 0))])
        return "\n".join(out) + "\n"
