"""Batch inference on Ray Data: ``dsvl2 batch -m MODEL INPUT OUT``.

INPUT is one of:

* a folder of images: one row per image file, found recursively, id = its path relative
  to the folder, the prompt from ``--prompt``;
* a JSONL / Parquet file of rows::

    {"id": "cat-1", "images": ["cats/1.jpg"], "prompt": "What breed?", "sampling": {"max_new_tokens": 64}}

  (``images``: paths relative to the file's folder, or absolute; ``prompt`` defaults to
  ``--prompt``; ``sampling`` overrides the command-line sampling options for that row).
  OUT gets one result per row::

    {"id": "cat-1", "text": "...", "finish_reason": "stop", "usage": {...}, "boxes": [...],
     "grounding_problems": [], "error": null}

* an OpenAI batch file (JSONL whose first non-empty line has ``custom_id`` and ``body``),
  so that one file runs here and on a hosted batch API::

    {"custom_id": "cat-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "any", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "cats/1.jpg"}}, {"type": "text", "text": "What breed?"}]}],
      "max_tokens": 64}}

  OUT (JSONL only) gets OpenAI's batch output lines, one per input line::

    {"id": "batch_req_...", "custom_id": "cat-1",
     "response": {"status_code": 200, "request_id": "req_...", "body": {a chat.completion}}, "error": null}

  Each body is checked and answered as ``dsvl2 serve`` answers ``POST
  /v1/chat/completions`` (same parser, same 400 messages, same ``chat.completion``
  with ``usage`` and the ``grounding`` extension; ``n``, ``truncate_history``, ``seed``,
  ``stop``... work). A request the endpoint refuses gets ``response.status_code`` 400 (or
  413, or 500 for a fault of dsvl2) with the API's ``{"error": {...}}`` body and
  ``"error": null``, as in OpenAI's error file; a line that is not a request at all (not
  JSON, no ``custom_id``, a method other than POST, a url other than
  ``/v1/chat/completions``) gets ``"response": null, "error": {"code", "message"}`` with
  ``custom_id`` null when it cannot be read. Either way the job goes on (OpenAI would
  refuse the whole file; here every other line is still answered). Images: ``data:``
  URLs, or local paths (``file://`` URLs too) under the batch file's folder, relative to
  it; remote URLs are refused (400). Decisions:

  - ``model`` may be anything, or absent (hosted batch APIs require it): the model that
    answers is ``-m``, and its name as given there is the body's ``model``.
  - ``stream: true`` is refused for that line (400, ``param`` "stream"), as hosted batch
    APIs refuse it; ``n`` > 1 works as on the server (``seed + i`` per choice).
  - A ``custom_id`` used twice stops the job before any work, naming both lines (OpenAI
    refuses such a file too): results are joined to requests by ``custom_id``, and two
    results under one id could not be told apart.
  - The command line's sampling options fill in what a body does not set (their
    defaults are the server's: greedy, 512 new tokens); ``--prompt`` is unused.
  - Resume is by ``custom_id``; a line whose ``custom_id`` cannot be read is known by a
    hash of its text (its result's ``id`` is ``batch_req_<hash>``), so a re-run does not
    report it again.

Pipeline: requests -> drop those already in OUT -> ``ray.data.from_items`` ->
``map_batches`` on a fixed pool of ``actors`` actors, each loading the model once -> the
driver receives each finished batch and appends it to OUT.

Notable choices:
* The driver writes OUT, not Ray's ``write_json`` / ``write_parquet`` (which write a
  folder of part files at the end): appending each batch as it arrives, flushed and
  fsynced, is what makes a run resumable. A crash or Ctrl-C loses at most the batches in
  flight; re-running the same command skips every id already in OUT. Results are written
  in the order they finish, not the input order.
* Parquet cannot be appended to, so a Parquet OUT is built from a JSONL journal next to
  it (``OUT.partial.jsonl``): rows go to the journal as they arrive, and when the run ends
  (finished, interrupted or failed) journal and OUT are merged into a new OUT. A journal
  left by a killed run is merged by the next one.
* A row that fails (unreadable image, prompt longer than the context window, bad sampling
  values) becomes a result with ``error`` set and ``text`` null; it never stops the job.
  Such rows count as done: re-running does not retry them (delete their lines to retry).
  Problems with a row-format INPUT itself (not JSON, no id, duplicate ids) stop the job
  before any work starts, naming the line; in an OpenAI batch file only duplicate
  ``custom_id`` s do (see above).
* One ``chat`` call per row by default, so every answer is exactly what
  ``dsvl2.load(MODEL).chat(prompt, images=[...])`` gives. ``rows_per_call > 1`` lets the
  engine batch rows (faster, above all on a GPU); in bfloat16 a batched row can then
  differ in the last bits from the same row answered alone. For an OpenAI batch file it
  queues that many requests on the engine at once, like concurrent API calls.
* Fault tolerance is Ray Data's: an actor that dies (killed, its node lost) is restarted
  and its batches are retried, without limit (Ray Data's defaults, ``max_restarts=-1``,
  ``max_task_retries=-1``). Results are keyed by id, and the writer drops an id it has
  already written, so every row is in OUT exactly once.
* Image paths are resolved to absolute paths on the driver and read by the actors: on a
  multi-machine cluster they must be on storage every node mounts at the same path.
* Importing this package imports neither Ray nor torch (the CLI registers ``batch``
  without slowing ``dsvl2 chat``).

Modules: ``readers`` (folders, rows), ``openai_format`` (OpenAI batch lines in and out),
``writers`` (OUT, resume, Parquet), ``answer`` (the actors), ``pipeline`` (``run_batch``,
Ray Data). The command line is ``dsvl2/commands/batch.py``.
"""

from .answer import Answerer, ChatAnswerer, answer_record, error_record
from .openai_format import is_openai_batch, read_openai_batch
from .pipeline import BatchSummary, run_batch
from .readers import (DEFAULT_PROMPT, IMAGE_SUFFIXES, JSONL_SUFFIXES, PARQUET_SUFFIXES, SAMPLING_KEYS,
    BatchInputError, Row, read_rows, sampling_params)
from .writers import JsonlResults, ParquetResults, open_results, out_format, result_schema

__all__ = ["Answerer", "BatchInputError", "BatchSummary", "ChatAnswerer", "JsonlResults", "ParquetResults", "Row",
           "answer_record", "error_record", "is_openai_batch", "open_results", "out_format", "read_openai_batch",
           "read_rows", "result_schema", "run_batch", "sampling_params"]
