"""The actors: one model per actor, one result line per request.

Two ``map_batches`` callables, one per INPUT format. A batch is ``{"id": [...],
"request": [JSON strings]}`` (JSON keeps Ray's column types simple whatever a request
holds) and comes back as ``{"id": [...], "record": [JSON result lines]}``.

* ``Answerer``: dsvl2 rows (prompt, image paths, sampling) -> dsvl2 result lines.
* ``ChatAnswerer``: OpenAI chat-completion bodies -> OpenAI batch output lines, each
  answered the way ``dsvl2 serve`` answers ``POST /v1/chat/completions``
  (``dsvl2.server.submit.submit``: images, context check, ``truncate_history``, ``n``;
  ``dsvl2.server.responses.finished_completion``: the body).

Torch, the model and the server's modules are imported in the actor only.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DSVL2Error
from .readers import sampling_params

# The constructor arguments that load the model; the others go to ``setup``.
LOAD_KEYS = ("model", "dtype", "device", "quantize", "threads", "kv_cache_bytes")


class _Loaded:
    """Loads the model once per actor, then ``setup(model, **options)``."""

    def __init__(self, model: str, dtype: str, device: str, quantize: str | None, threads: int,
                 kv_cache_bytes: int | None = None, **options):
        import torch

        from ..api import load

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor, not the whole node
        self.setup(load(model, dtype=dtype, device=device, quantize=quantize, kv_cache_bytes=kv_cache_bytes),
                   **options)

    def setup(self, model, **options) -> None:
        raise NotImplementedError


class Answerer(_Loaded):
    """dsvl2 rows: one ``chat`` call per row (``rows_per_call`` rows with equal sampling
    in one call when asked)."""

    def setup(self, model, rows_per_call: int, sampling: dict) -> None:
        self.model = model
        self.rows_per_call = rows_per_call
        self.sampling = sampling

    def __call__(self, batch: dict) -> dict:
        ids = [str(i) for i in batch["id"]]
        requests = [json.loads(r) for r in batch["request"]]
        results: dict[str, dict] = {}
        for start in range(0, len(ids), self.rows_per_call):
            chunk = list(zip(ids[start:start + self.rows_per_call], requests[start:start + self.rows_per_call]))
            if len(chunk) > 1:
                results.update(self._together(chunk))
            for rid, req in chunk:
                if rid not in results:
                    results[rid] = self._alone(rid, req)
        return {"id": ids, "record": [json.dumps(results[i], ensure_ascii=False) for i in ids]}

    def _alone(self, rid: str, req: dict) -> dict:
        try:
            params = sampling_params(self.sampling, req["sampling"])
            answer = self.model.chat(req["prompt"], images=req["images"], params=params)
        except Exception as e:  # a bad row is a result, never the end of the job
            return error_record(rid, e)
        return answer_record(rid, answer)

    def _together(self, chunk: list[tuple[str, dict]]) -> dict[str, dict]:
        """Rows with the same sampling in one engine batch; {} if that fails (each row is
        then answered alone, so that only the bad row gets the error)."""
        from ..api import user_turn

        groups: dict[str, list[tuple[str, dict]]] = {}
        for rid, req in chunk:
            groups.setdefault(json.dumps(req["sampling"], sort_keys=True), []).append((rid, req))
        out = {}
        for members in groups.values():
            try:
                params = sampling_params(self.sampling, members[0][1]["sampling"])
                convs = [[user_turn(req["prompt"], req["images"])] for _, req in members]
                answers = self.model.chat(convs, params=params)
            except Exception:
                continue
            out.update({rid: answer_record(rid, a) for (rid, _), a in zip(members, answers)})
        return out


def answer_record(rid: str, answer) -> dict:
    return {"id": rid, **answer.to_dict(), "error": None}


def error_record(rid: str, e: BaseException) -> dict:
    msg = str(e).strip() or type(e).__name__
    if not isinstance(e, DSVL2Error):  # a bug or an OS error, not a message written for users
        msg = f"{type(e).__name__}: {msg}"
    return {"id": rid, "text": None, "finish_reason": None, "usage": None, "boxes": [], "grounding_problems": [],
            "error": msg}


class ChatAnswerer(_Loaded):
    """OpenAI chat-completion bodies, answered as the HTTP server answers them.

    ``rows_per_call`` requests are queued on the engine together (each its own engine
    request, batched by the scheduler like concurrent API calls); 1 answers them one at a
    time. ``sampling``: the command line's options, for what a body does not set.
    ``image_dir``: the batch file's folder, the only place local image paths may name."""

    def setup(self, model, rows_per_call: int, sampling: dict, served_model_name: str, image_dir: str) -> None:
        from ..server.images import ImagePolicy

        self.model = model
        self.rows_per_call = rows_per_call
        self.sampling = sampling
        self.served_model_name = served_model_name
        self.policy = ImagePolicy(allowed_local_dir=Path(image_dir))

    def __call__(self, batch: dict) -> dict:
        ids = [str(i) for i in batch["id"]]
        bodies = [json.loads(r) for r in batch["request"]]
        records: dict[str, dict] = {}
        for start in range(0, len(ids), self.rows_per_call):
            records.update(self._answer(list(zip(ids[start:start + self.rows_per_call],
                                                 bodies[start:start + self.rows_per_call]))))
        return {"id": ids, "record": [json.dumps(records[i], ensure_ascii=False) for i in ids]}

    def _answer(self, chunk: list[tuple[str, dict]]) -> dict[str, dict]:
        from ..engine.driver import QueueSink
        from ..server.submit import submit
        from .openai_format import chat_request, failure_record

        out: dict[str, dict] = {}
        running = []
        try:
            for cid, body in chunk:
                try:
                    req = chat_request(body)
                    req.sampling = {**self.sampling, **req.sampling}  # the body's values win
                    sink = QueueSink()
                    running.append((cid, req, sink, submit(self.model, req, self.policy, sink, None)))
                except Exception as e:  # a bad request is a result line, never the end of the job
                    out[cid] = failure_record(cid, e)
            for cid, req, sink, sub in running:
                out[cid] = self._collect(cid, req, sink, sub)
        finally:  # an interrupted batch leaves nothing running in the engine
            self.model.driver.cancel([h for *_, sub in running for h in sub.handles if not h.finished])
        return out

    def _collect(self, cid: str, req, sink, sub) -> dict:
        from ..server.errors import APIError
        from ..server.responses import failed_output, finished_completion, new_id, stop_ids
        from .openai_format import failure_record, response_record

        outputs = {}
        while len(outputs) < req.n:
            ev = sink.get()
            if ev.output is not None:
                outputs[ev.index] = ev.output
        bad = failed_output(outputs.values())
        if bad is not None:  # what the server answers: 500, the engine's message
            return failure_record(cid, APIError(500, f"generation failed: {bad.error}", code="generation_failed"))
        return response_record(cid, 200, finished_completion(new_id(), self.served_model_name, self.model, sub, outputs,
                                                             stop_ids(self.model, req)))
